"""The PD-aware step of dist_sched (PAPER.md section 5): colocated or disaggregated?

`Heatmap` is this machine's measurement (`python deepflow.py profile-pd`,
`scheduler/pd_profile.py`): for a grid of prefill lengths (rows) and decode/prefill ratios
(columns), the job completion time of a job run colocated and run disaggregated. A job
goes to the cell nearest its prompt length and predicted ratio (nearest on a log scale:
the grid is geometric) and to whichever mode was faster there.

The decode length is not known when a job arrives, so `DecodeLengthPredictor` guesses it
from requests that finished before: per prompt-length bucket (powers of two), the median
output length of the last `window` requests in that bucket, capped by the request's
max_tokens. A bucket with no history predicts max_tokens (the longest it can be).
"""
import json
import math
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median


@dataclass
class Heatmap:
    prefill_lens: list[int]          # rows
    ratios: list[float]              # columns: decode tokens / prefill tokens
    colocated_ms: list[list[float]]  # [row][column] mean job completion time
    disagg_ms: list[list[float]]
    setup: str = ""                  # how it was measured

    @classmethod
    def load(cls, path: str | Path) -> "Heatmap":
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    def cell(self, prompt_len: int, output_len: int) -> tuple[int, int]:
        def nearest(grid, x):
            return min(range(len(grid)), key=lambda i: abs(math.log(grid[i]) - math.log(max(x, 1e-6))))
        return nearest(self.prefill_lens, prompt_len), nearest(self.ratios, output_len / prompt_len)

    def choose(self, prompt_len: int, output_len: int) -> tuple[bool, dict]:
        """True for disaggregated; and the cell that decided, for the job's placement record."""
        i, j = self.cell(prompt_len, output_len)
        colocated, disagg = self.colocated_ms[i][j], self.disagg_ms[i][j]
        return disagg < colocated, {"cell": [self.prefill_lens[i], self.ratios[j]],
                                    "colocated_ms": round(colocated, 1), "disagg_ms": round(disagg, 1)}

    def table(self) -> str:
        """Rows: prefill length; columns: decode/prefill ratio; each cell 'colocated / disaggregated
        ms' and the faster mode (C or D)."""
        head = ["prefill \\ ratio"] + [f"{r:g}" for r in self.ratios]
        rows = [head]
        for i, p in enumerate(self.prefill_lens):
            rows.append([str(p)] + [f"{c:.0f} / {d:.0f} {'D' if d < c else 'C'}"
                                    for c, d in zip(self.colocated_ms[i], self.disagg_ms[i])])
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:],
                          "cells: mean JCT colocated / disaggregated (ms), faster: C or D", self.setup])


class DecodeLengthPredictor:
    def __init__(self, window: int = 64):
        self.history: dict[int, deque[int]] = defaultdict(lambda: deque(maxlen=window))

    @staticmethod
    def bucket(prompt_len: int) -> int:
        return max(0, prompt_len - 1).bit_length()  # 1, 2, 3-4, 5-8, ... tokens

    def observe(self, prompt_len: int, output_len: int) -> None:
        self.history[self.bucket(prompt_len)].append(output_len)

    def predict(self, prompt_len: int, max_tokens: int) -> int:
        seen = self.history.get(self.bucket(prompt_len))
        return min(max_tokens, round(median(seen))) if seen else max_tokens
