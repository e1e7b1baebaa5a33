#!/usr/bin/env python3
"""Summarise one `make bench` run: the headline figures of every harness.

Reads the logs `make bench` keeps (one per harness, given as arguments),
takes every `label: number` line the harnesses print, and prints a Markdown
table of the figures issue targets are set on: the figure, what it
measures, the target and whether this run met it. A figure a harness did
not print (a skipped step, a failed run) shows as "missing" and makes the
script exit 1, so a summary never hides a gap.

The same table goes into README.md's "Benchmarks" section.
"""

import re
import sys
from pathlib import Path

# (label, what it measures, comparison, target); comparison is ">=", "<="
# or "" (printed for information, no target).
FIGURES = [
    ("core_vs_governor_ratio",
     "core: ns per keyed GCRA decision on a hot key over governor's (same hasher)", "<=", 1.0),
    ("filter_vs_noop_wasm_rps_ratio",
     "Envoy req/s with Sluice (one per-IP rule, default headers) over an empty wasm filter", ">=", 0.90),
    ("filter_vs_nofilter_rps_ratio",
     "the same over Envoy without filters", ">=", 0.75),
    ("filter_over_noop_wasm_cpu_us",
     "Envoy CPU µs per request Sluice adds over the empty wasm filter", "", None),
    ("grpc_vs_nofilter_rps_ratio",
     "gRPC unary calls/s with Sluice limiting calls and messages over no filter", ">=", 0.85),
    ("ws_vs_nofilter_msgs_ratio",
     "WebSocket messages/s with Sluice limiting messages over no filter", ">=", 0.85),
    ("grpc_noop_wasm_vs_nofilter_rps_ratio",
     "gRPC unary calls/s with the empty wasm filter over no filter: the ceiling of the gRPC target", "", None),
    ("grpc_vs_noop_wasm_rps_ratio",
     "gRPC unary calls/s with Sluice over the empty wasm filter", "", None),
    ("grpc_over_noop_wasm_cpu_us",
     "Envoy CPU µs per gRPC call Sluice adds over the empty wasm filter", "", None),
    ("ws_noop_wasm_vs_nofilter_msgs_ratio",
     "WebSocket messages/s with the empty wasm filter over no filter: the ceiling of the WebSocket target", "", None),
    ("ws_vs_noop_wasm_msgs_ratio",
     "WebSocket messages/s with Sluice over the empty wasm filter", "", None),
    ("ws_over_noop_wasm_cpu_us",
     "Envoy CPU µs per WebSocket message Sluice adds over the empty wasm filter", "", None),
    ("quota_memory_h2load",
     "quota server, memory: decisions/s, h2load -c16 -m16, one port", ">=", 100_000),
    ("quota_memory_vs_health_ratio",
     "the same over the server's gRPC health check (transport only)", "", None),
    ("quota_memory_h2load_1thread",
     "the same with `listen.worker_threads: 1`", "", None),
    ("native_ratelimit_vs_nofilter_rps_ratio",
     "Envoy req/s with its native rate limit filter calling the server over none", "", None),
    ("native_ratelimit_added_p50_ms",
     "p50 latency that adds under load (ms)", "", None),
    ("native_ratelimit_added_p99_ms",
     "p99 latency that adds under load (ms)", "", None),
    # The Redis target is set on the run where both sides have an
    # independent C client at the same concurrency: with 32 of the bench's
    # own tonic callers, the client's CPU per decision (printed as
    # `quota_redis_cpu_us_per_decision`) bounds the server on 2 cores.
    ("quota_redis_h2load_vs_raw_redis_256_ratio",
     "quota server on Redis: decisions/s, h2load -c16 -m16 on one key, over "
     "redis-benchmark -c256 calling the script once per decision on that key", ">=", 1.0),
    ("quota_redis_vs_raw_redis_ratio",
     "the same with 32 of the bench's own callers on 1,000 keys over the faster of "
     "redis-benchmark and the redis crate at 32", "", None),
    ("exact_added_p50_ms",
     "exact mode: p50 latency added over a local rule (ms)", "<=", 0.3),
    ("exact_added_p99_ms",
     "exact mode: p99 latency added over a local rule (ms)", "", None),
    ("exact_vs_native_global_rps_ratio",
     "exact mode req/s over Envoy's native global rate limit filter", ">=", 1.0),
    ("leased_vs_local_rps_ratio",
     "leased mode req/s over a local rule", ">=", 0.95),
    ("leased_overshoot_pct",
     "leased mode: worst window's admissions above the fleet limit (%)", "<=", 0.0),
    ("leased_undershoot_pct",
     "leased mode: worst window's shortfall below the fleet limit (%)", "<=", 2.0),
]

LINE = re.compile(r"^([a-z][a-z0-9_]*): (-?[0-9][0-9.]*)")


def read_figures(paths):
    """Every `label: number` line of the logs; a later line wins."""
    found = {}
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            match = LINE.match(line.strip())
            if match:
                found[match.group(1)] = float(match.group(2))
    return found


def verdict(value, comparison, target):
    if not comparison:
        return ""
    ok = value >= target if comparison == ">=" else value <= target
    return "met" if ok else "missed"


def number(value):
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != 0 else "0"


def main(paths):
    if not paths:
        print("usage: bench-summary.py LOG...", file=sys.stderr)
        return 2
    found = read_figures(paths)
    missing = []
    print("| figure | what it measures | this run | target | |")
    print("|---|---|---|---|---|")
    for label, meaning, comparison, target in FIGURES:
        target_text = f"{comparison} {number(target)}" if comparison else ""
        if label not in found:
            missing.append(label)
            print(f"| `{label}` | {meaning} | missing | {target_text} | |")
            continue
        value = found[label]
        print(f"| `{label}` | {meaning} | {number(value)} | {target_text} "
              f"| {verdict(value, comparison, target)} |")
    if missing:
        print(f"\nbench-summary: missing from the logs: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
