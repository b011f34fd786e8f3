"""The chaos suite, bounded (bench/chaos.py runs it longer): under load from the openai client,
seeded random SIGKILLs and SIGSTOPs of TEs, TP executors and the warm template; afterwards
no request hung or broke, no process, KV block or pin leaked, and greedy answers are unchanged.

A tiny random-weight model (tests/tiny_model.py) keeps steps cheap, so the faults, not the
compute, set the pace; TP=2 gives every TE an executor to hit."""
import pytest

from bench.chaos import chaos
from tests.server_util import Server
from tests.tiny_model import write_tiny_model

HEALTH_S = 2


@pytest.mark.parametrize("seed", [1])
async def test_random_faults_under_load_break_no_invariant(tmp_path, seed):
    tiny = write_tiny_model(tmp_path / "tiny")
    with Server("--model", str(tiny), "--num-tes", "2", "--tensor-parallel-size", "2", "--kv-cache-gb", "0.05",
                "--health-timeout-s", str(HEALTH_S), "--max-model-len", "512") as s:
        report = await chaos(s.url, s.get, s.proc.pid, seconds=40, seed=seed, gap_s=2.5, concurrency=6,
                             bound_s=30, health_s=HEALTH_S)
    print({k: v for k, v in report.items() if k != "fault_log"})
    assert report["faults"] >= 8 and report["requests"] >= 30
    assert {k: v for k, v in report["invariants"].items() if not k.startswith("_")} == \
        dict.fromkeys(["no_request_hung_or_broke", "every_request_answered_or_ended_with_an_error",
                       "no_leaked_process", "no_leaked_kv_block_or_pin", "same_greedy_answers"], True), report
