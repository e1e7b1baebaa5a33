//! The policy playground (core/playground/): its page in a real headless
//! Chromium, driven over WebDriver, against the same engine run natively;
//! and the playground's answers against the real filter in a real Envoy.
//!
//! Needs `make playground-build` (part of `make test`, before the tests) for
//! the page in target/playground/, Debian's `chromium` and
//! `chromium-driver` (`make setup`), Envoy and the filter (`make wasm`).
//! The browser test keeps a screenshot at target/playground-test/page.png.

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use sluice_e2e::browser::Browser;
use sluice_e2e::client::remaining_in;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::repo_root;
use sluice_e2e::upstream::Upstream;
use sluice_playground::report::Report;
use sluice_playground::Traffic;

/// The engine's answer, run natively.
fn native(config: &str, traffic: &Traffic) -> Report {
    sluice_playground::simulate(config, traffic).unwrap_or_else(|e| panic!("native run: {e:?}"))
}

const CONFIG: &str = r#"{"rules": [
  {"name": "per-client", "key": ["client_ip"], "limit": {"count": 5, "per": "1s"}, "algorithm": "token_bucket"},
  {"name": "login", "match": {"path": {"prefix": "/login"}}, "key": ["client_ip"],
   "limit": {"count": 2, "per": "1m"}, "algorithm": "fixed_window"}
]}"#;

/// Two clients, one steady at 10 a second, one in bursts to /login: as a
/// pasted list, one request a line.
fn pasted_traffic() -> String {
    let mut lines = String::new();
    for i in 0..40 {
        lines.push_str(&format!("{:.1} 10.0.0.1 GET /api\n", f64::from(i) / 10.0));
    }
    for burst in 0..3 {
        for _ in 0..4 {
            lines.push_str(&format!("{}.05 10.0.0.2 POST /login\n", burst));
        }
    }
    lines
}

#[tokio::test]
async fn the_page_shows_errors_and_the_engines_counts() {
    let page = repo_root().join("target/playground/index.html");
    assert!(
        page.exists(),
        "{} is missing: run make playground-build",
        page.display()
    );
    let browser = Browser::start()
        .await
        .expect("starting headless Chromium and chromedriver");
    browser
        .open(&format!(
            "file://{}",
            page.canonicalize().unwrap().display()
        ))
        .await
        .unwrap();
    browser
        .until(
            "the engine to load",
            "return document.querySelector('#status[data-state=ready]') && true || null",
        )
        .await
        .unwrap();

    // An error: its path and line appear beside the text.
    let broken =
        "{\"rules\": [\n  {\"name\": \"r\", \"limit\": {\"count\": 5, \"per\": \"soon\"}}\n]}";
    browser.type_into("#config", broken).await.unwrap();
    let shown = browser
        .until(
            "the error beside the configuration",
            "const e = document.querySelector('#problems li[data-path=\"rules[0].limit.per\"]'); return e && e.textContent",
        )
        .await
        .unwrap();
    let shown = shown.as_str().unwrap();
    assert!(
        shown.contains("expected a duration") && shown.contains("line 2"),
        "{shown}"
    );

    // A scenario: the plotted counts are the native engine's.
    browser.type_into("#config", CONFIG).await.unwrap();
    browser
        .until(
            "the configuration to validate",
            "return document.querySelector('#problems.ok') && true || null",
        )
        .await
        .unwrap();
    browser.run("const k = document.getElementById('traffic-kind'); k.value = 'list'; k.dispatchEvent(new Event('change'));").await.unwrap();
    let text = pasted_traffic();
    browser.type_into("#list", &text).await.unwrap();
    browser.click("#run").await.unwrap();
    let page = browser
        .until(
            "the results",
            "const t = document.getElementById('totals'); if (!t) return null;
             const counts = (e) => ({allowed: +e.dataset.allowed, delayed: +e.dataset.delayed, limited: +e.dataset.limited});
             return {
               total: +t.dataset.total, totals: counts(t),
               rules: [...t.querySelectorAll('tr[data-rule]')].map((r) => [r.dataset.rule, counts(r)]),
               plots: [...document.querySelectorAll('#plots .plot[data-plot=lane]')].map((p) => [p.dataset.rule, p.dataset.key, counts(p)]),
               all: counts(document.querySelector('#plots .plot[data-plot=all]')),
               headers: document.getElementById('headers').textContent,
             };",
        )
        .await
        .unwrap();
    let expected = native(CONFIG, &Traffic::List { text });
    let counts = |c: &sluice_playground::report::Counts| json!({"allowed": c.allowed, "delayed": c.delayed, "limited": c.limited});
    assert_eq!(page["total"], expected.total);
    assert_eq!(page["totals"], counts(&expected.totals));
    assert_eq!(
        page["all"],
        counts(&expected.totals),
        "the overall plot sums to the totals"
    );
    let rules: Vec<Value> = expected
        .rules
        .iter()
        .map(|r| json!([r.name, {"allowed": r.allowed - r.delayed, "delayed": r.delayed, "limited": r.limited}]))
        .collect();
    assert_eq!(page["rules"], Value::from(rules));
    let lanes: Vec<Value> = expected
        .lanes
        .iter()
        .map(|l| {
            json!([
                l.rule,
                l.key.clone().unwrap_or_else(|| "(other keys)".into()),
                counts(&l.totals)
            ])
        })
        .collect();
    assert_eq!(page["plots"], Value::from(lanes));
    // The numbers themselves: 10.0.0.1 sends 10 a second for 4 s against 5
    // a second; 10.0.0.2's bursts of 4 logins meet 2 a minute.
    assert!(
        expected.totals.limited > 0 && expected.totals.allowed > 0,
        "{:?}",
        expected.totals
    );
    assert_eq!(expected.rules[1].allowed, 2);
    // The first refused request's headers are shown.
    let headers = page["headers"].as_str().unwrap();
    assert!(
        headers.contains("429 Too Many Requests") && headers.contains("retry-after:"),
        "{headers}"
    );

    // The comparison runs every algorithm on the same traffic.
    browser.click("#compare").await.unwrap();
    let compared = browser
        .until(
            "the comparison",
            "const cards = [...document.querySelectorAll('#compared [data-algorithm]')];
             return cards.length ? cards.map((c) => [c.dataset.algorithm, +c.dataset.limited]) : null;",
        )
        .await
        .unwrap();
    let native_compared: Vec<Value> = sluice_playground::compare(
        CONFIG,
        &Traffic::List {
            text: pasted_traffic(),
        },
    )
    .unwrap()
    .into_iter()
    .map(|c| json!([c.algorithm, c.result.unwrap().totals.limited]))
    .collect();
    assert_eq!(compared, Value::from(native_compared));

    // Shared as a URL, the scenario comes back and runs on load.
    browser.click("#share").await.unwrap();
    let url = browser.run("return location.href").await.unwrap();
    let url = url.as_str().unwrap().to_owned();
    assert!(url.contains("#s="), "{url}");
    browser.open("about:blank").await.unwrap();
    browser.open(&url).await.unwrap();
    let restored = browser
        .until(
            "the shared scenario's results",
            "const t = document.getElementById('totals'); return t && +t.dataset.limited",
        )
        .await
        .unwrap();
    assert_eq!(restored, expected.totals.limited);

    browser
        .screenshot(&repo_root().join("target/playground-test/page.png"))
        .await
        .unwrap();
}

/// Requests sent to Envoy in one burst, well inside every rule's hour-long
/// window, so the real clock moving on by milliseconds changes no
/// decision: token bucket and GCRA refill one permit every 12 minutes or
/// more, the sliding log keeps every request of the hour.
#[tokio::test]
async fn the_playground_answers_as_envoy_does() {
    let scenarios = [
        json!({"rules": [{"name": "per-client", "key": ["header:x-client"],
            "limit": {"count": 5, "per": "1h"}, "algorithm": "token_bucket"}]}),
        json!({"rules": [
            {"name": "api", "match": {"path": {"prefix": "/api"}}, "key": ["header:x-client"],
             "limit": {"count": 3, "per": "1h", "burst": 4}, "algorithm": "gcra"},
            {"name": "everyone", "limit": {"count": 9, "per": "1h"}, "algorithm": "sliding_window_log"}]}),
        json!({"rules": [
            {"name": "login", "match": {"path": {"prefix": "/login"}, "methods": ["POST"]},
             "key": ["header:x-client"], "limit": {"count": 2, "per": "1h"}, "algorithm": "sliding_window_log"},
            {"name": "shadow", "key": ["header:x-client"], "limit": {"count": 1, "per": "1h"},
             "action": "shadow"}]}),
    ];
    let requests: Vec<(&str, &str, &str)> = (0..14)
        .map(|i| {
            let client = ["alice", "bob"][i % 2];
            let (method, path) =
                [("GET", "/api/items"), ("POST", "/login"), ("GET", "/other")][i % 3];
            (client, method, path)
        })
        .collect();
    let list: String = requests
        .iter()
        .enumerate()
        .map(|(i, (client, method, path))| format!("{}ms {client} {method} {path}\n", i))
        .collect();
    for config in scenarios {
        let report = native(&config.to_string(), &Traffic::List { text: list.clone() });
        assert_eq!(report.requests.len(), requests.len());
        let upstream = Upstream::start().await.expect("starting the upstream");
        let envoy = Envoy::builder("playground_answers_as_envoy")
            .upstream(upstream.port())
            .sluice(&config)
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting Envoy: {e:#}"));
        let client = envoy.client();
        let mut statuses = (0u64, 0u64);
        for ((who, method, path), simulated) in requests.iter().zip(&report.requests) {
            let reply = client
                .request(method, path, &[("x-client", who)])
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
            let header = |name: &str| {
                simulated
                    .headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
            };
            let what = format!(
                "{config} request #{} {who} {method} {path}",
                simulated.number
            );
            assert_eq!(
                reply.status,
                simulated.status,
                "{what}: {}",
                reply.headers_text()
            );
            assert_eq!(
                reply.header("ratelimit-policy"),
                header("ratelimit-policy"),
                "{what}: ratelimit-policy"
            );
            assert_eq!(
                reply.remaining(),
                remaining_in(header("ratelimit")),
                "{what}: ratelimit r="
            );
            if reply.status == 429 {
                statuses.1 += 1;
            } else {
                statuses.0 += 1;
            }
        }
        assert!(
            statuses.0 > 0 && statuses.1 > 0,
            "{config}: both answers seen: {statuses:?}"
        );
    }
}
