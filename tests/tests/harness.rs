//! Checks of the harness and the Envoy template that need no filter.

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sluice_e2e::demo;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;

/// `envoy/envoy.yaml` is the template rendered with the demo rules.
/// Regenerate it with `make envoy-yaml` (`SLUICE_BLESS=1`).
#[test]
fn example_config_is_rendered_from_template() {
    let rendered = demo::render_example().expect("rendering the example");
    let path = demo::example_path();
    if std::env::var("SLUICE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &rendered).expect("writing envoy/envoy.yaml");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{} is not the rendered template: run `make envoy-yaml`",
        path.display()
    );
}

/// Envoy without any filter: the upstream gets the request and Envoy
/// forwards X-Forwarded-For as the client sent it (skip_xff_append: true).
#[tokio::test]
async fn envoy_without_filter_proxies_and_keeps_xff() {
    let upstream = Upstream::start().await.expect("upstream");
    let envoy = Envoy::builder("envoy_without_filter_proxies_and_keeps_xff")
        .upstream(upstream.port())
        .start()
        .await
        .expect("starting Envoy");
    let client = envoy.client();

    let reply = client
        .get_with("/hello?x=1", &[("x-forwarded-for", "203.0.113.7")])
        .await
        .expect("GET /hello");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json().expect("echo JSON");
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["x-forwarded-for"], "203.0.113.7");

    let reply = client.get("/status/503").await.expect("GET /status/503");
    assert_eq!(reply.status, 503);

    let reply = client.get("/direct").await.expect("GET /direct");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "direct\n");

    assert_eq!(
        upstream.requests(),
        2,
        "/direct must not reach the upstream"
    );
    let rq = envoy
        .stat("http.ingress_http.downstream_rq_completed")
        .await
        .expect("stats");
    assert_eq!(rq, Some(3));
}

/// The native local_ratelimit variant of the template loads and passes
/// requests (its bucket is huge); two workers both take connections.
#[tokio::test]
async fn native_local_ratelimit_variant_and_two_workers() {
    let upstream = Upstream::start().await.expect("upstream");
    let envoy = Envoy::builder("native_local_ratelimit_variant_and_two_workers")
        .upstream(upstream.port())
        .native_local_ratelimit(true)
        .concurrency(2)
        .start()
        .await
        .expect("starting Envoy");
    let client = envoy.client();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        tasks.push(tokio::spawn(async move { client.get("/direct").await }));
    }
    for task in tasks {
        let reply = task.await.expect("join").expect("GET /direct");
        assert_eq!(reply.status, 200);
    }
    let ok = envoy
        .stat("native_local_ratelimit.http_local_rate_limit.ok")
        .await
        .expect("stats");
    assert_eq!(ok, Some(40), "native local_ratelimit stats");
    let per_worker = envoy.worker_connections().await.expect("stats");
    assert!(
        per_worker.len() == 2
            && per_worker.iter().all(|&n| n > 0)
            && per_worker.iter().sum::<u64>() == 40,
        "connections per worker: {per_worker:?}: not spread over both workers"
    );
}

/// A configuration Envoy refuses (here: the wasm module does not exist) is
/// reported with its exit status and log.
#[tokio::test]
async fn refused_config_is_reported() {
    let missing = std::path::Path::new("no-such-dir/no-such-filter.wasm");
    let failure = Envoy::builder("refused_config_is_reported")
        .sluice(&serde_json::json!({"rules": []}))
        .wasm(missing)
        .start_expect_failure()
        .await
        .expect("running Envoy");
    assert!(!failure.status.success());
    assert!(
        failure.log.contains("no-such-filter.wasm"),
        "log:\n{}",
        failure.log
    );
}
