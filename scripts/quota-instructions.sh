#!/usr/bin/env bash
# Instructions the quota server runs per ShouldRateLimit decision (memory
# backend, one serving thread) and per gRPC health check (the transport
# alone), counted by callgrind while h2load sends a fixed number of calls
# (-c16 -m16, as Envoy calls a rate limit service): repeatable on a loaded
# machine, unlike timings. Counting starts after a warm-up (callgrind_control
# zeroes the counters) and is dumped after the calls. SLUICE_BIN picks the
# binary (default: the bench profile's, which keeps symbols); QUOTA_CALLS the
# calls per measurement (default 10,000); SLUICE_COST_KEEP=DIR keeps the
# profiles (callgrind_annotate --inclusive=yes DIR/rls.out).
set -euo pipefail

for tool in valgrind callgrind_control h2load; do
    if ! command -v "$tool" >/dev/null; then
        echo "quota-instructions: $tool is missing (make setup; apt-get install valgrind)" >&2
        exit 1
    fi
done

bin=${SLUICE_BIN:-}
if [[ -z "$bin" ]]; then
    # The release profile keeps symbols under `bench`, for callgrind_annotate.
    bin=$(cargo build --profile bench -p sluice-quota-server --bin sluice --message-format=json |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sluice":
        print(m["executable"])
' | tail -n 1)
fi
calls=${QUOTA_CALLS:-10000}

out=$(mktemp -d)
server=
cleanup() {
    if [[ -n "$server" ]]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$out"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$out/bench.yaml" <<'YAML'
domain: bench
descriptors:
  - key: h2load
    rate_limit: {unit: second, requests_per_unit: 100000000}
YAML
cat >"$out/sluice.yaml" <<YAML
listen: {grpc: "127.0.0.1:$port", admin: "127.0.0.1:0", request_timeout: 5s, worker_threads: 1}
storage: {backend: memory}
descriptor_files: [{path: bench.yaml}]
YAML
# gRPC frames: a RateLimitRequest (domain bench, one descriptor h2load=client,
# hits_addend 1), and an empty HealthCheckRequest.
printf '\x00\x00\x00\x00\x1d\x0a\x05bench\x12\x12\x0a\x10\x0a\x06h2load\x12\x06client\x18\x01' >"$out/rls.grpc"
printf '\x00\x00\x00\x00\x00' >"$out/health.grpc"

valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
    "$bin" serve --config "$out/sluice.yaml" >"$out/server.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
    if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        break
    fi
    sleep 0.5
done

rls=/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit
health=/grpc.health.v1.Health/Check
h2() {
    h2load -c16 -m16 -t1 -H content-type:application/grpc -H te:trailers -n "$1" -d "$out/$2" \
        "http://127.0.0.1:$port$3"
}

# Prints the instructions per call of `calls` calls of body $1 to path $2,
# each of which must be answered with HTTP 200; keeps the profile as $3.
per_call() {
    callgrind_control -z "$server" >/dev/null 2>&1
    local answered
    answered=$(h2 "$calls" "$1" "$2" | sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p')
    callgrind_control -d "$server" >/dev/null 2>&1
    if [[ "$answered" != "$calls" ]]; then
        echo "quota-instructions: $answered of $calls calls to $2 answered" >&2
        exit 1
    fi
    local dump
    dump=$(ls -t "$out"/callgrind.out.* | head -n 1)
    mv "$dump" "$out/$3"
    local total
    total=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$out/$3")
    echo $((total / calls))
}

h2 2000 rls.grpc "$rls" >/dev/null
h2 2000 health.grpc "$health" >/dev/null
decision=$(per_call rls.grpc "$rls" rls.out)
transport=$(per_call health.grpc "$health" health.out)
echo "quota_instructions_per_decision: $decision"
echo "quota_instructions_per_health_check: $transport"
if [[ -n "${SLUICE_COST_KEEP:-}" ]]; then
    mkdir -p "$SLUICE_COST_KEEP"
    cp "$out/rls.out" "$out/health.out" "$SLUICE_COST_KEEP/"
    echo "callgrind profiles: $SLUICE_COST_KEEP/rls.out, health.out (callgrind_annotate --inclusive=yes)"
fi
