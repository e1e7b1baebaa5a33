//! Hot reload through the real binary: changes are observed through
//! ShouldRateLimit and the reload counters, polled with a deadline.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::{config, eventually, write, Sluice};

fn limit(n: u64) -> String {
    config(&format!(
        "domains: [{{name: api, descriptors: [{{key: user, rate_limit: {{unit: minute, requests_per_unit: {n}}}}}]}}]\n"
    ))
}

/// Fresh keys, so that each probe starts from a full allowance.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// How many requests in a row a fresh key gets before OVER_LIMIT (up to 3).
async fn allowance(server: &Sluice) -> u64 {
    let key = format!("k{}", NEXT.fetch_add(1, Ordering::Relaxed));
    for n in 0..3 {
        if server.ask("api", &[("user", &key)]).await == Code::OverLimit {
            return n;
        }
    }
    3
}

async fn reloads_ok(server: &Sluice) -> u64 {
    server
        .metric("sluice_config_reloads_total{result=\"ok\"}")
        .await
}

#[tokio::test]
async fn in_place_write_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "sluice.yaml", &limit(1));
    let server = Sluice::start(&path);
    assert_eq!(allowance(&server).await, 1);
    std::fs::write(&path, limit(2)).unwrap();
    eventually("the new limit of 2 applies", || async {
        allowance(&server).await == 2
    })
    .await;
    assert_eq!(reloads_ok(&server).await, 1);
}

#[tokio::test]
async fn invalid_file_is_rejected_and_old_limits_stay() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "sluice.yaml", &limit(1));
    let server = Sluice::start(&path);
    std::fs::write(&path, limit(0)).unwrap();
    eventually("the failed reload is counted", || async {
        server
            .metric("sluice_config_reloads_total{result=\"failed\"}")
            .await
            == 1
    })
    .await;
    assert_eq!(allowance(&server).await, 1, "the old limit still applies");
    assert_eq!(reloads_ok(&server).await, 0);
    // A fixed file is then applied.
    std::fs::write(&path, limit(2)).unwrap();
    eventually("the fixed file applies", || async {
        allowance(&server).await == 2
    })
    .await;
}

#[tokio::test]
async fn replace_by_rename_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "sluice.yaml", &limit(1));
    let server = Sluice::start(&path);
    assert_eq!(allowance(&server).await, 1);
    // As editors save: write a temporary file, rename it over.
    let tmp = write(&dir, ".sluice.yaml.tmp", &limit(2));
    std::fs::rename(&tmp, &path).unwrap();
    eventually("the renamed file applies", || async {
        allowance(&server).await == 2
    })
    .await;
}

#[tokio::test]
async fn configmap_symlink_swap_is_applied() {
    // Kubernetes' layout: sluice.yaml -> ..data/sluice.yaml, and
    // ..data -> ..<timestamp>, swapped by renaming a new link over ..data.
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("sluice.yaml"), limit(1)).unwrap();
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    let path = dir.path().join("sluice.yaml");
    std::os::unix::fs::symlink("..data/sluice.yaml", &path).unwrap();
    let server = Sluice::start(&path);
    assert_eq!(allowance(&server).await, 1);

    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("sluice.yaml"), limit(2)).unwrap();
    std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    eventually("the swapped ConfigMap applies", || async {
        allowance(&server).await == 2
    })
    .await;
}

#[tokio::test]
async fn an_emptied_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "sluice.yaml", &limit(1));
    let server = Sluice::start(&path);
    std::fs::write(&path, "").unwrap();
    eventually("the empty file is refused", || async {
        server
            .metric("sluice_config_reloads_total{result=\"failed\"}")
            .await
            == 1
    })
    .await;
    assert_eq!(allowance(&server).await, 1, "the old limit still applies");
}

async fn reloads_failed(server: &Sluice) -> u64 {
    server
        .metric("sluice_config_reloads_total{result=\"failed\"}")
        .await
}

/// Samples both reload counters for `HOLD` and fails if either moves from
/// `(ok, failed)`: nothing but an edit may start a reload.
async fn reloads_stay(server: &Sluice, ok: u64, failed: u64) {
    const HOLD: Duration = Duration::from_millis(1500);
    let until = Instant::now() + HOLD;
    while Instant::now() < until {
        let now = (reloads_ok(server).await, reloads_failed(server).await);
        assert_eq!(
            now,
            (ok, failed),
            "reloads (ok, failed) moved without an edit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_edit_reloads_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "sluice.yaml", &limit(1));
    let server = Sluice::start(&path);
    // A bad file left in place fails once, not on every read of it.
    std::fs::write(&path, limit(0)).unwrap();
    eventually("the bad file fails to load", || async {
        reloads_failed(&server).await == 1
    })
    .await;
    // A second, known edit: exactly one more failure, then quiet.
    std::fs::write(&path, format!("{}# still bad\n", limit(0))).unwrap();
    eventually("the second bad edit fails to load", || async {
        reloads_failed(&server).await == 2
    })
    .await;
    reloads_stay(&server, 0, 2).await;
    // A good edit applies once, then quiet too.
    std::fs::write(&path, limit(2)).unwrap();
    eventually("the good edit applies", || async {
        reloads_ok(&server).await == 1
    })
    .await;
    reloads_stay(&server, 1, 2).await;
    assert_eq!(allowance(&server).await, 2);
}
