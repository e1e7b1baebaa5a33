#!/usr/bin/env python3
"""Summarise `cargo bench -p sluice-core --bench algorithms` (core/benches/algorithms.rs).

Reads criterion's estimates under <target>/criterion (the target directory
from `cargo metadata`, which honours CARGO_TARGET_DIR; CRITERION_HOME wins
if set), prints every result in ns per decision, then

    core_checkout_vs_governor_ratio: Y
    core_vs_governor_ratio: X

where X = Sluice / governor for the hot-key GCRA case, the same work on
both sides: the median of hot_key/sluice_inplace/gcra (the store's
one-step keyed decision, MemoryStore::acquire, which the engine uses for
a single rule) over the median of hot_key/governor_keyed_fake_clock_foldhash
(governor's keyed DashMap limiter on the same simulated time). Both hash
the same String key with foldhash (hashbrown's default, the hasher
Sluice's MemoryStore uses), look it up and take one GCRA step; the bench
checks every answer. Y is the same for the checkout path,
hot_key/sluice_checkout/gcra (MemoryStore through the StateStore trait:
load, check, save). Medians, not means: on a shared 2-core machine a
preempted sample moves the mean far more. Below 1 means the core is faster.

For information it also prints the ratio against governor with its default
hasher (SipHash-1-3) and the production paths in ns per decision: the
filter's (engine over SlotStore) and the quota server's (engine over a
SipHash-picked shard's Mutex<MemoryStore>).

Exits 1 if any of these three results is missing (run the bench first).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HEADLINE_SLUICE = "hot_key/sluice_inplace/gcra"
CHECKOUT_SLUICE = "hot_key/sluice_checkout/gcra"
HEADLINE_GOVERNOR = "hot_key/governor_keyed_fake_clock_foldhash"
SIPHASH_GOVERNOR = "hot_key/governor_keyed_fake_clock_siphash"
# Production paths, each with what it measures.
PRODUCTION = (
    ("hot_key/sluice_engine/gcra",
     "engine::decide_keys, one rule, over a single-owner MemoryStore"),
    ("hot_key/sluice_engine_slot_store/gcra",
     "the Envoy filter's path: engine over SlotStore (slot codec + compare-and-swap) "
     "on InProcessShared, the in-process double of Envoy shared data"),
    ("hot_key/sluice_engine_sharded_mutex/gcra",
     "the quota server's memory path: SipHash shard pick, uncontended Mutex<MemoryStore>, "
     "engine::decide_claims_unlisted"),
)
GROUPS = ("hot_key", "distinct_1m", "hot_key_denied")


def criterion_dir() -> Path:
    home = os.environ.get("CRITERION_HOME")
    if home:
        return Path(home)
    repo = Path(__file__).resolve().parent.parent
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(json.loads(meta.stdout)["target_directory"]) / "criterion"


def load(root: Path) -> dict:
    """full_id -> (median ns, mean ns) for every benchmark of our groups."""
    results = {}
    for group in GROUPS:
        for bench in sorted((root / group).glob("**/new/benchmark.json")):
            meta = json.loads(bench.read_text())
            est = json.loads((bench.parent / "estimates.json").read_text())
            results[meta["full_id"]] = (
                est["median"]["point_estimate"],
                est["mean"]["point_estimate"],
            )
    return results


def ratio_line(name: str, results: dict, sluice: str, governor: str) -> str:
    return f"{name}: {results[sluice][0] / results[governor][0]:.3f}"


def main() -> int:
    root = criterion_dir()
    results = load(root)
    missing = [k for k in (HEADLINE_SLUICE, CHECKOUT_SLUICE, HEADLINE_GOVERNOR) if k not in results]
    if missing:
        print(f"bench-core-ratio: no criterion results for {', '.join(missing)} under {root}",
              file=sys.stderr)
        return 1

    width = max(len(k) for k in results)
    print(f"{'benchmark':<{width}}  {'median ns':>10}  {'mean ns':>10}")
    for group in GROUPS:
        rows = sorted(k for k in results if k.split("/", 1)[0] == group)
        for key in rows:
            median, mean = results[key]
            print(f"{key:<{width}}  {median:>10.1f}  {mean:>10.1f}")
    print()
    print("production paths, hot key, GCRA (ns per decision, median):")
    for key, what in PRODUCTION:
        if key in results:
            print(f"  {key}: {results[key][0]:.1f} ns  ({what})")
    print()
    print("(ratios: medians; the same hasher, foldhash, on both sides of the headline:")
    print(f" {HEADLINE_SLUICE} and {CHECKOUT_SLUICE} over {HEADLINE_GOVERNOR})")
    if SIPHASH_GOVERNOR in results:
        print(ratio_line("core_vs_governor_siphash_ratio (information: governor with its default "
                         "SipHash)", results, HEADLINE_SLUICE, SIPHASH_GOVERNOR))
    print(ratio_line("core_checkout_vs_governor_ratio", results, CHECKOUT_SLUICE, HEADLINE_GOVERNOR))
    print(ratio_line("core_vs_governor_ratio", results, HEADLINE_SLUICE, HEADLINE_GOVERNOR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
