//! Counters in Redis, decided by one Lua script per request.
//!
//! The script (`lua/decide.lua`) mirrors core's algorithms with the same
//! integer math and evaluates all of a request's items in one `EVALSHA`
//! (loaded once; the `redis` crate reloads it on `NOSCRIPT`). Time is read
//! from Redis `TIME` inside the script, so every server instance agrees.
//! With Redis Cluster the call goes to the node owning the keys' slot: a
//! request's keys share it through the `{domain}` hash tag of their prefix.
//!
//! Lua numbers are doubles, exact below 2^53. The script counts time in
//! ticks of one microsecond (Redis `TIME`'s resolution) when a limit's
//! window is a whole number of microseconds and `count × window` and
//! `burst × window` stay below 2^52 ticks, else in milliseconds under the
//! same bound (see `crate::limits::ticks`); limits that fit neither are
//! refused at validation. At tick times the decisions (allowed, remaining)
//! equal core's exactly; durations are core's rounded up to the tick, and a
//! request's time is its tick's start.
//!
//! A calendar window (a month in a time zone) is computed here, not in
//! Lua: each call passes the boundaries of the window containing this
//! server's time and of its two neighbours, and the script picks the one
//! containing Redis's time, so servers whose clocks differ a little at a
//! boundary still agree on the window.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Script, Value};
use sluice_core::algorithm::Outcome;
use sluice_core::time::{Nanos, Span};
use tokio::sync::{mpsc, oneshot, OnceCell};

use super::breaker::Breaker;
use super::{system_now, tls, Item, StorageError};
use crate::config::RedisConfig;

/// The decision script.
const SCRIPT: &str = include_str!("../../lua/decide.lua");

/// How long calls fail fast after Redis was found unreachable, before one
/// call probes it again: short, so recovery is noticed quickly.
const PROBE_PAUSE: Duration = Duration::from_millis(100);

/// Most decisions one script call carries: bounds the time Redis spends in
/// one call (others' commands wait meanwhile) and the reply's size.
pub const MAX_BATCH: usize = 64;

/// Most items one script call carries; a larger decision goes alone.
pub const MAX_BATCH_ITEMS: usize = 256;

/// A lane sends a whole batch early only while fewer script calls than
/// this are out: at high load Redis finds the next batch waiting when it
/// finishes one, and a lane serves up to `IN_FLIGHT × MAX_BATCH`
/// decisions per round trip. Short of a whole batch, one take is out at a
/// time (see [`run_lane`]).
const IN_FLIGHT: usize = 4;

/// Decisions a lane holds waiting (beyond it, callers wait to queue,
/// within their timeout).
const LANE_QUEUE: usize = 4 * MAX_BATCH;

/// The Redis backend: decisions queue on lanes that each send what queued
/// as one script call.
pub struct RedisBackend {
    breaker: Breaker,
    /// What every lane shares: where Redis is, the script, the bound.
    link: Arc<Link>,
    /// One per connection, started on first use (inside the runtime).
    lanes: Vec<OnceLock<mpsc::Sender<Job>>>,
    next: AtomicUsize,
    timeout: Duration,
}

/// Where Redis is and how to call it, shared by the lanes' tasks.
struct Link {
    target: Target,
    script: Script,
    timeout: Duration,
    /// Script calls made, for tests and benchmarks (decisions per call).
    calls: AtomicU64,
}

/// One Redis server, or a Redis Cluster.
enum Target {
    /// A few multiplexed connections (one per lane), each reconnecting itself.
    Single {
        client: redis::Client,
        connections: Vec<OnceCell<ConnectionManager>>,
    },
    /// The cluster client's own connection: it routes each script call by
    /// its first key's slot and follows redirections and topology changes.
    Cluster {
        client: ClusterClient,
        connection: OnceCell<ClusterConnection>,
    },
}

/// A connection of either kind.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// One decision waiting on a lane.
struct Job {
    call: ScriptCall,
    reply: oneshot::Sender<Result<Vec<i64>, StorageError>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("cluster", &self.link.is_cluster())
            .field("lanes", &self.lanes.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// How long a call may take before it fails.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A backend for `url` that connects on first use, bounding every call
    /// by `timeout`. Only the URL is checked here: a server may start while
    /// Redis is down, and its domains' failure modes apply meanwhile.
    pub fn new(url: &str, timeout: Duration, connections: usize) -> Result<Self, StorageError> {
        Ok(RedisBackend::single(
            redis::Client::open(url)?,
            timeout,
            connections,
        ))
    }

    /// A backend for the Redis Cluster reachable through any of `urls`
    /// (seed nodes), connecting on first use.
    pub fn cluster(urls: &[String], timeout: Duration) -> Result<Self, StorageError> {
        RedisBackend::clustered(ClusterClient::builder(urls.to_vec()), timeout)
    }

    /// A backend as `storage.redis` says (one server or a cluster, with
    /// the TLS CA file if given), bounding every call by `timeout`.
    pub fn from_config(config: &RedisConfig, timeout: Duration) -> Result<Self, StorageError> {
        let connections = usize::try_from(config.connections).unwrap_or(1);
        let ca = config
            .tls_ca_file
            .as_deref()
            .map(tls::ca_certificates)
            .transpose()?;
        match (config.cluster.is_empty(), ca) {
            (true, None) => RedisBackend::new(&config.url, timeout, connections),
            (true, Some(ca)) => Ok(RedisBackend::single(
                redis::Client::build_with_tls(config.url.as_str(), ca)?,
                timeout,
                connections,
            )),
            (false, None) => RedisBackend::cluster(&config.cluster, timeout),
            (false, Some(ca)) => RedisBackend::clustered(
                ClusterClient::builder(config.cluster.clone()).certs(ca),
                timeout,
            ),
        }
    }

    fn single(client: redis::Client, timeout: Duration, connections: usize) -> RedisBackend {
        let connections = connections.max(1);
        RedisBackend::with_target(
            Target::Single {
                client,
                connections: (0..connections).map(|_| OnceCell::new()).collect(),
            },
            timeout,
            connections,
        )
    }

    fn clustered(builder: ClusterClientBuilder, timeout: Duration) -> Result<Self, StorageError> {
        let client = builder
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // Redirections (MOVED/ASK) are retried; the overall timeout in
            // `decide` still bounds the call.
            .retries(2)
            .build()?;
        Ok(RedisBackend::with_target(
            Target::Cluster {
                client,
                connection: OnceCell::new(),
            },
            timeout,
            1,
        ))
    }

    fn with_target(target: Target, timeout: Duration, lanes: usize) -> RedisBackend {
        RedisBackend {
            breaker: Breaker::new(PROBE_PAUSE),
            link: Arc::new(Link {
                target,
                script: Script::new(SCRIPT),
                timeout,
                calls: AtomicU64::new(0),
            }),
            lanes: (0..lanes).map(|_| OnceLock::new()).collect(),
            next: AtomicUsize::new(0),
            timeout,
        }
    }

    /// The script's SHA1, as `SCRIPT LOAD` reports it.
    pub fn script_sha(&self) -> &str {
        self.link.script.get_hash()
    }

    /// Script calls made so far (each carrying one or more decisions).
    pub fn script_calls(&self) -> u64 {
        self.link.calls.load(Ordering::Relaxed)
    }

    /// The next lane's queue, its task started on first use.
    fn lane(&self) -> mpsc::Sender<Job> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        self.lanes[i]
            .get_or_init(|| {
                let (sender, receiver) = mpsc::channel(LANE_QUEUE);
                tokio::spawn(run_lane(self.link.clone(), i, receiver));
                sender
            })
            .clone()
    }

    /// Queues one decision and waits for its answer, the whole bounded by
    /// the timeout (queueing and connecting included, which is where a dead
    /// host would otherwise hang).
    async fn decide(&self, call: ScriptCall) -> Result<Vec<i64>, StorageError> {
        if !self.breaker.admit() {
            // Returned before the bookkeeping below: recording it as a
            // failure would keep pushing the next probe back.
            return Err(StorageError::Down(self.breaker.pause()));
        }
        let lane = self.lane();
        let (reply, answer) = oneshot::channel();
        let wait = async {
            lane.send(Job { call, reply })
                .await
                .map_err(|_| StorageError::Stopped)?;
            answer.await.map_err(|_| StorageError::Stopped)?
        };
        let result = tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| StorageError::Timeout(self.timeout))
            .and_then(|r| r);
        match &result {
            Ok(_) => self.breaker.success(),
            Err(e) if unreachable(e) => self.breaker.failure(),
            // Redis answered (e.g. a script error): it is up.
            Err(_) => self.breaker.success(),
        }
        result
    }
}

impl Link {
    fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    /// Lane `lane`'s connection, connecting on first use.
    async fn connection(&self, lane: usize) -> Result<Connection, StorageError> {
        match &self.target {
            Target::Single {
                client,
                connections,
            } => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    // Reconnect in the background with backoff: 10 ms doubling up
                    // to 1 s; callers meanwhile fail within `timeout`.
                    .set_factor(10)
                    .set_exponent_base(2)
                    .set_max_delay(1000)
                    .set_number_of_retries(6);
                let manager = connections[lane % connections.len()]
                    .get_or_try_init(|| ConnectionManager::new_with_config(client.clone(), config))
                    .await?;
                Ok(Connection::Single(manager.clone()))
            }
            Target::Cluster { client, connection } => {
                let conn = connection
                    .get_or_try_init(|| client.get_async_connection())
                    .await?;
                Ok(Connection::Cluster(conn.clone()))
            }
        }
    }

    /// One script call for `jobs`, answering each: its own numbers, its own
    /// refusal, or the call's error.
    async fn call(&self, connection: Connection, jobs: Vec<Job>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let evalsha = self.evalsha(&jobs);
        let reply = async {
            match connection {
                Connection::Single(mut conn) => self.invoke(&evalsha, &mut conn).await,
                Connection::Cluster(mut conn) => self.invoke(&evalsha, &mut conn).await,
            }
        };
        let replies = match tokio::time::timeout(self.timeout, reply).await {
            Err(_) => Err(StorageError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(StorageError::from(e)),
            Ok(Ok(Value::Array(replies))) if replies.len() == jobs.len() => Ok(replies),
            Ok(Ok(other)) => Err(StorageError::Reply(format!(
                "{other:?} for a batch of {} decisions",
                jobs.len()
            ))),
        };
        match replies {
            Ok(replies) => {
                for (job, reply) in jobs.into_iter().zip(replies) {
                    // The caller may have given up (its timeout): nothing to do.
                    let _ = job.reply.send(decision_reply(reply));
                }
            }
            Err(error) => answer_all(jobs, &error),
        }
    }
}

impl Link {
    /// The `EVALSHA` of the script for `jobs`: the decisions' keys and
    /// arguments written once, straight into the command's buffer.
    fn evalsha(&self, jobs: &[Job]) -> redis::Cmd {
        let hash = self.script.get_hash();
        // Sized up front: the buffer is not grown (and copied) as it fills.
        let (mut keys, mut args, mut bytes) = (0, 0, "EVALSHA".len() + hash.len() + 40);
        for job in jobs {
            keys += job.call.keys.len();
            args += job.call.args.len();
            bytes += job
                .call
                .keys
                .iter()
                .chain(&job.call.args)
                .map(String::len)
                .sum::<usize>();
        }
        let mut cmd = redis::Cmd::with_capacity(keys + args + 4, bytes);
        cmd.arg("EVALSHA").arg(hash).arg(keys);
        for job in jobs {
            for key in &job.call.keys {
                cmd.arg(key);
            }
        }
        cmd.arg(jobs.len());
        for job in jobs {
            for arg in &job.call.args {
                cmd.arg(arg);
            }
        }
        cmd
    }

    /// Sends `evalsha`; if Redis lost the script (`NOSCRIPT`: restarted,
    /// flushed, failed over), loads it and sends the call again.
    async fn invoke<C: redis::aio::ConnectionLike>(
        &self,
        evalsha: &redis::Cmd,
        conn: &mut C,
    ) -> redis::RedisResult<Value> {
        match evalsha.query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.script.prepare_invoke().load_async(conn).await?;
                evalsha.query_async(conn).await
            }
            other => other,
        }
    }
}

/// Answers every job with (a copy of) `error`.
fn answer_all(jobs: Vec<Job>, error: &StorageError) {
    for job in jobs {
        let _ = job.reply.send(Err(share(error)));
    }
}

/// A copy of a call's error for each of its decisions.
fn share(error: &StorageError) -> StorageError {
    match error {
        StorageError::Redis(e) => StorageError::Redis(e.clone()),
        StorageError::Timeout(t) => StorageError::Timeout(*t),
        other => StorageError::Reply(other.to_string()),
    }
}

/// One decision's part of the script's reply: its numbers, or (a string)
/// why Redis refused it.
fn decision_reply(reply: Value) -> Result<Vec<i64>, StorageError> {
    match reply {
        Value::Array(_) => Vec::<i64>::from_redis_value(&reply).map_err(StorageError::from),
        Value::BulkString(text) => Err(StorageError::Refused(
            String::from_utf8_lossy(&text).into_owned(),
        )),
        Value::SimpleString(text) => Err(StorageError::Refused(text)),
        other => Err(StorageError::Reply(format!("{other:?} for one decision"))),
    }
}

/// A lane's task: group commit. While no call is out it waits (without a
/// timer) for a decision and takes every one waiting; while calls are
/// out, what queues is taken as it comes and goes out as the next call
/// when they have all answered, so that batches fill at any load. Only a
/// whole batch ([`MAX_BATCH`]) goes out before that, while fewer than
/// [`IN_FLIGHT`] calls are out, so that Redis finds the next batch waiting
/// at high load. The calls are polled here, not in tasks of their own: the
/// lane wakes once per reply or queueing, not also per call. Taken
/// decisions go as script calls one per hash tag with a cluster, each
/// within the batch bounds. Ends when the backend is dropped and every
/// decision taken is answered.
async fn run_lane(link: Arc<Link>, lane: usize, mut queue: mpsc::Receiver<Job>) {
    let link = &*link;
    let mut taken = Vec::with_capacity(MAX_BATCH);
    let mut in_flight = FuturesUnordered::new();
    // Whether the backend may still queue decisions.
    let mut open = true;
    loop {
        if in_flight.is_empty() {
            // `taken` is empty here: whatever was taken went out before
            // the calls drained.
            if queue.recv_many(&mut taken, MAX_BATCH).await == 0 {
                break;
            }
        } else {
            // Takes decisions only while a call could go out early: at the
            // cap, they wait in the queue (which bounds them).
            let room = MAX_BATCH - taken.len();
            let take = open && room > 0 && in_flight.len() < IN_FLIGHT;
            tokio::select! {
                // A reply first: it may free the lane to send what waits.
                biased;
                _ = in_flight.next() => {}
                received = queue.recv_many(&mut taken, room), if take => {
                    open = received > 0;
                }
            }
            let early = taken.len() == MAX_BATCH && in_flight.len() < IN_FLIGHT;
            if !in_flight.is_empty() && !early {
                continue;
            }
            // Tops up what was taken with what queued since.
            while taken.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => taken.push(job),
                    Err(_) => break,
                }
            }
        }
        // A caller that gave up (timed out, cancelled) needs no decision.
        let jobs: Vec<Job> = taken.drain(..).filter(|j| !j.reply.is_closed()).collect();
        if jobs.is_empty() {
            continue;
        }
        let connection = match tokio::time::timeout(link.timeout, link.connection(lane)).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                answer_all(jobs, &error);
                continue;
            }
            Err(_) => {
                answer_all(jobs, &StorageError::Timeout(link.timeout));
                continue;
            }
        };
        for jobs in batches(jobs, link.is_cluster()) {
            in_flight.push(link.call(connection.clone(), jobs));
        }
    }
}

/// Splits taken decisions into script calls: within [`MAX_BATCH_ITEMS`]
/// items each and, with a cluster, one hash tag (so one slot) per call.
fn batches(jobs: Vec<Job>, by_tag: bool) -> Vec<Vec<Job>> {
    // Per call being filled: its hash tag, decisions and items.
    let mut calls: Vec<(String, Vec<Job>, usize)> = Vec::new();
    for job in jobs {
        let tag = match job.call.keys.first() {
            Some(key) if by_tag => hash_tag(key).to_owned(),
            _ => String::new(),
        };
        let items = job.call.items();
        match calls.iter_mut().rev().find(|(t, _, _)| *t == tag) {
            Some((_, jobs, n)) if *n + items <= MAX_BATCH_ITEMS => {
                jobs.push(job);
                *n += items;
            }
            _ => calls.push((tag, vec![job], items)),
        }
    }
    calls.into_iter().map(|(_, jobs, _)| jobs).collect()
}

/// The part of `key` Redis Cluster hashes: the text inside its first
/// non-empty `{...}`, else the whole key.
fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}

/// One decision's part of a script call's `KEYS` and `ARGV`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptCall {
    /// Per item: its state key and its log key.
    pub keys: Vec<String>,
    /// Mode, replayed time (empty: Redis `TIME`), item count, then per
    /// item: algorithm, tick (µs), count, window (ticks), burst, cost,
    /// enforce, and a calendar window's neighbourhood (empty, or four
    /// boundaries in ticks joined by `,`: previous start, start, end, next end).
    pub args: Vec<String>,
}

impl ScriptCall {
    /// The decision's items.
    fn items(&self) -> usize {
        self.keys.len() / 2
    }

    /// `ARGV` of a script call carrying this decision alone (a batch of one).
    pub fn argv_alone(&self) -> impl Iterator<Item = &str> {
        std::iter::once("1").chain(self.args.iter().map(String::as_str))
    }
}

/// The decision (`mode` "check") or refund ("refund") of `items`, to be
/// sent in a batch; public so that benchmarks can issue the very same call.
pub fn script_call(
    mode: &str,
    items: &[Item<'_>],
    now: Option<Nanos>,
) -> Result<ScriptCall, StorageError> {
    let now_arg = now.map_or(String::new(), |n| (n.0 / 1000).to_string());
    // The calendar is read at this server's time (or the replayed one),
    // read once and only for a limit with a calendar window.
    let mut calendar_now = None;
    let mut call = ScriptCall {
        keys: Vec::with_capacity(items.len() * 2),
        args: vec![mode.to_owned(), now_arg, items.len().to_string()],
    };
    for it in items {
        let tick_us = it
            .limit
            .tick_us
            .ok_or_else(|| StorageError::Unrepresentable(it.limit.name.to_string()))?;
        let quota = it.limit.quota();
        call.keys.push(it.key.clone());
        call.keys.push(format!("{}:log", it.key));
        call.args.extend([
            it.limit.algorithm().name().to_owned(),
            tick_us.to_string(),
            quota.count().to_string(),
            (quota.per().as_nanos() / (tick_us * 1000)).to_string(),
            quota.burst().to_string(),
            it.cost.to_string(),
            u8::from(it.enforce).to_string(),
            it.limit.calendar.as_ref().map_or(String::new(), |c| {
                c.around(*calendar_now.get_or_insert_with(|| now.unwrap_or_else(system_now)))
                    .map(|b| (b.0 / (tick_us * 1000)).to_string())
                    .join(",")
            }),
        ]);
    }
    Ok(call)
}

/// Whether an error means Redis could not be reached (as opposed to an answer).
fn unreachable(error: &StorageError) -> bool {
    match error {
        StorageError::Timeout(_) | StorageError::Down(_) => true,
        StorageError::Redis(e) => {
            e.is_io_error()
                || e.is_connection_refusal()
                || e.is_connection_dropped()
                || e.is_timeout()
        }
        StorageError::Reply(_)
        | StorageError::Refused(_)
        | StorageError::Stopped
        | StorageError::Unrepresentable(_)
        | StorageError::Engine(_)
        | StorageError::Tls(_)
        | StorageError::MissingRedis => false,
    }
}

/// Reads the script's four numbers for one item (durations in ticks).
fn outcome(values: &[i64], tick_us: u64) -> Outcome {
    let span = |ticks: i64| match u64::try_from(ticks) {
        Ok(t) => Span(t.saturating_mul(tick_us).saturating_mul(1000)),
        Err(_) => Span::NEVER,
    };
    Outcome {
        allowed: values[0] == 1,
        remaining: u64::try_from(values[1]).unwrap_or(0),
        reset_after: span(values[2]),
        retry_after: span(values[3]),
    }
}

impl RedisBackend {
    /// Checks and consumes, atomically over `items`; see [`super::Store`].
    pub async fn check(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> Result<Vec<Outcome>, StorageError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self.decide(script_call("check", items, now)?).await?;
        if reply.len() != items.len() * 4 {
            return Err(StorageError::Reply(format!(
                "{} numbers for {} items",
                reply.len(),
                items.len()
            )));
        }
        Ok(items
            .iter()
            .zip(reply.chunks_exact(4))
            .map(|(it, values)| outcome(values, it.limit.tick_us.unwrap_or(1)))
            .collect())
    }

    /// Gives back each item's cost, atomically over `items`.
    pub async fn refund(&self, items: &[Item<'_>], now: Option<Nanos>) -> Result<(), StorageError> {
        if items.is_empty() {
            return Ok(());
        }
        self.decide(script_call("refund", items, now)?).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_is_minus_one() {
        let o = outcome(&[0, 3, 5, -1], 1000);
        assert!(!o.allowed);
        assert_eq!(o.remaining, 3);
        assert_eq!(o.reset_after, Span::from_millis(5));
        assert_eq!(o.retry_after, Span::NEVER);
    }
}
