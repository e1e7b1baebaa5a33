//! The access controls travel to callers that enforce them: `Sync` and
//! `Check` answers carry them when the caller's `controls_version` is
//! stale, and nothing otherwise. Through the real binary, its admin API
//! and the `sluice ban` CLI.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use hyper::{Method, StatusCode};
use serde_json::json;
use sluice_core::access::wire::{span, Synced};
use sluice_core::access::Access;
use sluice_core::time::{Nanos, Span};
use sluice_quota_server::cli::CallError;
use sluice_quota_server::proto::quota_client::QuotaClient;
use sluice_quota_server::proto::{
    ban_entry, CheckGroup, CheckItem, CheckRequest, Controls, SyncEntry, SyncRequest,
};
use support::{config, write, Sluice};
use tonic::transport::Channel;

const DOMAINS: &str = r#"
domains:
  - name: api
    rules:
      - {name: per_key, limit: {count: 100, per: 1h}}
"#;

async fn client(server: &Sluice) -> QuotaClient<Channel> {
    QuotaClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap()
}

/// The controls a `Sync` of one entry answers with, for a caller holding `have`.
async fn sync(client: &mut QuotaClient<Channel>, have: Option<u64>) -> Option<Controls> {
    let request = SyncRequest {
        domain: "api".into(),
        replicas: 1,
        entries: vec![SyncEntry {
            rule: "per_key".into(),
            key: "k".into(),
            held: 0,
            used: 0,
            want: 1,
        }],
        caller: "envoy-a".into(),
        controls_version: have,
    };
    client.sync(request).await.unwrap().into_inner().controls
}

/// The controls a `Check` of one item answers with, for a caller holding `have`.
async fn check(client: &mut QuotaClient<Channel>, have: Option<u64>) -> Option<Controls> {
    let request = CheckRequest {
        groups: vec![CheckGroup {
            domain: "api".into(),
            items: vec![CheckItem {
                rule: "per_key".into(),
                key: "k".into(),
                cost: 1,
            }],
        }],
        controls_version: have,
        omit_headers: false,
    };
    client.check(request).await.unwrap().into_inner().controls
}

#[tokio::test]
async fn sync_and_check_carry_the_controls_only_to_stale_callers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(&write(&dir, "sluice.yaml", &config(DOMAINS)));
    let mut client = client(&server).await;

    // A caller that does not ask is never sent them.
    assert_eq!(sync(&mut client, None).await, None);
    assert_eq!(check(&mut client, None).await, None);
    // One with none yet gets the (empty) controls and their version.
    let empty = sync(&mut client, Some(0)).await.unwrap();
    assert_ne!(empty.version, 0);
    assert!(empty.allow.is_empty() && empty.deny.is_empty() && empty.bans.is_empty());
    assert_eq!(sync(&mut client, Some(empty.version)).await, None);
    assert_eq!(check(&mut client, Some(empty.version)).await, None);

    // Through the CLI and the admin API.
    let out = server.cli(&[
        "ban", "--key", "5:alice", "--ttl", "1m", "--reason", "abuse",
    ]);
    assert!(out.status.success(), "{out:?}");
    server
        .json(
            Method::POST,
            "/bans",
            Some(json!({"cidr": "192.0.2.0/24", "ttl": "30s"})),
        )
        .await;
    server
        .json(
            Method::POST,
            "/access/deny",
            Some(json!({"cidr": "198.51.100.7"})),
        )
        .await;
    server
        .json(
            Method::POST,
            "/access/allow",
            Some(json!({"cidr": "10.0.0.0/8", "ttl": "10m"})),
        )
        .await;
    for (key, grant) in [
        ("5:bobby", json!({"unlimited": true})),
        ("5:carol", json!({"limit": 500})),
    ] {
        let mut body = json!({"key": key, "ttl": "1m", "reason": "test"});
        body.as_object_mut()
            .unwrap()
            .extend(grant.as_object().unwrap().clone());
        server.json(Method::POST, "/overrides", Some(body)).await;
    }

    let stale = Some(empty.version);
    let sent = sync(&mut client, stale).await.expect("the caller is stale");
    assert_ne!(sent.version, empty.version);
    assert_eq!(
        check(&mut client, stale).await.unwrap().version,
        sent.version
    );
    assert_eq!(sync(&mut client, Some(sent.version)).await, None);
    assert_eq!(check(&mut client, Some(sent.version)).await, None);

    // What a caller rebuilds from them.
    let keys: Vec<_> = sent.bans.iter().filter_map(|b| b.target.clone()).collect();
    assert!(keys.contains(&ban_entry::Target::Key("5:alice".into())));
    assert!(keys.contains(&ban_entry::Target::Cidr("192.0.2.0/24".into())));
    let alice = sent
        .bans
        .iter()
        .find(|b| b.target == Some(ban_entry::Target::Key("5:alice".into())))
        .unwrap();
    let left = span(alice.remaining.as_ref().unwrap());
    assert!(
        left <= Span::from_secs(60) && left > Span::from_secs(50),
        "{left:?}"
    );
    assert_eq!(sent.deny[0].remaining, None, "no ttl: no expiry");
    let unlimited: Vec<&str> = sent.unlimited.iter().map(|u| u.key.as_str()).collect();
    assert_eq!(unlimited, ["5:bobby"], "raised limits stay on the server");
    let now = Nanos(1);
    let synced = Synced::from_wire(&sent, now).unwrap();
    let ip = |s: &str| Some(s.parse().unwrap());
    let l = &synced.access;
    assert_eq!(l.check(ip("192.0.2.9"), [], now), Access::Denied);
    assert_eq!(l.check(ip("198.51.100.7"), [], now), Access::Denied);
    assert_eq!(l.check(ip("10.2.3.4"), [], now), Access::Allowed);
    assert_eq!(l.check(ip("10.2.3.4"), ["5:alice"], now), Access::Denied);
    assert!(synced.is_unlimited("5:bobby", now));

    // Lifting the ban is another set, so another version.
    let out = server.cli(&["unban", "--key", "5:alice"]);
    assert!(out.status.success(), "{out:?}");
    let lifted = sync(&mut client, Some(sent.version)).await.unwrap();
    assert_ne!(lifted.version, sent.version);
    assert_eq!(lifted.bans.len(), 1);
}

#[tokio::test]
async fn an_expired_ban_leaves_the_controls_at_the_next_purge() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(&write(&dir, "sluice.yaml", &config(DOMAINS)));
    let mut client = client(&server).await;
    server
        .json(
            Method::POST,
            "/bans",
            Some(json!({"key": "5:alice", "ttl": "1s"})),
        )
        .await;
    let banned = sync(&mut client, Some(0)).await.unwrap();
    assert_eq!(banned.bans.len(), 1);
    // Callers expire it by their own clock; once the server has dropped
    // it, the set (and so the version) has changed and is sent again.
    support::eventually("the expired ban leaves the controls", || {
        let mut client = client.clone();
        let version = banned.version;
        async move {
            sync(&mut client, Some(version))
                .await
                .is_some_and(|c| c.bans.is_empty())
        }
    })
    .await;
}

#[tokio::test]
async fn keys_every_envoy_receives_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Sluice::start(&write(&dir, "sluice.yaml", &config(DOMAINS)));
    let long = "k".repeat(257);
    for (path, body) in [
        ("/bans", json!({"key": long, "ttl": "1m"})),
        (
            "/overrides",
            json!({"key": long, "unlimited": true, "ttl": "1m", "reason": "r"}),
        ),
    ] {
        let e = server.refused(Method::POST, path, Some(body)).await;
        match e {
            CallError::Refused { status, message } => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert!(message.contains("at most 256"), "{message}");
            }
            other => panic!("{path}: {other}"),
        }
    }
}
