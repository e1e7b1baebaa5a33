//! Accuracy under load, for `benchglobal`: keep-alive connections spread
//! over several Envoys send requests until a deadline, each reply kept with
//! when it was sent and answered; then the admitted replies are counted per
//! fixed window of the wall clock (as the quota server's `fixed_window`
//! aligns them: multiples of `per` since the Unix epoch).
//!
//! A reply sent in one window and answered in the next was decided in one
//! of the two, which one is unknown from outside: each window's count is
//! given as what surely fell in it plus what may have.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How long one request may take before it counts as an error.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// One reply and when its request went out and its answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timed {
    /// Just before the request was written.
    pub sent: SystemTime,
    /// Once the whole answer was read.
    pub answered: SystemTime,
    /// Its status.
    pub status: u16,
}

/// What a [`timed_load`] got.
#[derive(Debug, Default)]
pub struct TimedLoad {
    /// Every reply answered 200 or 429.
    pub replies: Vec<Timed>,
    /// Other statuses, transport errors and timeouts.
    pub errors: u64,
    /// The first of them, to say what went wrong.
    pub first_error: Option<String>,
}

/// Sends `GET path` over `connections` keep-alive HTTP/1.1 connections,
/// connection `i` to `addrs[i % addrs.len()]` (loopback only), one request
/// at a time each, until `until`.
pub async fn timed_load(
    addrs: &[SocketAddr],
    path: &str,
    connections: usize,
    until: SystemTime,
) -> Result<TimedLoad> {
    if let Some(addr) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(anyhow!("refusing to load anything but loopback: {addr}"));
    }
    let mut tasks = JoinSet::new();
    for i in 0..connections {
        let addr = addrs[i % addrs.len()];
        let path = path.to_owned();
        tasks.spawn(async move { one_connection(addr, &path, until).await });
    }
    let mut all = TimedLoad::default();
    while let Some(done) = tasks.join_next().await {
        let part = done.context("a load task panicked")?;
        all.replies.extend(part.replies);
        all.errors += part.errors;
        if all.first_error.is_none() {
            all.first_error = part.first_error;
        }
    }
    Ok(all)
}

async fn one_connection(addr: SocketAddr, path: &str, until: SystemTime) -> TimedLoad {
    let mut load = TimedLoad::default();
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    while SystemTime::now() < until {
        let sent = SystemTime::now();
        let status = tokio::time::timeout(REPLY_TIMEOUT, exchange(&mut sender, addr, path))
            .await
            .map_err(|_| anyhow!("no answer within {REPLY_TIMEOUT:?}"))
            .and_then(|r| r);
        match status {
            Ok(status @ (200 | 429)) => load.replies.push(Timed {
                sent,
                answered: SystemTime::now(),
                status,
            }),
            other => {
                load.errors += 1;
                sender = None;
                if load.first_error.is_none() {
                    load.first_error = Some(match other {
                        Ok(status) => format!("GET {path} via {addr}: status {status}"),
                        Err(e) => format!("GET {path} via {addr}: {e:#}"),
                    });
                }
            }
        }
    }
    load
}

/// One request on the connection in `sender`, opened first if there is
/// none or it closed; its status.
async fn exchange(
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    addr: SocketAddr,
    path: &str,
) -> Result<u16> {
    if sender.as_ref().is_none_or(SendRequest::is_closed) {
        let stream = TcpStream::connect(addr).await.context("connecting")?;
        let _ = stream.set_nodelay(true);
        let (new, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // The connection's task ends when its sender is dropped.
        tokio::spawn(conn);
        *sender = Some(new);
    }
    let sender = sender.as_mut().ok_or_else(|| anyhow!("no connection"))?;
    sender.ready().await.context("connection not ready")?;
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::new())
        .context("building the request")?;
    let response = sender.send_request(request).await.context("sending")?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .context("reading the body")?;
    Ok(status)
}

/// Admitted replies in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCount {
    /// The window's start, since the Unix epoch.
    pub start: Duration,
    /// Admitted and both sent and answered within the window: surely
    /// decided in it.
    pub certain: u64,
    /// Admitted, sent before it started or answered after it ended: maybe
    /// decided in it.
    pub straddling: u64,
}

/// Replies answered 200 in each whole window of `per` between `from` and
/// `to` (windows partly outside are left out), in order.
pub fn admitted_per_window(
    replies: &[Timed],
    per: Duration,
    from: SystemTime,
    to: SystemTime,
) -> Vec<WindowCount> {
    let per_ns = per.as_nanos().max(1);
    let index =
        |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() / per_ns;
    let first = index(from) + 1;
    let end = index(to);
    if end <= first {
        return Vec::new();
    }
    let mut counts: Vec<WindowCount> = (first..end)
        .map(|w| WindowCount {
            start: Duration::from_nanos(u64::try_from(w * per_ns).unwrap_or(u64::MAX)),
            certain: 0,
            straddling: 0,
        })
        .collect();
    for reply in replies.iter().filter(|r| r.status == 200) {
        let (sent, answered) = (index(reply.sent), index(reply.answered));
        for w in sent.max(first)..=answered.min(end - 1) {
            let slot = &mut counts[(w - first) as usize];
            if sent == answered {
                slot.certain += 1;
            } else {
                slot.straddling += 1;
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn reply(sent: u64, answered: u64, status: u16) -> Timed {
        Timed {
            sent: at(sent),
            answered: at(answered),
            status,
        }
    }

    #[test]
    fn counts_whole_windows_with_their_edges() {
        let replies = [
            reply(1_100, 1_101, 200), // in the partial first window: left out
            reply(1_999, 2_001, 200), // straddles 1000..2000 and 2000..3000
            reply(2_500, 2_501, 200),
            reply(2_600, 2_601, 429), // refused: not counted
            reply(2_999, 3_000, 200), // straddles into 3000..4000
            reply(3_200, 3_201, 200),
            reply(4_100, 4_101, 200), // in the partial last window: left out
        ];
        let counts = admitted_per_window(&replies, Duration::from_secs(1), at(1_050), at(4_500));
        assert_eq!(
            counts,
            vec![
                WindowCount {
                    start: Duration::from_secs(2),
                    certain: 1,
                    straddling: 2
                },
                WindowCount {
                    start: Duration::from_secs(3),
                    certain: 1,
                    straddling: 1
                },
            ]
        );
    }

    #[test]
    fn no_whole_window_no_counts() {
        let replies = [reply(1_100, 1_101, 200)];
        let counts = admitted_per_window(&replies, Duration::from_secs(1), at(1_050), at(1_900));
        assert!(counts.is_empty());
    }
}
