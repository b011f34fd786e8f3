"""The benchmark figures, drawn with matplotlib from the JSON the benchmarks save.

One function per figure, each taking the loaded results and the PNG path to write:

- `latency_cdfs`: CDFs of TTFT, TPOT and E2E latency of one `serve_bench.py --save-result`
  run (what `serve_bench.py --plot` draws);
- `scaling_timeline`: the five-step start-up timeline of a TE per start mode, stacked bars,
  from `bench/scaling.py` (bench/results/scaling.json);
- `pd_heatmap`: JCT(colocated) / JCT(disaggregated) - 1 per prefill length and decode/prefill
  ratio, from `deepflow.py profile-pd --out bench/results/pd_heatmap.json`;
- `locality_ttft`: TTFT CDFs of round-robin vs locality-aware placement per KV budget, from
  `bench/locality.sh` (bench/results/locality-*.json).

Matplotlib is a benchmark dependency (requirements-test.txt), never a server one.

    python bench/plots.py                                 # every figure whose results exist
    python bench/plots.py --cdf bench/results/run.json    # one run's CDFs, as run.png
"""
from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.ticker import LogLocator, NullFormatter, PercentFormatter, StrMethodFormatter

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DPI = 100
STEPS = ("scaler_pre", "te_pre_load", "te_load", "te_post_load", "scaler_post")
START_MODES = ("fork", "preloaded", "peer", "cold")
POLICY_NAMES = {"rr": "round-robin", "locality": "locality-aware"}
POLICY_STYLES = {"rr": {"color": "tab:red", "linestyle": "--"}, "locality": {"color": "tab:blue"}}


def save(fig: plt.Figure, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path} ({Path(path).stat().st_size / 1024:.0f} KB)")


def plot_cdf(ax: plt.Axes, values_ms: list[float], label: str, **style) -> None:
    """An empirical CDF as a step line (y: fraction of requests at or below x)."""
    xs = np.sort(np.asarray(values_ms, dtype=float))
    ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label, **style)


# --------------------------------------------------------------------------- serve_bench


def workload_title(args: dict) -> str:
    """One line naming a serve_bench run's workload, from its saved arguments."""
    if args["workload"] == "shared-prefix":
        shape = (f"shared-prefix: {args['num_prefixes']} system prompts of {args['prefix_len']} words, "
                 f"{args['num_users']} users × {args['input_len']} words")
    else:
        shape = f"random: {args['input_len']}-word prompts"
    rate = args["request_rate"]
    pace = f"Poisson {rate:g} req/s" if rate else "all at once"
    if args["max_concurrency"]:
        pace += f", concurrency {args['max_concurrency']}"
    return f"{shape}, {args['output_len']} output tokens, {args['num_prompts']} requests, {pace}"


def latency_cdfs(record: dict, path: str | Path) -> None:
    """TTFT, TPOT and E2E latency CDFs of one serve_bench run, side by side."""
    ok = [r for r in record["requests"] if r["success"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, (key, name) in zip(axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E latency"))):
        values = [1e3 * r[key] for r in ok if key != "tpot" or r["output_tokens"] > 1]
        plot_cdf(ax, values, f"{name} (p50 {np.median(values):.0f} ms)")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_xlim(left=0)
        ax.locator_params(axis="x", nbins=5)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[0].set_ylabel("fraction of requests")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle(f"{workload_title(record['args'])}\n{len(ok)} requests to {record['args']['base_url']}",
                 fontsize=10)
    save(fig, path)


# --------------------------------------------------------------------------- scaling


def scaling_timeline(data: dict, path: str | Path) -> None:
    """Stacked horizontal bars: the five start-up steps (ms) of a TE, one bar per start mode."""
    rows = {r["mode"]: r for r in data["timeline"]}
    modes = [m for m in START_MODES if m in rows]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = np.zeros(len(modes))
    for step, color in zip(STEPS, plt.get_cmap("tab10").colors):
        widths = np.array([rows[m][step] for m in modes])
        ax.barh(modes, widths, left=left, color=color, label=step)
        left += widths
    for y, (mode, total) in enumerate(zip(modes, left)):
        first_token = rows[mode].get("first_token_ms")  # peer: a 2nd TE, no request waits on it
        note = f"; first token {first_token:.0f} ms" if first_token else ""
        ax.annotate(f" {total:.0f} ms{note}", (total, y), va="center", fontsize=9)
    ax.set_xlim(0, left.max() * 1.35)
    ax.invert_yaxis()  # the fastest mode on top
    ax.set_xlabel("time since the scale-out decision (ms)")
    ax.set_title("Five-step start-up timeline of one TE, by start mode")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(ncols=len(STEPS), loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=8, frameon=False)
    save(fig, path)


# --------------------------------------------------------------------------- PD heatmap


def ratio_label(ratio: float) -> str:
    return str(Fraction(ratio).limit_denominator(256))


def pd_heatmap(data: dict, path: str | Path) -> None:
    """The PD heatmap as a coloured grid, centred at 0 (positive: disaggregated wins)."""
    colocated, disagg = np.asarray(data["colocated_ms"]), np.asarray(data["disagg_ms"])
    gain = colocated / disagg - 1
    limit = max(float(np.abs(gain).max()), 0.05)
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * gain.shape[1], 1.6 + 0.9 * gain.shape[0]))
    image = ax.imshow(gain, cmap="RdBu", norm=Normalize(-limit, limit), aspect="auto")
    for (i, j), value in np.ndenumerate(gain):
        text_color = "white" if abs(value) > 0.6 * limit else "black"
        ax.text(j, i, f"{value:+.0%}\n{colocated[i, j]:.0f} / {disagg[i, j]:.0f} ms",
                ha="center", va="center", fontsize=9, color=text_color)
    ax.set_xticks(range(len(data["ratios"])), [ratio_label(r) for r in data["ratios"]])
    ax.set_yticks(range(len(data["prefill_lens"])), data["prefill_lens"])
    ax.set_xlabel("decode tokens / prefill tokens")
    ax.set_ylabel("prefill length (tokens)")
    ax.set_title("JCT(colocated) / JCT(disaggregated) − 1,\nwith both mean JCTs (colocated / disaggregated)",
                 fontsize=10)
    fig.colorbar(image, ax=ax, format=PercentFormatter(xmax=1), label="positive: disaggregated wins")
    save(fig, path)


# --------------------------------------------------------------------------- locality


def locality_ttft(runs: list[dict], path: str | Path) -> None:
    """TTFT CDFs of round-robin vs locality-aware placement, one panel per KV budget.

    `runs`: serve_bench records with the "server" entry bench/locality.sh adds."""
    budgets = sorted({r["server"]["kv_cache_gb"] for r in runs}, reverse=True)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.6), sharey=True, squeeze=False)
    for ax, kv in zip(axes[0], budgets):
        for run in sorted((r for r in runs if r["server"]["kv_cache_gb"] == kv),
                          key=lambda r: r["server"]["policy"] != "rr"):
            policy, hits = run["server"]["policy"], run["server"]["prefix_cache_hit_rate"]
            ttft = [1e3 * r["ttft"] for r in run["requests"] if r["success"]]
            label = (f"{POLICY_NAMES[policy]}: {hits:.0%} prefix hits,\n"
                     f"TTFT p50 {np.median(ttft):.0f} ms, p99 {np.percentile(ttft, 99):.0f} ms")
            plot_cdf(ax, ttft, label, **POLICY_STYLES[policy])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("TTFT (ms, log scale)")
        ax.set_title(f"KV cache {kv:g} GB per TE", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=8)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].set_ylim(0, 1.02)
    fig.suptitle("Two colocated TEs; " + workload_title(runs[0]["args"]), fontsize=10)
    fig.tight_layout()
    save(fig, path)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results", help="where the benchmarks saved")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/img", help="where the PNGs go")
    ap.add_argument("--cdf", type=Path, metavar="RUN.json", help="only the CDFs of this serve_bench result")
    args = ap.parse_args()
    if args.cdf:
        latency_cdfs(json.loads(args.cdf.read_text()), args.cdf.with_suffix(".png"))
        return
    if (f := args.results / "scaling.json").exists():
        scaling_timeline(json.loads(f.read_text()), args.out / "scaling_timeline.png")
    if (f := args.results / "pd_heatmap.json").exists():
        pd_heatmap(json.loads(f.read_text()), args.out / "pd_heatmap.png")
    if runs := [json.loads(f.read_text()) for f in sorted(args.results.glob("locality-*.json"))]:
        locality_ttft(runs, args.out / "locality_ttft.png")


if __name__ == "__main__":
    main()
