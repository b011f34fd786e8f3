"""The PD-aware step of dist_sched (PAPER.md section 5): colocated or disaggregated?

`Heatmap` is this machine's measurement (`python deepflow.py profile-pd`,
`scheduler/pd_profile.py`): for a grid of prefill lengths (rows) and decode/prefill ratios
(columns), the job completion time of a job run colocated and run disaggregated. A job
goes to the cell nearest its prompt length and predicted ratio (nearest on a log scale:
the grid is geometric) and to whichever mode was faster there.

The decode length is not known when a job arrives, so `DecodeLengthPredictor` guesses it
from requests that finished before: the output lengths of the most similar earlier prompts
(the paper uses a small classifier; this is its simplest learned stand-in).
"""
import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


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
        """Rows: prefill length; columns: decode/prefill ratio; each cell the paper's figure,
        JCT(colocated) / JCT(disaggregated) - 1 (positive: disaggregated wins), and both JCTs."""
        head = ["prefill \\ ratio"] + [f"{r:g}" for r in self.ratios]
        rows = [head]
        for i, p in enumerate(self.prefill_lens):
            rows.append([str(p)] + [f"{c / d - 1:+.0%} ({c:.0f}/{d:.0f})"
                                    for c, d in zip(self.colocated_ms[i], self.disagg_ms[i])])
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:],
                          "cells: JCT colocated / disaggregated - 1, positive = disaggregated wins "
                          "(mean JCT colocated/disaggregated, ms)", self.setup])


class DecodeLengthPredictor:
    """k nearest neighbours among the last `window` finished requests. A prompt is described
    by its bag of token ids, hashed into `dims` counts and normalised (which words it uses:
    "capital of", "write a story", "summarize" ask for very different lengths, and prompts
    of one kind share them); the prediction is the median output length of the `k` most
    similar prompts (cosine), capped by max_tokens. Before any history it is max_tokens."""

    def __init__(self, window: int = 256, k: int = 5, dims: int = 1024):
        self.k, self.dims = k, dims
        self.features: deque[np.ndarray] = deque(maxlen=window)
        self.lengths: deque[int] = deque(maxlen=window)

    def _features(self, prompt_ids: list[int]) -> np.ndarray:
        v = np.bincount(np.asarray(prompt_ids) % self.dims, minlength=self.dims).astype(np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-9)

    def observe(self, prompt_ids: list[int], output_len: int) -> None:
        self.features.append(self._features(prompt_ids))
        self.lengths.append(output_len)

    def predict(self, prompt_ids: list[int], max_tokens: int) -> int:
        if not self.lengths:
            return max_tokens
        similarity = np.stack(self.features) @ self._features(prompt_ids)
        nearest = np.argsort(-similarity, kind="stable")[:self.k]
        return min(max_tokens, int(np.median(np.asarray(self.lengths)[nearest])))
