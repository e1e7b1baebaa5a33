//! A TCP proxy on loopback that delays what the server sends back by an
//! adjustable time: a slow quota server, as Envoy sees it, without changing
//! the server. Bytes keep their order; each chunk leaves `delay` after it
//! arrived (a latency, not a bandwidth limit), so turning the delay back to
//! zero lets answers through again once the chunks already queued are out.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Chunks in flight per connection before the reader waits for the writer.
const QUEUED_CHUNKS: usize = 1024;

/// A running proxy; its connections are cut when it is dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    /// Chunks from the server not yet passed on, over every connection.
    queued: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// A chunk counted in [`DelayProxy::queued`] until it is dropped (written,
/// or lost with its connection).
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(queued: &Arc<AtomicUsize>) -> Counted {
        queued.fetch_add(1, Ordering::Relaxed);
        Counted(Arc::clone(queued))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DelayProxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`,
    /// without delay until [`DelayProxy::set_delay`].
    pub async fn start(target: SocketAddr) -> Result<DelayProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the delay proxy on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = Arc::clone(&delay_ms);
        let queued = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&queued);
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: aborts every connection.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (delay, counter) = (Arc::clone(&delay), Arc::clone(&counter));
                connections.spawn(async move {
                    // A refused connection to the target closes the client's.
                    if let Ok(server) = TcpStream::connect(target).await {
                        forward(client, server, delay, counter).await;
                    }
                });
                // Reap finished connections so the set stays small.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(DelayProxy {
            addr,
            delay_ms,
            queued,
            task,
        })
    }

    /// Chunks the server sent that the proxy holds back still: 0 once
    /// every delayed answer is out.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Delays every chunk the server sends from now on by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes: client to server at once,
/// server to client each chunk `delay` after it arrived.
async fn forward(
    client: TcpStream,
    server: TcpStream,
    delay_ms: Arc<AtomicU64>,
    counter: Arc<AtomicUsize>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let (chunks, queued) = mpsc::channel(QUEUED_CHUNKS);
    tokio::select! {
        () = copy(client_read, server_write) => {}
        () = read_delayed(server_read, chunks, delay_ms, counter) => {}
        () = write_when_due(queued, client_write) => {}
    }
}

async fn copy(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
}

async fn read_delayed(
    mut from: OwnedReadHalf,
    chunks: mpsc::Sender<(Instant, Vec<u8>, Counted)>,
    delay_ms: Arc<AtomicU64>,
    counter: Arc<AtomicUsize>,
) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::Relaxed));
        let chunk = (due, buffer[..n].to_vec(), Counted::new(&counter));
        if chunks.send(chunk).await.is_err() {
            return;
        }
    }
    // The server closed: what is queued is still delivered, then the
    // writer ends the connection.
    drop(chunks);
    std::future::pending::<()>().await;
}

async fn write_when_due(
    mut queued: mpsc::Receiver<(Instant, Vec<u8>, Counted)>,
    mut to: OwnedWriteHalf,
) {
    while let Some((due, chunk, _counted)) = queued.recv().await {
        tokio::time::sleep_until(due).await;
        if to.write_all(&chunk).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
