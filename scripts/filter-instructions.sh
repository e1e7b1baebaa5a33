#!/usr/bin/env bash
# Instructions the filter's own code runs per allowed request, counted by
# callgrind natively (envoy-filter/src/plugin/cost_harness.rs): repeatable
# on a loaded machine, unlike timings. The harness runs twice, with 1,000
# and 11,000 requests, so setup cancels out. SLUICE_COST_CONFIG overrides
# the policy (default: bench-filter's one per-IP rule, default headers).
# SLUICE_COST_GRPC=1 makes each request a gRPC unary call (one message
# each way, then trailers).
# SLUICE_COST_WS=1 makes each request a 64-byte message echoed on one
# WebSocket connection (a frame each way), under bench-filter's WebSocket
# rules unless SLUICE_COST_CONFIG says otherwise.
set -euo pipefail

if ! command -v valgrind >/dev/null; then
    echo "filter-instructions: valgrind is missing (apt-get install valgrind)" >&2
    exit 1
fi

# The release profile keeps symbols under `bench`, for callgrind_annotate.
bin=$(cargo test --profile bench -p sluice-filter --lib --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sluice_filter":
        print(m["executable"])
' | tail -n 1)

count() {
    SLUICE_COST_REQUESTS=$1 valgrind --tool=callgrind --callgrind-out-file="$2" \
        "$bin" --ignored --exact plugin::cost_harness::request_cost --test-threads=1 2>&1 |
        sed -n 's/.*Collected : //p'
}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
small=$(count 1000 "$out/small.out")
large=$(count 11000 "$out/large.out")
echo "filter_instructions_per_request: $(((large - small) / 10000))"
if [[ -n "${SLUICE_COST_KEEP:-}" ]]; then
    cp "$out/large.out" "$SLUICE_COST_KEEP"
    echo "callgrind profile of 11,000 requests: $SLUICE_COST_KEEP (callgrind_annotate --inclusive=yes)"
fi
