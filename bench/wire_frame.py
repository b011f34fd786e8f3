"""Why `flowserve/protocol.py` uses msgspec: encode + decode time and size of one TE step's
output frame, the message the main process reads most (one per engine step per TE).

The frame: 32 sequences decoding (one new token each), the engine's stats and a few prefix-
cache events. Compared: the real `Step` Struct with msgspec msgpack (what DeepFlow sends),
the same Struct as msgspec JSON, and the dataclasses + orjson way (asdict, dumps, loads,
rebuilt into dataclasses), all decoded back into typed objects.

    .venv/bin/python bench/wire_frame.py
"""
import sys
import timeit
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flowserve.protocol import FinishReason, Stats, Step, TokenOut, pack, unpack_frames  # noqa: E402


@dataclass
class OutDC:
    rid: str
    token_ids: list[int]
    finish: FinishReason | None
    num_cached: int


@dataclass
class StepDC:
    outs: list[OutDC]
    stats: dict


def frame() -> Step:
    stats = Stats(running=32, waiting=3, kv_usage=0.41, kv_blocks_total=4096, kv_blocks_free=2400,
                  prefix_queries=51234, prefix_hits=20111, cached=[hash(("c", i)) for i in range(2)],
                  evicted=[hash(("e", 0))])
    return Step([TokenOut(f"task-{i}.0", [1234 + i], None, 48) for i in range(32)], stats)


def main() -> None:
    step = frame()
    dc = StepDC([OutDC(o.rid, o.token_ids, o.finish, o.num_cached) for o in step.outs], msgspec.to_builtins(step.stats))
    json_enc, json_dec = msgspec.json.Encoder(), msgspec.json.Decoder(Step)

    def msgpack_rt() -> bytes:
        raw = pack(step)
        unpack_frames(bytearray(raw))
        return raw

    def json_rt() -> bytes:
        raw = json_enc.encode(step)
        json_dec.decode(raw)
        return raw

    def orjson_rt() -> bytes:
        raw = orjson.dumps(asdict(dc))
        m = orjson.loads(raw)
        StepDC([OutDC(**o) for o in m["outs"]], m["stats"])
        return raw

    print("| encoding | us per frame (encode + decode) | bytes |\n|---|---:|---:|")
    base = None
    for name, fn in [("msgspec msgpack (protocol.py)", msgpack_rt), ("msgspec JSON", json_rt),
                     ("dataclasses + orjson", orjson_rt)]:
        n = 5000
        us = 1e6 * min(timeit.repeat(fn, number=n, repeat=5)) / n
        base = base or us
        print(f"| {name} | {us:.1f} ({us / base:.1f}x) | {len(fn())} |")


if __name__ == "__main__":
    main()
