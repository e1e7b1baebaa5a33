//! The README's first command, `make demo`, runs the `demo` binary: run it
//! here too, so a change that breaks it fails `make test`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// The line `<what>: <allowed> allowed, <limited> limited of <total>`.
fn counts(stdout: &str, what: &str) -> (u32, u32) {
    let prefix = format!("{what}: ");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no summary line for {what} in:\n{stdout}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [allowed, "allowed,", limited, "limited", "of", total] => {
            let (allowed, limited): (u32, u32) =
                (allowed.parse().unwrap(), limited.parse().unwrap());
            assert_eq!(allowed + limited, total.parse::<u32>().unwrap(), "{line}");
            (allowed, limited)
        }
        _ => panic!("unexpected summary line {line:?}"),
    }
}

#[test]
fn demo_runs_and_limits_what_it_says() {
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

    // `login`: 3 per minute per IP, sliding window log: exact.
    assert_eq!(counts(&stdout, "POST /login"), (3, 5), "{stdout}");
    // `api-per-ip`: a bucket of 20 refilled at 10/s; 30 requests in a burst
    // get the 20 plus whatever refilled while they were sent.
    let (allowed, limited) = counts(&stdout, "GET /api/items");
    assert!((20..30).contains(&allowed) && limited > 0, "{stdout}");
    assert!(
        stdout.contains("sluice_http{") || stdout.contains("sluice_http_"),
        "the demo shows the filter's stats:\n{stdout}"
    );
}
