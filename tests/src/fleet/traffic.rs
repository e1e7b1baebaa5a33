//! Load on a fleet from the tests: bounded bursts, and bounded traffic in
//! the background while a test breaks something.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::task::JoinSet;

use crate::client::{Client, Reply};
use crate::wait;

/// A request sent to a fleet and its reply.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The path asked for.
    pub path: String,
    /// The index of the Envoy (of the clients given) that answered.
    pub envoy: usize,
    /// Its reply.
    pub reply: Reply,
}

/// Sends `count` GETs of `path` with `headers`, round-robin over `clients`
/// (one fresh connection each, so they spread over every Envoy's workers),
/// `parallel` at a time; returns every reply.
pub async fn burst(
    clients: &[Client],
    path: &str,
    headers: &[(&str, &str)],
    count: usize,
    parallel: usize,
) -> Result<Vec<Sent>> {
    let clients: Arc<[Client]> = clients.into();
    let headers = owned(headers);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..parallel.max(1) {
        let (clients, headers, next) = (clients.clone(), headers.clone(), next.clone());
        let path = path.to_owned();
        tasks.spawn(async move {
            let headers = borrowed(&headers);
            let mut sent = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(sent);
                }
                let envoy = i % clients.len();
                let reply = clients[envoy].get_with(&path, &headers).await?;
                sent.push(Sent {
                    path: path.clone(),
                    envoy,
                    reply,
                });
            }
        });
    }
    let mut all = Vec::with_capacity(count);
    while let Some(sent) = tasks.join_next().await {
        all.extend(sent.context("a burst task panicked")??);
    }
    Ok(all)
}

/// How many of `sent` were answered `status`.
pub fn count(sent: &[Sent], status: u16) -> usize {
    sent.iter().filter(|s| s.reply.status == status).count()
}

/// Requests sent in the background until stopped: each task one request
/// at a time, at most a given number.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Sent>>>,
    tasks: JoinSet<Result<()>>,
}

impl Traffic {
    /// Starts `tasks` loops, task `t` sending `paths[t % paths.len()]`
    /// with `headers` through the clients in turn, each at most
    /// `max_per_task` requests.
    pub fn start(
        clients: &[Client],
        paths: &[&str],
        headers: &[(&str, &str)],
        tasks: usize,
        max_per_task: usize,
    ) -> Traffic {
        let headers: Arc<[(String, String)]> = owned(headers);
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let mut set = JoinSet::new();
        for t in 0..tasks {
            let clients: Vec<Client> = clients.to_vec();
            let path = paths[t % paths.len()].to_owned();
            let (stop, seen, headers) = (stop.clone(), seen.clone(), headers.clone());
            set.spawn(async move {
                let headers = borrowed(&headers);
                for i in 0..max_per_task {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let envoy = (t + i) % clients.len();
                    let reply = clients[envoy].get_with(&path, &headers).await?;
                    lock(&seen).push(Sent {
                        path: path.clone(),
                        envoy,
                        reply,
                    });
                }
                Ok(())
            });
        }
        Traffic {
            stop,
            seen,
            tasks: set,
        }
    }

    /// Replies received so far.
    pub fn answered(&self) -> usize {
        lock(&self.seen).len()
    }

    /// Waits until `n` replies in all were received (at most `within`).
    pub async fn wait_for(&self, n: usize, within: Duration) -> Result<()> {
        wait::until(&format!("{n} replies to the traffic"), within, || async {
            let got = self.answered();
            if got >= n {
                Ok(())
            } else {
                Err(format!("{got} replies"))
            }
        })
        .await
    }

    /// Stops the loops and returns every request they sent, with its reply.
    pub async fn stop(mut self) -> Result<Vec<Sent>> {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(done) = self.tasks.join_next().await {
            done.context("a traffic task panicked")??;
        }
        Ok(std::mem::take(&mut *lock(&self.seen)))
    }
}

fn lock(seen: &Mutex<Vec<Sent>>) -> std::sync::MutexGuard<'_, Vec<Sent>> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Headers the tasks can own.
fn owned(headers: &[(&str, &str)]) -> Arc<[(String, String)]> {
    headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Owned headers as the client takes them.
fn borrowed(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
