//! Spellings of a limited path must not slip past its limit.
//!
//! A `/api/` rule sees the path Envoy hands the filter. Without the HTTP
//! connection manager's path settings in `envoy/sluice-http.template.yaml`
//! (`normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`),
//! `//api/x`, `/./api/x` or `/api%2Fx` do not start with `/api/`, so the rule
//! does not match, yet the upstream may well serve them as `/api/x`.

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use sluice_e2e::client::Client;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::template::{self, Vars};
use sluice_e2e::upstream::Upstream;

/// Requests `/api/` allows per client before it limits (for an hour: no
/// refill during the test).
const LIMIT: u64 = 3;

/// The template's path settings, as written there (one line each).
const PATH_SETTINGS: [&str; 3] = [
    "normalize_path:",
    "merge_slashes:",
    "path_with_escaped_slashes_action:",
];

/// What the template's settings do with a spelling of a path under `/api/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WithSettings {
    /// Normalised to a path under `/api/`: the rule matches, 429.
    Limited,
    /// An escaped slash or backslash: Envoy answers 400 itself.
    Rejected,
}

/// What Envoy's defaults (no path settings) do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WithoutSettings {
    /// Already starts with `/api/`: limited all the same.
    StillLimited,
    /// Does not start with `/api/`: proxied un-limited, 200.
    Proxied,
}

use WithSettings::{Limited, Rejected};
use WithoutSettings::{Proxied, StillLimited};

/// Spellings of `/api/x` (or of another path under `/api/`), measured on
/// Envoy 1.40. With the settings, `normalize_path` decodes percent-encoded
/// unreserved characters (`%2e`, `%61`), turns `\` into `/` and removes dot
/// segments; `merge_slashes` merges `//`; `%2F` and `%5C` (either case) are
/// refused by `path_with_escaped_slashes_action: REJECT_REQUEST`.
const VARIANTS: &[(&str, WithSettings, WithoutSettings)] = &[
    // Repeated slashes.
    ("//api/x", Limited, Proxied),
    ("///api/x", Limited, Proxied),
    ("/api//x", Limited, StillLimited),
    // Dot segments, and `..` as far as above the root.
    ("/./api/x", Limited, Proxied),
    ("/.//api/x", Limited, Proxied),
    ("/api/./x", Limited, StillLimited),
    ("/foo/../api/x", Limited, Proxied),
    ("/../api/x", Limited, Proxied),
    ("/api/x/../x", Limited, StillLimited),
    // Percent-encoded dots, both cases, alone and mixed with plain dots.
    ("/%2e/api/x", Limited, Proxied),
    ("/%2E/api/x", Limited, Proxied),
    ("/%2e%2e/api/x", Limited, Proxied),
    ("/foo/%2e%2e/api/x", Limited, Proxied),
    ("/foo/%2E%2E/api/x", Limited, Proxied),
    ("/foo/.%2e/api/x", Limited, Proxied),
    ("/foo/%2E./api/x", Limited, Proxied),
    ("/api/%2e/x", Limited, StillLimited),
    // Trailing dot segments: `/api/x/` and `/api/`, still under `/api/`.
    ("/api/x/.", Limited, StillLimited),
    ("/api/x/..", Limited, StillLimited),
    // A percent-encoded letter (`%61` is `a`).
    ("/%61pi/x", Limited, Proxied),
    // Backslashes.
    ("/api\\x", Limited, Proxied),
    ("/foo\\..\\api\\x", Limited, Proxied),
    // Escaped slashes and backslashes, both cases, alone and with `..`.
    ("/api%2Fx", Rejected, Proxied),
    ("/api%2fx", Rejected, Proxied),
    ("/%2Fapi/x", Rejected, Proxied),
    ("/%2fapi%2fx", Rejected, Proxied),
    ("/api%5Cx", Rejected, Proxied),
    ("/api%5cx", Rejected, Proxied),
    ("/foo/..%2Fapi/x", Rejected, Proxied),
    ("/foo%2F..%2Fapi/x", Rejected, Proxied),
    ("/foo/..%5Capi/x", Rejected, Proxied),
    ("/api%2F%2e%2e%2Fapi/x", Rejected, Proxied),
    // The query is not part of the match.
    ("/api/x?a=b", Limited, StillLimited),
];

fn plugin_config() -> Value {
    json!({
        "rules": [{
            "name": "api",
            "match": {"path": {"prefix": "/api/"}},
            "key": ["client_ip"],
            "limit": {"count": LIMIT, "per": "1h"}
        }]
    })
}

/// Sends `GET <path>` and returns the status and, when the upstream
/// answered, the path it received. The harness client (hyper) writes the
/// path exactly as given: it neither normalises nor refuses any of these.
async fn get(client: &Client, path: &str) -> (u16, Option<String>) {
    let reply = client
        .get(path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    let upstream_path = reply
        .json()
        .ok()
        .and_then(|echo| echo["path"].as_str().map(str::to_owned));
    (reply.status, upstream_path)
}

/// The template with the path settings removed: Envoy's defaults, as the
/// example shipped before.
fn template_without_path_settings() -> String {
    let text = template::load_template().expect("reading the template");
    for setting in PATH_SETTINGS {
        let lines = text
            .lines()
            .filter(|line| line.trim_start().starts_with(setting))
            .count();
        assert_eq!(lines, 1, "the template should set `{setting}` once");
    }
    text.lines()
        .filter(|line| {
            !PATH_SETTINGS
                .iter()
                .any(|setting| line.trim_start().starts_with(setting))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Upstream and Envoy with the `/api/` rule (from `template`, else the
/// repository's template), its limit already used up by `/api/x`.
async fn exhausted(test: &str, template: Option<&str>) -> (Upstream, Envoy) {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let mut builder = Envoy::builder(test)
        .upstream(upstream.port())
        .sluice(&plugin_config());
    // Envoy reads the rendered copy under .e2e-logs: the template file is
    // needed only until it starts.
    let dir = tempfile::tempdir().expect("a temporary directory");
    if let Some(text) = template {
        let path = dir.path().join("template.yaml");
        std::fs::write(&path, text).expect("writing the template");
        // An absolute path: joined to the repository root, it stays itself.
        builder = builder.template(&path.display().to_string(), Vars::new());
    }
    let envoy = builder
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy: {e:#}"));
    let client = envoy.client();
    for i in 0..LIMIT {
        let (status, _) = get(&client, "/api/x").await;
        assert_eq!(status, 200, "request {i} within the limit");
    }
    let (status, _) = get(&client, "/api/x").await;
    assert_eq!(status, 429, "/api/x past the limit");
    assert_eq!(upstream.requests(), LIMIT);
    (upstream, envoy)
}

/// With the template's settings, no spelling reaches the upstream: each is
/// limited by the rule (429) or refused by Envoy (400), as listed.
#[tokio::test]
async fn template_settings_leave_no_spelling_unlimited() {
    let (upstream, envoy) = exhausted("template_settings_leave_no_spelling_unlimited", None).await;
    let client = envoy.client();
    let mut unexpected = Vec::new();
    for &(path, expected, _) in VARIANTS {
        let expected_status = match expected {
            Limited => 429,
            Rejected => 400,
        };
        let (status, upstream_path) = get(&client, path).await;
        if status != expected_status {
            unexpected.push(format!(
                "{path}: expected {expected_status}, got {status} (upstream saw {upstream_path:?})"
            ));
        }
    }
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
    assert_eq!(
        upstream.requests(),
        LIMIT,
        "a spelling reached the upstream"
    );

    // The 429s come from the rule, the 400s from Envoy's path check.
    let limited = VARIANTS.iter().filter(|v| v.1 == Limited).count() as u64;
    let rejected = VARIANTS.len() as u64 - limited;
    let rule_limited = envoy
        .sluice_counter_settled("api", "limited", limited + 1)
        .await
        .expect("stats");
    assert_eq!(rule_limited, limited + 1, "requests the rule limited");
    let refused = envoy
        .stat("http.ingress_http.downstream_rq_failed_path_normalization")
        .await
        .expect("stats");
    assert_eq!(refused, Some(rejected), "requests Envoy refused");
}

/// Without the settings (Envoy's defaults) the same spellings do get past
/// the exhausted limit, to an upstream that receives them byte for byte:
/// the test above could fail.
#[tokio::test]
async fn without_the_settings_spellings_get_through() {
    let template = template_without_path_settings();
    let (upstream, envoy) = exhausted(
        "without_the_settings_spellings_get_through",
        Some(&template),
    )
    .await;
    let client = envoy.client();
    let mut unexpected = Vec::new();
    for &(path, _, expected) in VARIANTS {
        let (status, upstream_path) = get(&client, path).await;
        let as_expected = match expected {
            StillLimited => status == 429,
            Proxied => status == 200 && upstream_path.as_deref() == Some(path),
        };
        if !as_expected {
            unexpected.push(format!(
                "{path}: expected {expected:?}, got {status} (upstream saw {upstream_path:?})"
            ));
        }
    }
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
    let proxied = VARIANTS.iter().filter(|v| v.2 == Proxied).count() as u64;
    assert_eq!(upstream.requests(), LIMIT + proxied);
}
