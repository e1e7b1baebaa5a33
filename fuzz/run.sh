#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time.
#
#   fuzz/run.sh [TARGET...]     (default: every target in fuzz/Cargo.toml)
#
# FUZZ_SECONDS   seconds per target (default 30), passed as -max_total_time
# FUZZ_TOOLCHAIN nightly | stable (default: nightly if installed, else stable)
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET, read only)
# and its local corpus (fuzz/corpus/TARGET, ignored by git, grows per run).
# A crash, a failed assertion or a leak fails the run and leaves the input in
# fuzz/artifacts/TARGET.
#
# On nightly, targets run under AddressSanitizer (cargo-fuzz's default). On
# stable, cargo-fuzz still works for plain libFuzzer builds with
# RUSTC_BOOTSTRAP=1 and `-s none` (no sanitizer; panics and aborts are still
# caught, and safe Rust needs ASan little).
set -euo pipefail

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${FUZZ_SECONDS:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

toolchain="${FUZZ_TOOLCHAIN:-}"
if [[ -z "$toolchain" ]]; then
    if rustup run nightly rustc --version >/dev/null 2>&1; then
        toolchain=nightly
    else
        toolchain=stable
    fi
fi

case "$toolchain" in
    nightly)
        fuzz=(cargo +nightly fuzz)
        sanitizer=()
        ;;
    stable)
        export RUSTC_BOOTSTRAP=1
        fuzz=(cargo fuzz)
        sanitizer=(-s none)
        ;;
    *)
        echo "run.sh: FUZZ_TOOLCHAIN must be nightly or stable, not '$toolchain'" >&2
        exit 2
        ;;
esac

if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir "$fuzz_dir")
fi

echo "run.sh: toolchain=$toolchain sanitizer=${sanitizer[*]:-address} seconds=$seconds targets=${targets[*]}"
for target in "${targets[@]}"; do
    echo "run.sh: === $target ==="
    started=$SECONDS
    corpus=("$fuzz_dir/corpus/$target")
    mkdir -p "${corpus[0]}"
    [[ -d "$fuzz_dir/seeds/$target" ]] && corpus+=("$fuzz_dir/seeds/$target")
    "${fuzz[@]}" run --fuzz-dir "$fuzz_dir" "${sanitizer[@]}" "$target" "${corpus[@]}" -- \
        -max_total_time="$seconds"
    echo "run.sh: $target ran clean in $((SECONDS - started))s (build included)"
done
