//! `cargo run -p sluice-e2e --bin demo --release` (or `make demo`).
//!
//! Starts an upstream and Envoy with the Sluice filter and the demo rules
//! (tests/src/demo.rs, the same as envoy/envoy.yaml), sends a bounded burst
//! (30 × GET /api/items, 8 × POST /login) on loopback, prints what was
//! allowed or limited and the filter's stats, and stops everything. Builds
//! nothing itself: run `make wasm` first.

use std::process::ExitCode;

use anyhow::Result;
use sluice_e2e::client::Reply;
use sluice_e2e::demo;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let upstream = Upstream::start().await?;
    let envoy = Envoy::builder("demo")
        .upstream(upstream.port())
        .sluice_raw(demo::PLUGIN_CONFIG)
        .access_log(false)
        .start()
        .await?;
    println!("Sluice demo");
    println!(
        "  Envoy {} (admin {}), upstream {}",
        envoy.addr(),
        envoy.admin_addr(),
        upstream.addr()
    );
    println!("  rules (tests/src/demo.rs, as in envoy/envoy.yaml):");
    for line in demo::PLUGIN_CONFIG.lines() {
        println!("    {line}");
    }
    println!();

    let client = envoy.client();
    let mut rows = Vec::new();
    for _ in 0..30 {
        rows.push(("GET /api/items", client.get("/api/items").await?));
    }
    for _ in 0..8 {
        rows.push((
            "POST /login",
            client.post("/login", &[("content-length", "0")]).await?,
        ));
    }

    println!(
        "{:>3}  {:<15} {:>6}  {:<8} {:>9} {:>5} {:>11}  {:<28} rule (429)",
        "#", "request", "status", "outcome", "remaining", "limit", "retry-after", "ratelimit"
    );
    for (i, (what, reply)) in rows.iter().enumerate() {
        println!(
            "{:>3}  {:<15} {:>6}  {:<8} {:>9} {:>5} {:>11}  {:<28} {}",
            i + 1,
            what,
            reply.status,
            outcome(reply),
            reply.header("x-ratelimit-remaining").unwrap_or("-"),
            reply.header("x-ratelimit-limit").unwrap_or("-"),
            reply.header("retry-after").unwrap_or("-"),
            reply.header("ratelimit").unwrap_or("-"),
            limited_rule(reply),
        );
    }
    println!();
    for what in ["GET /api/items", "POST /login"] {
        let of_kind: Vec<&Reply> = rows
            .iter()
            .filter(|(w, _)| *w == what)
            .map(|(_, r)| r)
            .collect();
        let allowed = of_kind.iter().filter(|r| r.status < 400).count();
        println!(
            "{what}: {allowed} allowed, {} limited of {}",
            of_kind.len() - allowed,
            of_kind.len()
        );
    }
    println!(
        "requests that reached the upstream: {}",
        upstream.requests()
    );
    println!();

    println!("Filter stats (admin /stats/prometheus):");
    let prometheus = envoy.prometheus().await?;
    let mut any = false;
    for line in prometheus.lines().filter(|l| l.starts_with("sluice_http")) {
        println!("  {line}");
        any = true;
    }
    if !any {
        println!("  (none: the filter defined no sluice_http metrics)");
    }
    drop(envoy);
    println!();
    println!("Envoy stopped.");
    Ok(())
}

fn outcome(reply: &Reply) -> &'static str {
    match reply.status {
        429 => "limited",
        s if s < 400 => "allowed",
        _ => "error",
    }
}

fn limited_rule(reply: &Reply) -> String {
    if reply.status != 429 {
        return String::new();
    }
    reply
        .json()
        .ok()
        .and_then(|body| body.get("rule").and_then(|r| r.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}
