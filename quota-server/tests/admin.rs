//! The admin API and the admin-calling CLI through the real binary; every
//! effect is observed through ShouldRateLimit.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod support;

use common::RedisServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use hyper::{Method, StatusCode};
use serde_json::json;
use sluice_quota_server::cli::CallError;
use support::{config_with_admin, eventually, write, Sluice};
use tempfile::TempDir;

const DOMAINS: &str = r#"
domains:
  - name: api
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 1}
      - key: remote_address
        rate_limit: {unit: minute, requests_per_unit: 1}
"#;

fn start(dir: &TempDir, admin: &str) -> Sluice {
    let text = config_with_admin(DOMAINS, admin);
    Sluice::start(&write(dir, "sluice.yaml", &text))
}

fn status(e: &CallError) -> Option<StatusCode> {
    match e {
        CallError::Refused { status, .. } => Some(*status),
        _ => None,
    }
}

#[tokio::test]
async fn every_route_but_metrics_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "");
    for token in [None, Some("wrong")] {
        for (method, path) in [
            (Method::GET, "/rules"),
            (Method::GET, "/overrides"),
            (Method::GET, "/access"),
            (Method::GET, "/audit"),
            (Method::DELETE, "/bans?key=a=b"),
            (Method::GET, "/counters?domain=api&user=a"),
        ] {
            let e = server
                .api_with(token)
                .call(method, path, None)
                .await
                .unwrap_err();
            assert_eq!(status(&e), Some(StatusCode::UNAUTHORIZED), "{path}: {e}");
        }
    }
    let metrics = server
        .api_with(None)
        .call(Method::GET, "/metrics", None)
        .await;
    // Series without samples yet (no decision made) are not listed; the
    // storage error counter always is.
    assert!(metrics.unwrap().contains("sluice_storage_errors_total 0"));
}

#[tokio::test]
async fn deny_and_allow_lists_apply_to_the_client_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "");
    let ip = |a| [("remote_address", a)];
    server
        .json(
            Method::POST,
            "/access/deny",
            Some(json!({"cidr": "10.0.0.0/8"})),
        )
        .await;
    assert_eq!(server.ask("api", &ip("10.1.2.3")).await, Code::OverLimit);
    // The user descriptor of a denied client is refused too.
    assert_eq!(
        server
            .ask("api", &[("remote_address", "10.9.9.9"), ("user", "x")])
            .await,
        Code::OverLimit
    );
    server
        .json(Method::DELETE, "/access/deny?cidr=10.0.0.0%2F8", None)
        .await;
    assert_eq!(server.ask("api", &ip("10.1.2.3")).await, Code::Ok);

    // Allow-listed: never limited and nothing counted.
    server
        .json(
            Method::POST,
            "/access/allow",
            Some(json!({"cidr": "192.0.2.0/24", "ttl": "2s", "reason": "probe"})),
        )
        .await;
    for _ in 0..3 {
        assert_eq!(server.ask("api", &ip("192.0.2.7")).await, Code::Ok);
    }
    let counter = server
        .json(
            Method::GET,
            "/counters?domain=api&remote_address=192.0.2.7",
            None,
        )
        .await;
    assert_eq!(counter["remaining"], 1, "{counter}");
    // The entry expires: the limit of 1 applies again.
    eventually("the allow entry expires", || async {
        server.ask("api", &ip("192.0.2.7")).await == Code::OverLimit
    })
    .await;
    let lists = server.json(Method::GET, "/access", None).await;
    assert_eq!(lists["allow"], json!([]), "{lists}");
}

#[tokio::test]
async fn bans_refuse_until_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "");
    server
        .json(
            Method::POST,
            "/bans",
            Some(json!({"key": "user=mallory", "ttl": "2s", "reason": "abuse"})),
        )
        .await;
    assert_eq!(
        server.ask("api", &[("user", "mallory")]).await,
        Code::OverLimit
    );
    eventually("the ban expires", || async {
        server.ask("api", &[("user", "mallory")]).await == Code::Ok
    })
    .await;
    let e = server
        .refused(Method::POST, "/bans", Some(json!({"ttl": "1m"})))
        .await;
    assert_eq!(status(&e), Some(StatusCode::BAD_REQUEST), "{e}");
}

#[tokio::test]
async fn overrides_raise_or_lift_limits_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let server = start(
        &dir,
        &format!("audit_log: {:?}", audit_path.display().to_string()),
    );
    let alice = [("user", "alice")];
    server
        .json(
            Method::POST,
            "/overrides",
            Some(json!({"key": "user=alice", "limit": 3, "ttl": "1m", "reason": "launch", "by": "ops"})),
        )
        .await;
    for _ in 0..3 {
        assert_eq!(server.ask("api", &alice).await, Code::Ok);
    }
    assert_eq!(server.ask("api", &alice).await, Code::OverLimit);

    server
        .json(
            Method::POST,
            "/overrides",
            Some(json!({"key": "user=bob", "unlimited": true, "ttl": "2s", "reason": "test"})),
        )
        .await;
    for _ in 0..5 {
        assert_eq!(server.ask("api", &[("user", "bob")]).await, Code::Ok);
    }
    eventually("the unlimited override expires", || async {
        server.ask("api", &[("user", "bob")]).await == Code::OverLimit
    })
    .await;

    server
        .json(
            Method::DELETE,
            "/overrides?key=user%3Dalice&reason=done",
            None,
        )
        .await;
    let listed = server.json(Method::GET, "/overrides", None).await;
    assert_eq!(listed["overrides"], json!([]), "{listed}");
    let events = server.json(Method::GET, "/audit", None).await;
    let actions: Vec<(String, String)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().into(),
                e["target"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("grant".to_string(), "user=alice".to_string()),
            ("grant".into(), "user=bob".into()),
            ("revoke".into(), "user=alice".into()),
        ]
    );
    let file = std::fs::read_to_string(&audit_path).unwrap();
    assert_eq!(file.lines().count(), 3, "{file}");
    assert!(file.contains("\"by\":\"ops\""), "{file}");
    let e = server
        .refused(
            Method::POST,
            "/overrides",
            Some(json!({"key": "user=x", "ttl": "1m", "reason": "r"})),
        )
        .await;
    assert_eq!(status(&e), Some(StatusCode::BAD_REQUEST), "{e}");
}

#[tokio::test]
async fn runtime_rules_counters_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "");
    let tenant = [("tenant", "t1")];
    assert_eq!(server.ask("api", &tenant).await, Code::Ok);
    assert_eq!(server.ask("api", &tenant).await, Code::Ok, "no limit yet");
    server
        .json(
            Method::POST,
            "/rules",
            Some(json!({"domain": "api", "descriptor": {"key": "tenant", "rate_limit": {"unit": "minute", "requests_per_unit": 1}}})),
        )
        .await;
    assert_eq!(server.ask("api", &tenant).await, Code::Ok);
    assert_eq!(server.ask("api", &tenant).await, Code::OverLimit);
    let counter = server
        .json(Method::GET, "/counters?domain=api&tenant=t1", None)
        .await;
    assert_eq!(counter["remaining"], 0, "{counter}");
    server
        .json(Method::DELETE, "/counters?domain=api&tenant=t1", None)
        .await;
    assert_eq!(server.ask("api", &tenant).await, Code::Ok, "reset");
    let listed = server.json(Method::GET, "/rules", None).await;
    assert_eq!(listed["runtime"].as_array().unwrap().len(), 1, "{listed}");
    let bad = server
        .refused(
            Method::POST,
            "/rules",
            Some(json!({"domain": "api", "descriptor": {"key": "x", "rate_limit": {"unit": "minute"}}})),
        )
        .await;
    assert_eq!(status(&bad), Some(StatusCode::BAD_REQUEST), "{bad}");
    server
        .json(Method::DELETE, "/rules?domain=api&key=tenant", None)
        .await;
    assert_eq!(server.ask("api", &tenant).await, Code::Ok);
    assert_eq!(server.ask("api", &tenant).await, Code::Ok, "rule removed");
    let over = server
        .metric("sluice_decisions_total{domain=\"api\",rule=\"tenant\",outcome=\"over_limit\"}")
        .await;
    assert_eq!(over, 1);
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn cli_subcommands_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "");
    assert!(ok(&server.cli(&["rules", "list"])).contains("\"domains\":[\"api\"]"));
    ok(&server.cli(&[
        "rules",
        "add",
        "--domain",
        "api",
        "--key",
        "plan",
        "--requests",
        "1",
        "--per",
        "1m",
    ]));
    assert_eq!(server.ask("api", &[("plan", "free")]).await, Code::Ok);
    assert_eq!(
        server.ask("api", &[("plan", "free")]).await,
        Code::OverLimit
    );
    ok(&server.cli(&["rules", "remove", "--domain", "api", "--key", "plan"]));
    assert_eq!(server.ask("api", &[("plan", "free")]).await, Code::Ok);

    ok(&server.cli(&[
        "override",
        "grant",
        "--key",
        "user=carol",
        "--unlimited",
        "--ttl",
        "1m",
        "--reason",
        "vip",
    ]));
    assert!(ok(&server.cli(&["override", "list"])).contains("user=carol"));
    for _ in 0..3 {
        assert_eq!(server.ask("api", &[("user", "carol")]).await, Code::Ok);
    }
    ok(&server.cli(&["override", "revoke", "--key", "user=carol"]));
    // Nothing was counted under the override: the limit of 1 starts afresh.
    assert_eq!(server.ask("api", &[("user", "carol")]).await, Code::Ok);
    assert_eq!(
        server.ask("api", &[("user", "carol")]).await,
        Code::OverLimit
    );

    ok(&server.cli(&["ban", "--cidr", "198.51.100.0/24", "--ttl", "1m"]));
    let ip = [("remote_address", "198.51.100.9")];
    assert_eq!(server.ask("api", &ip).await, Code::OverLimit);
    ok(&server.cli(&["unban", "--cidr", "198.51.100.0/24"]));
    ok(&server.cli(&["allow", "198.51.100.9"]));
    for _ in 0..3 {
        assert_eq!(server.ask("api", &ip).await, Code::Ok);
    }
    ok(&server.cli(&["allow", "198.51.100.9", "--remove"]));
    ok(&server.cli(&["deny", "203.0.113.1"]));
    assert_eq!(
        server
            .ask("api", &[("remote_address", "203.0.113.1")])
            .await,
        Code::OverLimit
    );

    let export = dir.path().join("metrics.txt");
    ok(&server.cli(&["stats", "--export", export.to_str().unwrap()]));
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(
        text.contains("sluice_decisions_total{domain=\"api\",rule=\"access\",outcome=\"denied\"}"),
        "{text}"
    );

    let refused = server.cli(&["unban", "--key", "user=nobody"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not banned"));
}

#[test]
fn test_subcommand_simulates_offline() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "sluice.yaml", DOMAINS);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "test",
            "--rule",
            "user",
            "--key",
            "alice",
            "--requests",
            "3",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    let text = ok(&out);
    assert!(text.contains("1 of 3 allowed, 2 denied"), "{text}");
    assert!(text.contains("DENIED    retry after"), "{text}");
}

#[tokio::test]
async fn a_change_the_audit_log_cannot_record_is_undone() {
    // /dev/full opens for appending but every write fails (ENOSPC).
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "audit_log: /dev/full");
    let e = server
        .refused(
            Method::POST,
            "/overrides",
            Some(json!({"key": "user=eve", "unlimited": true, "ttl": "1m", "reason": "r"})),
        )
        .await;
    assert_eq!(status(&e), Some(StatusCode::INTERNAL_SERVER_ERROR), "{e}");
    assert!(e.to_string().contains("undone"), "{e}");
    let listed = server.json(Method::GET, "/overrides", None).await;
    assert_eq!(listed["overrides"], json!([]), "{listed}");
    assert_eq!(server.ask("api", &[("user", "eve")]).await, Code::Ok);
    assert_eq!(server.ask("api", &[("user", "eve")]).await, Code::OverLimit);
}

#[tokio::test]
async fn counters_and_reset_over_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}storage: {{backend: redis, redis: {{url: \"{}\", timeout: 2s}}}}\n",
        config_with_admin(DOMAINS, ""),
        redis.url()
    );
    let server = Sluice::start(&write(&dir, "sluice.yaml", &text));
    let dave = [("user", "dave")];
    let peek = || async {
        server
            .json(Method::GET, "/counters?domain=api&user=dave", None)
            .await["remaining"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(peek().await, 1, "a peek consumes nothing");
    assert_eq!(peek().await, 1);
    assert_eq!(server.ask("api", &dave).await, Code::Ok);
    assert_eq!(peek().await, 0);
    assert_eq!(server.ask("api", &dave).await, Code::OverLimit);
    server
        .json(Method::DELETE, "/counters?domain=api&user=dave", None)
        .await;
    assert_eq!(peek().await, 1);
    assert_eq!(server.ask("api", &dave).await, Code::Ok);
}

/// Sluice's own API goes through the same controls, and is counted.
#[tokio::test]
async fn controls_and_metrics_apply_to_check_and_sync() {
    use sluice_quota_server::proto::quota_client::QuotaClient;
    use sluice_quota_server::proto::{
        CheckGroup, CheckItem, CheckRequest, Code as QuotaCode, GroupResult, SyncEntry, SyncRequest,
    };

    let dir = tempfile::tempdir().unwrap();
    let rules = r#"
domains:
  - name: api
    rules:
      - {name: per_key, limit: {count: 1, per: 1h}}
"#;
    let server = Sluice::start(&write(&dir, "sluice.yaml", &config_with_admin(rules, "")));
    let mut client = QuotaClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let mut check = async |key: &str| -> GroupResult {
        let group = CheckGroup {
            domain: "api".into(),
            items: vec![CheckItem {
                rule: "per_key".into(),
                key: key.into(),
                cost: 1,
            }],
        };
        let response = client
            .check(CheckRequest {
                groups: vec![group],
                controls_version: None,
                omit_headers: false,
            })
            .await
            .unwrap()
            .into_inner();
        response.groups.into_iter().next().unwrap()
    };

    assert!(check("alice").await.allowed);
    assert!(!check("alice").await.allowed);
    server
        .json(
            Method::POST,
            "/overrides",
            Some(json!({"key": "alice", "limit": 3, "ttl": "1m", "reason": "launch"})),
        )
        .await;
    for _ in 0..2 {
        let g = check("alice").await;
        assert!(g.allowed, "{g:?}");
        assert_eq!(g.items[0].limit, 3);
    }
    assert!(!check("alice").await.allowed);

    server
        .json(
            Method::POST,
            "/bans",
            Some(json!({"key": "mallory", "ttl": "1m", "reason": "abuse"})),
        )
        .await;
    let g = check("mallory").await;
    assert!(!g.allowed);
    assert_eq!(g.items[0].code, QuotaCode::OverLimit as i32);

    let sync = |key: &str| SyncRequest {
        domain: "api".into(),
        replicas: 1,
        entries: vec![SyncEntry {
            rule: "per_key".into(),
            key: key.into(),
            held: 0,
            used: 0,
            want: 1,
        }],
        caller: String::new(),
        controls_version: None,
    };
    let banned = client.sync(sync("mallory")).await.unwrap().into_inner();
    assert_eq!(banned.leases[0].code, QuotaCode::OverLimit as i32);
    assert_eq!(banned.leases[0].permits, 0);
    let leased = client.sync(sync("bob")).await.unwrap().into_inner();
    assert_eq!(leased.leases[0].permits, 1);

    let series = |outcome: &str| {
        format!("sluice_decisions_total{{domain=\"api\",rule=\"per_key\",outcome=\"{outcome}\"}}")
    };
    // Checks: alice 1 + 2 allowed; syncs: bob's lease.
    assert_eq!(server.metric(&series("ok")).await, 4);
    assert_eq!(server.metric(&series("over_limit")).await, 2);
    let denied = "sluice_decisions_total{domain=\"api\",rule=\"access\",outcome=\"denied\"}";
    assert_eq!(server.metric(denied).await, 2);
}

/// A restart restores from the audit log what is still granted: not what
/// was revoked or has expired, and without recording it again.
#[tokio::test]
async fn a_restart_restores_grants_from_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let admin = format!("audit_log: {:?}", audit_path.display().to_string());
    let server = start(&dir, &admin);
    let post = |path: &'static str, body: serde_json::Value| {
        let server = &server;
        async move { server.json(Method::POST, path, Some(body)).await }
    };
    post(
        "/bans",
        json!({"key": "user=mallory", "ttl": "1m", "reason": "abuse"}),
    )
    .await;
    post(
        "/bans",
        json!({"key": "user=brief", "ttl": "1s", "reason": "short"}),
    )
    .await;
    post(
        "/overrides",
        json!({"key": "user=alice", "limit": 3, "ttl": "1m", "reason": "launch"}),
    )
    .await;
    post("/access/deny", json!({"cidr": "198.51.100.0/24"})).await;
    post(
        "/access/allow",
        json!({"cidr": "192.0.2.0/24", "ttl": "1m"}),
    )
    .await;
    post(
        "/rules",
        json!({"domain": "api", "descriptor": {"key": "tenant", "rate_limit": {"unit": "minute", "requests_per_unit": 1}}}),
    )
    .await;
    server
        .json(Method::DELETE, "/access/deny?cidr=198.51.100.0/24", None)
        .await;
    drop(server);
    let lines = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .count();
    // Past the short ban's expiry.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let server = start(&dir, &admin);
    let bans = server.json(Method::GET, "/bans", None).await;
    let banned: Vec<&str> = bans["bans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["target"]["key"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(banned, ["user=mallory"], "{bans}");
    assert_eq!(
        server.ask("api", &[("user", "mallory")]).await,
        Code::OverLimit
    );
    let overrides = server.json(Method::GET, "/overrides", None).await;
    assert_eq!(
        overrides["overrides"][0]["key"], "user=alice",
        "{overrides}"
    );
    let access = server.json(Method::GET, "/access", None).await;
    assert_eq!(access["deny"], json!([]), "{access}");
    assert_eq!(access["allow"].as_array().unwrap().len(), 1, "{access}");
    let rules = server.json(Method::GET, "/rules", None).await;
    assert_eq!(rules["runtime"].as_array().unwrap().len(), 1, "{rules}");
    let after = std::fs::read_to_string(&audit_path)
        .unwrap()
        .lines()
        .count();
    assert_eq!(after, lines, "replayed grants are not recorded again");
}

/// The status line of a raw HTTP/1.1 GET with this `Authorization` value.
fn raw_get(admin: std::net::SocketAddr, path: &str, authorization: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir, "");
    let token = support::TOKEN;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let line = raw_get(server.admin, "/rules", &format!("{scheme} {token}"));
        assert_eq!(line, "HTTP/1.1 200 OK", "scheme {scheme}");
    }
    for wrong in [format!("Basic {token}"), format!("Bearer {token}x")] {
        let line = raw_get(server.admin, "/rules", &wrong);
        assert_eq!(line, "HTTP/1.1 401 Unauthorized", "{wrong}");
    }
}
