"""Prometheus metrics at `/metrics`, named like vLLM's under a `deepflow:` prefix.

Latency histograms and token counters are recorded by the JE when a job finishes; the
engine-side figures (running, waiting, KV usage, prefix-cache queries and hits) and the
autoscalers' decisions are read from the TEs and clusters at scrape time, so they are never
stale copies. Each base model's recent (time, TTFT, TPOT) feed its autoscalers' SLO checks
(`scaling/autoscaler.py`).
"""
import time
from collections import deque
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "deepflow:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
RECENT_KEPT = 512  # latencies per base model the autoscalers look back on


class Metrics:
    def __init__(self, clusters: dict, slo_ttft_s: dict[str, float] | None = None):
        """`clusters`: each base model's, by name (a LoRA adapter's requests count under its
        own name). `slo_ttft_s`: each base model's TTFT target (absent or 0: none)."""
        self.registry = r = CollectorRegistry()
        self.clusters, self.slo_ttft_s = clusters, slo_ttft_s or {}
        self.recent: dict[str, deque] = {m: deque(maxlen=RECENT_KEPT) for m in clusters}
        self.slo_met = {m: [0, 0] for m in clusters}  # requests within the TTFT SLO, requests
        labels = ["model_name"]
        latency = partial(Histogram, labelnames=labels, buckets=LATENCY_BUCKETS, registry=r)
        per_token = partial(Histogram, labelnames=labels, buckets=TOKEN_BUCKETS, registry=r)
        self.ttft = latency(P + "time_to_first_token_seconds", "Time to first token")
        self.tpot = per_token(P + "time_per_output_token_seconds", "Time per output token after the first")
        self.e2e = latency(P + "e2e_request_latency_seconds", "End-to-end request latency")
        self.kv_transfer = per_token(P + "kv_transfer_seconds", "KV transfer, prefill TE to decode TE (PD)")
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", labels, registry=r)
        self.requests = Counter(P + "request_success", "Finished requests", labels + ["finished_reason"], registry=r)
        r.register(self)  # collect() below: engine-side figures

    def job_done(self, job, base: str) -> None:
        """`job` of base model `base` finished (its `model` may name an adapter over it)."""
        if any(t.params.low_priority for t in job.tasks):
            return  # batch work: no SLO's latency
        m = job.model
        for t in job.tasks:
            if t.t_first_token is None:
                continue
            ttft, tpot = t.t_first_token - job.t_arrival, None
            self.ttft.labels(m).observe(ttft)
            if t.num_output > 1 and t.t_done:
                tpot = (t.t_done - t.t_first_token) / (t.num_output - 1)
                self.tpot.labels(m).observe(tpot)
            if base in self.recent:
                self.recent[base].append((time.monotonic(), ttft, tpot))
                self.slo_met[base][0] += ttft <= self.slo_ttft_s.get(base, 0) or not self.slo_ttft_s.get(base)
                self.slo_met[base][1] += 1
            self.requests.labels(m, t.finish_reason.value if t.finish_reason else "unknown").inc()
            if "kv_transfer_ms" in t.placement:
                self.kv_transfer.labels(m).observe(t.placement["kv_transfer_ms"] / 1e3)
            self.generation_tokens.labels(m).inc(t.num_output)
        self.prompt_tokens.labels(m).inc(len(job.tasks[0].prompt_ids))
        self.e2e.labels(m).observe(max(t.t_done or 0 for t in job.tasks) - job.t_arrival)

    def collect(self):
        def family(kind, name, doc, value):
            f = kind(P + name, doc, labels=["model_name"])
            for model, cluster in self.clusters.items():
                f.add_metric([model], value(cluster, [te.stats for te in cluster.tes]))
            return f

        yield family(GaugeMetricFamily, "num_requests_running", "Sequences running in TEs",
                     lambda c, stats: sum(s.running for s in stats))
        yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting: held by the scheduler or "
                     "queued in TEs", lambda c, stats: sum(s.waiting for s in stats) + sum(map(len, c.pending.values())))
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "KV-cache blocks in use (mean over TEs), 0..1",
                     lambda c, stats: sum(s.kv_usage for s in stats) / max(len(stats), 1))
        yield family(GaugeMetricFamily, "num_tes_ready", "TEs ready", lambda c, stats: len(c.ready_tes()))
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                     lambda c, stats: sum(s.prefix_queries for s in stats))
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens served from the prefix cache",
                     lambda c, stats: sum(s.prefix_hits for s in stats))

        decisions = CounterMetricFamily(P + "scaling_decisions", "Autoscaler and /admin/scale size changes",
                                        labels=["model_name", "group", "reason"])
        for model, cluster in self.clusters.items():
            for (group, reason), n in cluster.decision_counts.items():
                decisions.add_metric([model, group, reason], n)
        yield decisions
        slo = GaugeMetricFamily(P + "ttft_slo_attainment", "Share of requests since start with TTFT within the "
                                "model's SLO (1 without one)", labels=["model_name"])
        for model, (met, n) in self.slo_met.items():
            slo.add_metric([model], met / n if n else 1.0)
        yield slo

        steps = GaugeMetricFamily(P + "te_start_step_milliseconds", "Start-up timeline of each TE, step by step",
                                  labels=["te", "start_mode", "step"])
        for cluster in self.clusters.values():
            for te in cluster.tes:
                for step, ms in te.timings_ms.items():
                    steps.add_metric([te.id, te.start_mode, step], ms)
        yield steps

    def render(self) -> bytes:
        return generate_latest(self.registry)
