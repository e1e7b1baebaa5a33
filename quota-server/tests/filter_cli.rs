//! `sluice filter validate` and `sluice filter simulate`, run as a user
//! runs them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

/// Runs `sluice ARGS`, feeding `stdin`.
fn sluice(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let path: PathBuf = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const LOGIN: &str = r#"{"rules": [
  {"name": "login", "match": {"methods": ["POST"], "path": {"exact": "/login"}},
   "key": ["client_ip"], "limit": {"count": 3, "per": "1m"}},
  {"name": "spare", "limit": {"count": 5, "per": "1s"}, "enabled": false}
]}"#;

#[test]
fn validate_accepts_a_good_file_and_standard_input() {
    let dir = TempDir::new().unwrap();
    let good = write(&dir, "filter.json", LOGIN);
    let out = sluice(&["filter", "validate", &good, "-"], LOGIN);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{good}: ok (1 rules, 1 disabled)\n<stdin>: ok (1 rules, 1 disabled)\n")
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn validate_prints_every_error_with_its_path() {
    let dir = TempDir::new().unwrap();
    let good = write(&dir, "good.json", LOGIN);
    let bad = write(
        &dir,
        "bad.json",
        r#"{"rules": [
          {"name": "a", "limit": {"count": 1, "per": "1s"}},
          {"name": "a", "limit": {"count": 0, "per": "1x"}}
        ]}"#,
    );
    let out = sluice(&["filter", "validate", &good, &bad], "");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        format!("{good}: ok (1 rules, 1 disabled)\n")
    );
    let errors = text(&out.stderr);
    let lines: Vec<&str> = errors.lines().collect();
    assert!(lines.len() >= 3, "{errors}");
    for line in &lines {
        assert!(line.starts_with(&format!("{bad}: rules[1].")), "{errors}");
    }
    assert!(
        errors.contains(&format!("{bad}: rules[1].name: duplicate rule name")),
        "{errors}"
    );
    assert!(
        errors.contains(&format!("{bad}: rules[1].limit.count: ")),
        "{errors}"
    );
    assert!(
        errors.contains(&format!("{bad}: rules[1].limit.per: ")),
        "{errors}"
    );

    let syntax = sluice(&["filter", "validate", "-"], "{\"rules\": [");
    assert_eq!(syntax.status.code(), Some(1));
    assert!(
        text(&syntax.stderr).starts_with("<stdin>: invalid JSON"),
        "{}",
        text(&syntax.stderr)
    );
}

#[test]
fn validate_exits_2_when_a_file_cannot_be_read() {
    let dir = TempDir::new().unwrap();
    let bad = write(&dir, "bad.json", r#"{"rules": [{"name": "a"}]}"#);
    let missing = dir.path().join("missing.json").display().to_string();
    let out = sluice(&["filter", "validate", &bad, &missing], "");
    assert_eq!(out.status.code(), Some(2));
    let errors = text(&out.stderr);
    assert!(
        errors.contains(&format!("{bad}: rules[0].limit")),
        "{errors}"
    );
    assert!(
        errors.contains(&format!("{missing}: cannot read")),
        "{errors}"
    );
}

/// The lines of request `#n` of a simulation: its decision and headers.
fn request(output: &str, n: u64) -> Vec<&str> {
    let mut lines = output
        .lines()
        .skip_while(|l| !l.starts_with(&format!("#{n:<5} ")));
    let mut out: Vec<&str> = lines.next().into_iter().collect();
    out.extend(lines.take_while(|l| l.starts_with("  ")).map(str::trim));
    out
}

#[test]
fn simulate_a_login_limit_of_3_per_minute() {
    let dir = TempDir::new().unwrap();
    let config = write(&dir, "filter.json", LOGIN);
    let traffic = write(
        &dir,
        "traffic.txt",
        "# four tries at once, then others\n\
         repeat 4 every 0s POST /login client=10.0.0.1\n\
         after 10s POST /login client=10.0.0.1\n\
         POST /login client=10.0.0.2\n\
         GET /login client=10.0.0.1\n",
    );
    let out = sluice(&["filter", "simulate", &config, "--traffic", &traffic], "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let output = text(&out.stdout);
    for (n, remaining) in [(1, 2), (2, 1), (3, 0)] {
        assert_eq!(
            request(&output, n),
            [
                format!("#{n:<5} t=0ns allowed   POST /login (rules: login)"),
                "ratelimit-policy: \"login\";q=3;w=60".to_owned(),
                // The token bucket refills one permit per 20s: whole
                // again after 20s per permit taken.
                format!(
                    "ratelimit: \"login\";r={remaining};t={}",
                    20 * (3 - remaining)
                ),
            ],
            "{output}"
        );
    }
    assert_eq!(
        request(&output, 4),
        [
            "#4     t=0ns limited   POST /login by login",
            "retry-after: 20",
            "ratelimit-policy: \"login\";q=3;w=60",
            "ratelimit: \"login\";r=0;t=60",
        ],
        "{output}"
    );
    // 10s later the next permit is still 10s away.
    let fifth = request(&output, 5);
    assert_eq!(
        fifth[0], "#5     t=10s limited   POST /login by login",
        "{output}"
    );
    assert!(fifth.contains(&"retry-after: 10"), "{output}");
    // Another client has its own key; a GET matches no rule.
    assert!(
        request(&output, 6)[0].contains("allowed   POST /login (rules: login)"),
        "{output}"
    );
    assert_eq!(
        request(&output, 7),
        ["#7     t=10s allowed   GET /login (no rule applies)"],
        "{output}"
    );
    assert!(
        output.contains("rule login: 4 allowed, 2 limited\n"),
        "{output}"
    );
    assert!(
        output.contains("5 of 7 allowed (0 after a delay), 2 limited\n"),
        "{output}"
    );
}

#[test]
fn simulate_applies_groups_and_the_access_lists() {
    let dir = TempDir::new().unwrap();
    let config = write(
        &dir,
        "filter.json",
        r#"{"rules": [
          {"name": "anonymous", "group": "tier", "limit": {"count": 1, "per": "1m"}},
          {"name": "keyed", "group": "tier", "key": ["header:x-api-key"], "limit": {"count": 3, "per": "1m"},
           "priority": 1}
        ], "access": {"allow": ["10.0.0.0/8"], "deny": ["192.0.2.0/24"]}}"#,
    );
    let traffic = write(
        &dir,
        "traffic.txt",
        "repeat 3 every 0s GET /x client=198.51.100.1 header:x-api-key=k
         repeat 2 every 0s GET /x client=198.51.100.1
         GET /x client=10.1.2.3
         GET /x client=192.0.2.7 header:x-api-key=k
",
    );
    let out = sluice(&["filter", "simulate", &config, "--traffic", &traffic], "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let output = text(&out.stdout);
    let first = |n: u64| request(&output, n)[0].to_owned();
    for n in 1..=3 {
        assert!(
            first(n).ends_with("allowed   GET /x (rules: keyed)"),
            "{output}"
        );
    }
    // Keyed requests took nothing from the anonymous tier's counter.
    assert!(
        first(4).ends_with("allowed   GET /x (rules: anonymous)"),
        "{output}"
    );
    assert!(
        first(5).ends_with("limited   GET /x by anonymous"),
        "{output}"
    );
    assert!(
        first(6).ends_with("allowed   GET /x (allow-listed: no rule applies)"),
        "{output}"
    );
    assert!(
        first(7).ends_with("denied    GET /x (deny-listed: 403)"),
        "{output}"
    );
    assert!(
        output
            .contains("5 of 7 allowed (0 after a delay), 1 limited, 1 denied by the access list\n"),
        "{output}"
    );
}

#[test]
fn simulate_reports_a_bad_script_line() {
    let dir = TempDir::new().unwrap();
    let config = write(&dir, "filter.json", LOGIN);
    let traffic = write(
        &dir,
        "traffic.txt",
        "POST /login\nrepeat 2000000 every 1ms GET /\n",
    );
    let out = sluice(&["filter", "simulate", &config, "--traffic", &traffic], "");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("sluice filter simulate: {traffic}: line 2: the script sends more than 1000000 requests\n")
    );
    assert_eq!(text(&out.stdout), "");
}
