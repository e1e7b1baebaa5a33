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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Script, ScriptInvocation};
use sluice_core::algorithm::Outcome;
use sluice_core::time::{Nanos, Span};
use tokio::sync::OnceCell;

use super::breaker::Breaker;
use super::{system_now, tls, Item, StorageError};
use crate::config::RedisConfig;

/// The decision script.
const SCRIPT: &str = include_str!("../../lua/decide.lua");

/// How long calls fail fast after Redis was found unreachable, before one
/// call probes it again: short, so recovery is noticed quickly.
const PROBE_PAUSE: Duration = Duration::from_millis(100);

/// The Redis backend: multiplexed connections, one script call per request.
pub struct RedisBackend {
    breaker: Breaker,
    target: Target,
    script: Script,
    timeout: Duration,
}

/// One Redis server, or a Redis Cluster.
enum Target {
    /// Round-robin over a few multiplexed connections, each reconnecting itself.
    Single {
        client: redis::Client,
        connections: Vec<OnceCell<ConnectionManager>>,
        next: AtomicUsize,
    },
    /// The cluster client's own connection: it routes each script call by
    /// its first key's slot (a request's keys share one slot through the
    /// `{domain}` hash tag) and follows redirections and topology changes.
    Cluster {
        client: ClusterClient,
        connection: OnceCell<ClusterConnection>,
    },
}

/// A connection of either kind.
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let connections = match &self.target {
            Target::Single { connections, .. } => connections.len(),
            Target::Cluster { .. } => 1,
        };
        f.debug_struct("RedisBackend")
            .field("cluster", &matches!(self.target, Target::Cluster { .. }))
            .field("connections", &connections)
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
        RedisBackend::with_target(
            Target::Single {
                client,
                connections: (0..connections.max(1)).map(|_| OnceCell::new()).collect(),
                next: AtomicUsize::new(0),
            },
            timeout,
        )
    }

    fn clustered(builder: ClusterClientBuilder, timeout: Duration) -> Result<Self, StorageError> {
        let client = builder
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // Redirections (MOVED/ASK) are retried; the overall timeout in
            // `run` still bounds the call.
            .retries(2)
            .build()?;
        Ok(RedisBackend::with_target(
            Target::Cluster {
                client,
                connection: OnceCell::new(),
            },
            timeout,
        ))
    }

    fn with_target(target: Target, timeout: Duration) -> RedisBackend {
        RedisBackend {
            breaker: Breaker::new(PROBE_PAUSE),
            target,
            script: Script::new(SCRIPT),
            timeout,
        }
    }

    /// The script's SHA1, as `SCRIPT LOAD` reports it.
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    async fn connection(&self) -> Result<Connection, StorageError> {
        match &self.target {
            Target::Single {
                client,
                connections,
                next,
            } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % connections.len();
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    // Reconnect in the background with backoff: 10 ms doubling up
                    // to 1 s; callers meanwhile fail within `timeout`.
                    .set_factor(10)
                    .set_exponent_base(2)
                    .set_max_delay(1000)
                    .set_number_of_retries(6);
                let manager = connections[i]
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

    /// Runs one script call, bounded by the timeout as a whole (connecting
    /// included, which is where a dead host would otherwise hang).
    async fn run(&self, invocation: ScriptInvocation<'_>) -> Result<Vec<i64>, StorageError> {
        if !self.breaker.admit() {
            // Returned before the bookkeeping below: recording it as a
            // failure would keep pushing the next probe back.
            return Err(StorageError::Down(self.breaker.pause()));
        }
        let call = async {
            let reply = match self.connection().await? {
                Connection::Single(mut conn) => invocation.invoke_async(&mut conn).await,
                Connection::Cluster(mut conn) => invocation.invoke_async(&mut conn).await,
            };
            reply.map_err(StorageError::from)
        };
        let result = tokio::time::timeout(self.timeout, call)
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

    fn invocation(
        &self,
        mode: &str,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> Result<ScriptInvocation<'_>, StorageError> {
        let call = script_call(mode, items, now)?;
        let mut inv = self.script.prepare_invoke();
        for key in &call.keys {
            inv.key(key);
        }
        for arg in &call.args {
            inv.arg(arg);
        }
        Ok(inv)
    }
}

/// The `KEYS` and `ARGV` of one script call.
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

/// The script call deciding (`mode` "check") or refunding ("refund")
/// `items`; public so that benchmarks can issue the very same call.
pub fn script_call(
    mode: &str,
    items: &[Item<'_>],
    now: Option<Nanos>,
) -> Result<ScriptCall, StorageError> {
    let now_arg = now.map_or(String::new(), |n| (n.0 / 1000).to_string());
    // The calendar is read at this server's time (or the replayed one).
    let calendar_now = now.unwrap_or_else(system_now);
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
                c.around(calendar_now)
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
    /// Checks and consumes in one script call; see [`super::Store`].
    pub async fn check(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> Result<Vec<Outcome>, StorageError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self.run(self.invocation("check", items, now)?).await?;
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

    /// Gives back each item's cost in one script call.
    pub async fn refund(&self, items: &[Item<'_>], now: Option<Nanos>) -> Result<(), StorageError> {
        if items.is_empty() {
            return Ok(());
        }
        self.run(self.invocation("refund", items, now)?).await?;
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
