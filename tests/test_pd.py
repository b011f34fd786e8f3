"""PD disaggregation: a prefill TE computes the prompt and first token, DistFlow moves the
KV blocks to a decode TE, which continues. Engine level first (two in-process engines and a
real transfer over both transports), then the real server."""
import threading

import pytest

from flowserve.distflow import accept_kv, listen_kv, recv_kv, send_kv
from flowserve.wire import pack
from tests.test_engine import GREEDY, assert_no_leak, make_engine, random_prompts


def transfer(prefill, decode, transport: str) -> None:
    """Move every handed-off request from `prefill` to `decode` the way two TE-shells do."""
    listener, address = listen_kv(transport)
    with listener:
        while prefill.handoffs:
            seq = prefill.handoffs.pop()

            def receive():
                with accept_kv(listener) as conn:
                    head, kv = recv_kv(conn, 10)
                    decode.add_prefilled(head["rid"], head["token_ids"], seq.num_prompt, seq.params, kv,
                                         head["num_cached"])
                    conn.sendall(pack({"ok": True}))
            t = threading.Thread(target=receive)
            t.start()
            send_kv(address, {"rid": seq.request_id, "token_ids": seq.token_ids, "num_cached": 0},
                    prefill.runner.kv_shape(len(seq.block_ids)), prefill.dtype,
                    lambda out: prefill.runner.read_kv(seq.block_ids, out), 10)
            t.join()
            prefill.release(seq)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_disaggregated_tokens_equal_colocated(model_path, weights, transport):
    prompts = random_prompts(4, 20, 200, seed=3)
    colocated = make_engine(model_path, weights).generate(prompts, GREEDY)
    prefill, decode = make_engine(model_path, weights), make_engine(model_path, weights)
    firsts = {}
    for i, p in enumerate(prompts):
        prefill.add_request(f"r{i}", p, GREEDY, handoff=True)
    while prefill.has_work():
        for o in prefill.step():
            assert o.finish_reason is None
            firsts[o.request_id] = o.new_token_ids
    transfer(prefill, decode, transport)
    assert_no_leak(prefill)
    rest = {f"r{i}": [] for i in range(len(prompts))}
    while decode.has_work():
        for o in decode.step():
            rest[o.request_id] += o.new_token_ids
    assert [firsts[f"r{i}"] + rest[f"r{i}"] for i in range(len(prompts))] == colocated
    assert_no_leak(decode)
