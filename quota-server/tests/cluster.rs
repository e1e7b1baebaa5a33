//! The Redis backend on a 3-node Redis Cluster (`storage.redis.cluster`):
//! decisions stay exact under concurrent callers, for domains spread over
//! the nodes' slots. Needs `redis-server` and `redis-cli` (`make setup`).

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_quota_server::config::ServerConfig;
use sluice_quota_server::controls::Controls;
use sluice_quota_server::limits::Limits;
use sluice_quota_server::proto::quota_server::Quota;
use sluice_quota_server::proto::{CheckGroup, CheckItem, CheckRequest, Source};
use sluice_quota_server::service::{Decider, QuotaService};
use sluice_quota_server::shared::Shared;
use sluice_quota_server::storage::{Item, RedisBackend, Store};
use tonic::Request;

/// A port free on loopback together with its cluster bus port (+10000).
fn cluster_port() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Three cluster-enabled `redis-server`s joined into one cluster; all
/// stopped when dropped.
struct Cluster {
    nodes: Vec<(u16, Child)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = cluster_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .spawn()
                .expect("starting redis-server (run `make setup`)");
            nodes.push((port, child));
        }
        let cluster = Cluster { nodes, _dir: dir };
        for (port, _) in &cluster.nodes {
            cluster.wait(*port, "PING", "PONG");
        }
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.nodes.iter().map(|(p, _)| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("running redis-cli --cluster create (redis-cli comes with redis-tools; run `make setup`)");
        assert!(
            status.success(),
            "redis-cli --cluster create failed: {status}"
        );
        for (port, _) in &cluster.nodes {
            cluster.wait(*port, "CLUSTER INFO", "cluster_state:ok");
        }
        cluster
    }

    /// Polls `command` on the node until its reply contains `expected`.
    fn wait(&self, port: u16, command: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string()])
                .args(command.split(' '))
                .output()
                .expect("running redis-cli");
            if String::from_utf8_lossy(&out.stdout).contains(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {port}: no {expected:?} after {command}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Domains whose `{domain}` hash tags land on different slots.
const DOMAINS: [&str; 4] = ["a", "b", "c", "d"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_through_a_cluster() {
    let cluster = Cluster::start();
    // As a user writes it: any nodes of the cluster as seeds.
    let mut yaml = format!(
        "storage: {{backend: redis, redis: {{cluster: [{}], timeout: 2s}}}}\ndomains:\n",
        cluster.urls().join(", ")
    );
    for d in DOMAINS {
        yaml.push_str(&format!(
            "  - {{name: {d}, rules: [{{name: r, limit: {{count: 40, per: 1h}}, algorithm: sliding_window_counter}}, {{name: s, limit: {{count: 1000, per: 1h}}}}]}}\n"
        ));
    }
    let config = ServerConfig::from_yaml(&yaml).unwrap();
    let limits = Limits::compile(&config, Path::new(".")).unwrap();
    let seeds = &config.storage.redis.as_ref().unwrap().cluster;
    let backend = RedisBackend::cluster(seeds, Duration::from_secs(2)).unwrap();
    let store = Store::Redis(backend);
    let svc = Arc::new(QuotaService::new(
        Arc::new(Shared::new(limits, Controls::default(), store)),
        Arc::new(Decider::new(1000)),
    ));
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let domain = DOMAINS[t % DOMAINS.len()];
                let mut admitted = 0;
                for _ in 0..30 {
                    // Two rules in one group: all or nothing on one slot.
                    let item = |rule: &str| CheckItem {
                        rule: rule.into(),
                        key: "k".into(),
                        cost: 1,
                    };
                    let groups = vec![CheckGroup {
                        domain: domain.into(),
                        items: vec![item("r"), item("s")],
                    }];
                    let response = svc
                        .check(Request::new(CheckRequest {
                            groups,
                            controls_version: None,
                            omit_headers: false,
                        }))
                        .await
                        .unwrap()
                        .into_inner();
                    let group = &response.groups[0];
                    assert_eq!(
                        group.source,
                        Source::Storage as i32,
                        "answered by the cluster"
                    );
                    admitted += u64::from(group.allowed);
                }
                (domain, admitted)
            })
        })
        .collect();
    let mut per_domain = std::collections::HashMap::new();
    for t in tasks {
        let (domain, admitted) = t.await.unwrap();
        *per_domain.entry(domain).or_insert(0) += admitted;
    }
    for d in DOMAINS {
        assert_eq!(per_domain[d], 40, "domain {d}: 60 attempts, limit 40");
        let groups = vec![CheckGroup {
            domain: d.into(),
            items: vec![CheckItem {
                rule: "s".into(),
                key: "k".into(),
                cost: 1,
            }],
        }];
        let response = svc
            .check(Request::new(CheckRequest {
                groups,
                controls_version: None,
                omit_headers: false,
            }))
            .await
            .unwrap();
        assert_eq!(
            response.into_inner().groups[0].items[0].remaining,
            1000 - 40 - 1,
            "refused groups took nothing from the other rule"
        );
    }
}

/// Runs `redis-cli -p port ARGS`; its standard output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many MOVED redirections the node on `port` answered.
fn moved_count(port: u16) -> u64 {
    cli(port, &["INFO", "errorstats"])
        .lines()
        .find_map(|l| l.strip_prefix("errorstat_MOVED:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A slot reassigned to another node after the client learnt the slot map:
/// the decisions of a batch on that slot are redirected (MOVED) and
/// decided exactly, and those of the same batch on another slot are
/// decided too.
#[tokio::test]
async fn a_moved_slot_is_followed() {
    let cluster = Cluster::start();
    let yaml = format!(
        "storage: {{backend: redis, redis: {{cluster: [{}], timeout: 2s}}}}\ndomains:\n\
         - {{name: a, rules: [{{name: r, limit: {{count: 5, per: 1h}}}}]}}\n\
         - {{name: e, rules: [{{name: r, limit: {{count: 5, per: 1h}}}}]}}\n",
        cluster.urls().join(", ")
    );
    let config = ServerConfig::from_yaml(&yaml).unwrap();
    let limits = Arc::new(Limits::compile(&config, Path::new(".")).unwrap());
    let backend = Arc::new(RedisBackend::cluster(&cluster.urls(), Duration::from_secs(2)).unwrap());
    let key = |domain: &str| {
        let limit = limits.rule(limits.domain(domain).unwrap(), "r").unwrap();
        limit.storage_key(&[("k", "k")])
    };
    let decide = |domain: &'static str| {
        let (backend, limits) = (backend.clone(), limits.clone());
        tokio::spawn(async move {
            let limit = limits.rule(limits.domain(domain).unwrap(), "r").unwrap();
            let item = Item {
                limit,
                key: limit.storage_key(&[("k", "k")]),
                cost: 1,
                enforce: true,
            };
            backend.check(&[item], None).await.unwrap()[0].allowed
        })
    };
    // The client connects and learns the slot map.
    assert!(decide("a").await.unwrap());

    // Domain e's slot (no key on it yet) goes to another node.
    let port = cluster.nodes[0].0;
    let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", &key("e")])
        .trim()
        .parse()
        .unwrap();
    let nodes = cli(port, &["CLUSTER", "NODES"]);
    let owns = |line: &str| {
        line.split(' ').skip(8).any(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            (lo.parse::<u16>().unwrap()..=hi.parse::<u16>().unwrap()).contains(&slot)
        })
    };
    let node_port = |line: &str| -> u16 {
        let addr = line.split(' ').nth(1).unwrap();
        addr.split(['@', ':']).nth(1).unwrap().parse().unwrap()
    };
    let owner = nodes.lines().find(|l| owns(l)).unwrap();
    let target = nodes.lines().find(|l| !l.is_empty() && !owns(l)).unwrap();
    let target_id = target.split(' ').next().unwrap();
    let owner_port = node_port(owner);
    let slot = slot.to_string();
    // The new owner first, then the old one, then the third node.
    let first = [node_port(target), owner_port];
    let third = cluster
        .nodes
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !first.contains(p));
    let order: Vec<u16> = first.into_iter().chain(third).collect();
    for node in order {
        let answer = cli(node, &["CLUSTER", "SETSLOT", &slot, "NODE", target_id]);
        assert_eq!(answer.trim(), "OK", "SETSLOT on {node}");
    }
    let moved_before = moved_count(owner_port);

    // One batch on both slots: 6 tries on e (limit 5), 6 more on a (limit 5).
    let tasks: Vec<_> = (0..12)
        .map(|i| (i % 2, decide(if i % 2 == 0 { "e" } else { "a" })))
        .collect();
    let mut admitted = [0, 0];
    for (domain, task) in tasks {
        admitted[domain] += u32::from(task.await.unwrap());
    }
    assert_eq!(admitted, [5, 4], "e: 5 of 6, a: the 4 left of 5");
    assert!(
        moved_count(owner_port) > moved_before,
        "the old owner redirected the client"
    );
    assert!(!decide("e").await.unwrap(), "e is spent, on its new node");
}
