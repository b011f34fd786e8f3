"""The chaos suite, bounded (bench/chaos.py runs it longer): under load from the openai client,
seeded random SIGKILLs and SIGSTOPs of TEs, TP executors and the warm template; afterwards
no request hung or broke, no process, KV block or pin leaked, greedy answers are unchanged,
and a batch run through the faults has every line exactly once.

A tiny random-weight model (tests/tiny_model.py) keeps steps cheap, so the faults, not the
compute, set the pace; TP=2 gives every TE an executor to hit."""
import os
import signal
import subprocess
import time

import pytest

from bench.chaos import Main, chaos
from scaling.launch import FORK_TIMEOUT_S
from tests.server_util import Server, wait_until
from tests.tiny_model import write_tiny_model

HEALTH_S = 2


@pytest.mark.parametrize("seed", [1])
async def test_random_faults_under_load_break_no_invariant(tmp_path, seed):
    tiny = write_tiny_model(tmp_path / "tiny")
    with Main("--model", str(tiny), "--num-tes", "2", "--tensor-parallel-size", "2", "--kv-cache-gb", "0.05",
              "--health-timeout-s", str(HEALTH_S), "--max-model-len", "512") as main:
        report = await chaos(main, seconds=40, seed=seed, gap_s=2.5, concurrency=6, bound_s=30, health_s=HEALTH_S)
    print({k: v for k, v in report.items() if k != "fault_log"})
    assert report["faults"] >= 8 and report["requests"] >= 30
    assert {k: v for k, v in report["invariants"].items() if not k.startswith("_")} == \
        dict.fromkeys(["no_request_hung_or_broke", "every_request_answered_or_ended_with_an_error",
                       "no_leaked_process", "no_leaked_kv_block_or_pin", "same_greedy_answers",
                       "batch_lines_exactly_once"], True), report


def test_a_frozen_template_is_killed_and_tes_start_again(tmp_path):
    """Found by the chaos run: with the template SIGSTOPped, a TE's replacement waited for its
    fork forever and the group stayed empty. Now the fork times out, the template is killed
    and started again, and the replacement comes from it."""
    tiny = write_tiny_model(tmp_path / "tiny")
    with Server("--model", str(tiny), "--num-tes", "1", "--kv-cache-gb", "0.05", "--health-timeout-s", "2") as s:
        cluster = s.get("/admin/cluster")
        template, te = cluster["template_pid"], cluster["tes"][0]["pid"]
        os.kill(template, signal.SIGSTOP)
        os.kill(te, signal.SIGKILL)
        t0 = time.monotonic()
        wait_until(lambda: [t for t in s.get("/admin/cluster")["tes"] if t["state"] == "ready" and t["pid"] != te],
                   FORK_TIMEOUT_S + 20)
        assert time.monotonic() - t0 > FORK_TIMEOUT_S - 1  # the first fork did wait for its bound
        assert s.get("/admin/cluster")["template_pid"] not in (None, template)
        assert s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})[0] == 200


def test_a_full_state_disk_does_not_stop_the_cluster(tmp_path):
    """Found by `bench/chaos.py --disk-full`: a TE died while the state dir's disk was full, the
    failed write of its record ended the cluster's health loop, and the group was never
    refilled. Now the write is logged and lost (a restart would miss it); serving goes on."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    tiny, state = write_tiny_model(tmp_path / "tiny"), tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)], check=True)
    try:
        with Server("--model", str(tiny), "--num-tes", "1", "--kv-cache-gb", "0.05", "--health-timeout-s", "2",
                    "--state-dir", str(state)) as s:
            with open(state / "filler", "wb") as f:
                with pytest.raises(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
            [te] = s.get("/admin/cluster")["tes"]
            os.kill(te["pid"], signal.SIGSTOP)  # failed by the health loop, which writes its record away
            wait_until(lambda: [t for t in s.get("/admin/cluster")["tes"] if t["state"] == "ready" and
                                t["pid"] != te["pid"]], 30)
            assert s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})[0] == 200
            assert "state not saved" in s.output()
            (state / "filler").unlink()
    finally:
        subprocess.run(["umount", str(state)], check=False)
