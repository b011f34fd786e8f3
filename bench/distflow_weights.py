"""DistFlow weights path alone: fetch the default model's weights from a donor process over
loopback TCP, several times, and print the rate of each transfer.

The donor is this script run with `donor` (it maps the cached weights and calls
`flowserve.distflow.serve_weights`); the first fetch pays page faults on both sides.

    python bench/distflow_weights.py [--fetches 4]
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DEEPFLOW_CACHE", str(ROOT / ".venv" / "deepflow-cache"))
from flowserve.config import default_model_path  # noqa: E402
from flowserve.distflow import fetch_weights, serve_weights  # noqa: E402
from flowserve.weights import load_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("role", nargs="?", default="fetch", choices=["fetch", "donor"])
    ap.add_argument("--fetches", type=int, default=4)
    args = ap.parse_args()
    if args.role == "donor":
        print(serve_weights(*load_weights(default_model_path()), "127.0.0.1"), flush=True)
        sys.stdin.read()  # serve until the parent closes our stdin
        return
    donor = subprocess.Popen([sys.executable, __file__, "donor"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        address = donor.stdout.readline().strip()
        for i in range(args.fetches):
            t = time.perf_counter()
            _, tensors = fetch_weights(address)
            dt = time.perf_counter() - t
            size = sum(x.numel() * x.element_size() for x in tensors.values())
            print(f"fetch {i + 1}: {size / 1e6:.0f} MB in {dt:.3f} s = {size / 1e9 / dt:.2f} GB/s")
    finally:
        donor.stdin.close()
        donor.wait()


if __name__ == "__main__":
    main()
