//! The README's first command, `make demo`, runs the `demo` binary: run it
//! here too, so a change that breaks it fails `make test`, and check that
//! its summary says what the stack's rules promise.
//!
//! Needs Envoy (`make setup`), the filter (`make wasm`) and the `sluice`
//! binary (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use sluice_e2e::stack::demo::{leased_floor, GRPC_CALLS, HTTP_REQUESTS, WS_MESSAGES, WS_UPGRADES};
use sluice_e2e::stack::files;
use sluice_e2e::stack::local::ENVOY_NAMES;

/// A table row: allowed and limited for envoy-a, envoy-b and the fleet,
/// and the fleet-wide limit (`None`: a local rule).
#[derive(Debug)]
struct Row {
    allowed: [u64; 3],
    limited: [u64; 3],
    limit: Option<u64>,
}

/// The row `<what> <rule> ...` of the summary's table.
fn row(stdout: &str, what: &str, rule: &str) -> Row {
    let line = stdout
        .lines()
        .find(|l| l.split_whitespace().take(2).eq([what, rule]))
        .unwrap_or_else(|| panic!("no row {what} {rule} in:\n{stdout}"));
    let cells: Vec<&str> = line.split_whitespace().skip(2).collect();
    assert_eq!(cells.len(), 7, "{line}");
    let n = |i: usize| cells[i].parse::<u64>().unwrap();
    let row = Row {
        allowed: [n(0), n(2), n(4)],
        limited: [n(1), n(3), n(5)],
        limit: cells[6].parse().ok(),
    };
    assert_eq!(row.allowed[0] + row.allowed[1], row.allowed[2], "{line}");
    assert_eq!(row.limited[0] + row.limited[1], row.limited[2], "{line}");
    row
}

#[test]
fn demo_admits_the_fleet_limits_through_both_envoys() {
    let output = Command::new(env!("CARGO_BIN_EXE_demo"))
        .output()
        .expect("running the demo binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let filter = files::filter_config().unwrap();
    let modes = files::sync_modes(&filter).unwrap();
    let limits = files::quota_limits().unwrap();
    for (what, rule, sent) in [
        ("http", "api", HTTP_REQUESTS),
        ("grpc", "grpc-calls", GRPC_CALLS),
        ("ws-upgrade", "ws-upgrades", WS_UPGRADES),
    ] {
        let row = row(&stdout, what, rule);
        let limit = limits[rule];
        assert_eq!(row.limit, Some(limit), "{what}: the limit of sluice.yaml");
        assert!(
            sent as u64 > limit,
            "{what}: the demo must exceed the limit"
        );
        assert_eq!(row.allowed[2] + row.limited[2], sent as u64, "{what}");
        match modes[rule].as_str() {
            // The quota server decides every request: exactly the limit.
            "exact" => assert_eq!(row.allowed[2], limit, "{what}:\n{stdout}"),
            // From leases: never above the limit, never below the
            // documented floor (the demand is sustained on both Envoys).
            "leased" => {
                let lease = files::max_lease(&filter, rule).unwrap();
                let floor = leased_floor(limit, ENVOY_NAMES.len() as u64, lease);
                assert!(
                    floor > 0 && (floor..=limit).contains(&row.allowed[2]),
                    "{what}: {} admitted, outside [{floor}, {limit}]:\n{stdout}",
                    row.allowed[2]
                );
                assert!(
                    stdout.contains(&format!("documented floor {floor} ")),
                    "{stdout}"
                );
            }
            other => panic!("{what}: unknown mode {other}"),
        }
        assert!(
            stdout.contains(&format!("{what:<10}: {}, fleet-wide", modes[rule])),
            "{what}: its mode is shown:\n{stdout}"
        );
        assert!(
            row.allowed[0] > 0 && row.allowed[1] > 0,
            "{what}: both Envoys admitted some:\n{stdout}"
        );
    }

    // Each open connection sends WS_MESSAGES against a local limit per
    // connection: the limit passes, the next one closes the connection.
    let per_connection = files::local_limit(&filter, "ws-messages").unwrap();
    let connections = row(&stdout, "ws-upgrade", "ws-upgrades").allowed[2];
    let messages = row(&stdout, "ws-message", "ws-messages");
    assert!(WS_MESSAGES as u64 > per_connection);
    assert_eq!(messages.limit, None, "a local rule has no fleet limit");
    assert_eq!(
        messages.allowed[2],
        connections * per_connection,
        "{stdout}"
    );
    assert_eq!(messages.limited[2], connections, "{stdout}");
    assert!(
        stdout.contains("Close 1008 \"rate limited: ws-messages\""),
        "{stdout}"
    );

    // The demo shows both modes.
    assert!(modes.values().any(|m| m == "exact"), "{modes:?}");
    assert!(modes.values().any(|m| m == "leased"), "{modes:?}");

    // The ban reached both Envoys (403), and its lifting too.
    for name in ENVOY_NAMES {
        assert!(
            stdout.contains(&format!(
                "banned {name}: HTTP 403 {{\"error\":\"access_denied\"}}"
            )),
            "{stdout}"
        );
        let lifted = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("lifted {name}: HTTP ")))
            .unwrap_or_else(|| panic!("no lifted line for {name}:\n{stdout}"));
        assert!(
            lifted.starts_with("200") || lifted.starts_with("429"),
            "{stdout}"
        );
    }

    // The headers of an allowed and a refused reply are shown.
    assert!(stdout.contains("x-ratelimit-remaining: 0"), "{stdout}");
    assert!(stdout.contains("retry-after: "), "{stdout}");
    assert!(
        stdout.contains("Stopped every process of the stack"),
        "{stdout}"
    );
}
