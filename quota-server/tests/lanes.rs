//! A Redis lane's pipelining, against a stand-in for Redis that holds its
//! first script call's reply until a second call arrives: a lane that
//! never sends a second call while one is out fails here (its decisions
//! time out).

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use sluice_quota_server::config::RateLimitConfig;
use sluice_quota_server::storage::redis::MAX_BATCH;
use sluice_quota_server::storage::{Item, RedisBackend};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One command in RESP (an array of bulk strings), or `None` at the end of
/// the connection.
async fn read_command(read: &mut BufReader<OwnedReadHalf>) -> Option<Vec<String>> {
    let mut line = String::new();
    if read.read_line(&mut line).await.unwrap() == 0 {
        return None;
    }
    let count: usize = line.trim_end().strip_prefix('*').unwrap().parse().unwrap();
    let mut command = Vec::with_capacity(count);
    for _ in 0..count {
        line.clear();
        read.read_line(&mut line).await.unwrap();
        let len: usize = line.trim_end().strip_prefix('$').unwrap().parse().unwrap();
        let mut bytes = vec![0; len + 2];
        read.read_exact(&mut bytes).await.unwrap();
        bytes.truncate(len);
        command.push(String::from_utf8(bytes).unwrap());
    }
    Some(command)
}

/// A stand-in for Redis on a loopback port, for one connection: `OK` to
/// every command but `EVALSHA`, and every decision of a script call
/// allowed. Replies go in order, but from the first script call's until
/// the second call arrives are held. Reports each call's decisions.
async fn stand_in() -> (u16, mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (report, calls) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut read = BufReader::new(read);
        let (mut held, mut script_calls) = (Vec::new(), 0);
        while let Some(command) = read_command(&mut read).await {
            if command[0].eq_ignore_ascii_case("EVALSHA") {
                script_calls += 1;
                // EVALSHA sha numkeys key... decisions arg...
                let keys: usize = command[2].parse().unwrap();
                let decisions: usize = command[3 + keys].parse().unwrap();
                report.send(decisions).unwrap();
                let allowed = "*4\r\n:1\r\n:0\r\n:0\r\n:0\r\n".repeat(decisions);
                held.push(format!("*{decisions}\r\n{allowed}"));
            } else {
                held.push("+OK\r\n".to_owned());
            }
            if script_calls != 1 {
                for reply in held.drain(..) {
                    write.write_all(reply.as_bytes()).await.unwrap();
                }
            }
        }
    });
    (port, calls)
}

/// While a call is out, a whole batch waiting goes out at once (two calls
/// out), and what queues short of a batch goes when the calls out answer.
#[tokio::test]
async fn a_full_batch_goes_out_while_a_call_is_out() {
    let (port, mut calls) = stand_in().await;
    let url = format!("redis://127.0.0.1:{port}");
    let backend = Arc::new(RedisBackend::new(&url, Duration::from_secs(5), 1).unwrap());
    let limits = Arc::new(common::domain_limits([RateLimitConfig {
        requests_per_unit: Some(1_000),
        per: Some(sluice_core::config::SpanText::Text("1h".into())),
        ..RateLimitConfig::default()
    }]));
    let decide = |key: String| {
        let (backend, limits) = (backend.clone(), limits.clone());
        tokio::spawn(async move {
            let limit = limits.limit(0).unwrap();
            let item = Item {
                limit,
                key: limit.storage_key(&[("k", &key)]),
                cost: 1,
                enforce: true,
            };
            backend.check(&[item], None).await
        })
    };
    let first = decide("first".into());
    assert_eq!(calls.recv().await, Some(1), "a lone decision goes at once");
    let rest: Vec<_> = (0..=MAX_BATCH).map(|i| decide(format!("k{i}"))).collect();
    for task in std::iter::once(first).chain(rest) {
        let outcomes = task
            .await
            .unwrap()
            .expect("answered: the full batch went out while the first call was out");
        assert!(outcomes[0].allowed);
    }
    let mut later = Vec::new();
    while let Ok(decisions) = calls.try_recv() {
        later.push(decisions);
    }
    assert_eq!(
        later,
        [MAX_BATCH, 1],
        "a full batch early, then the one left once both answered"
    );
    assert_eq!(backend.script_calls(), 3);
}
