//! An in-process WebSocket upstream (tokio-tungstenite, 127.0.0.1):
//! - `/ws`: echoes every data message to its sender;
//! - `/room/<name>`: a chat room, every data message goes to every member
//!   (the sender included);
//! - `/ws/quiet`: an echo that never answers a Close (frames by hand), so
//!   a Close the client gets cannot be the upstream's answer to one Envoy
//!   sent it (tungstenite answers a Close with the same code and reason);
//! - records the data messages it received ([`WsUpstream::messages`]) and
//!   the Close frames its peers sent ([`WsUpstream::closes`]), and counts
//!   the connections still open ([`WsUpstream::open`]).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::ws_frame::{self, opcode};

/// The path of the echo that never answers a Close.
pub const QUIET_PATH: &str = "/ws/quiet";

/// A data message as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The upgrade request's path.
    pub path: String,
    pub payload: Vec<u8>,
}

/// A Close frame as the upstream received it: `None` for a Close without a
/// status code.
pub type CloseSeen = Option<(u16, String)>;

/// A running WebSocket upstream; stops when dropped.
pub struct WsUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    messages: Mutex<Vec<Received>>,
    closes: Mutex<Vec<(String, CloseSeen)>>,
    open: AtomicU64,
    rooms: Mutex<HashMap<String, broadcast::Sender<Message>>>,
}

impl WsUpstream {
    /// Binds 127.0.0.1:0 and serves in the background (needs a tokio runtime).
    pub async fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Binds `addr` and serves in the background (needs a tokio runtime).
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the WebSocket upstream on {addr}"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Ok(Self { addr, state, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every data message received so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        lock(&self.state.messages).clone()
    }

    /// The payloads received on connections to `path`, as text.
    pub fn texts(&self, path: &str) -> Vec<String> {
        lock(&self.state.messages)
            .iter()
            .filter(|m| m.path == path)
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    /// The Close frames received so far, with the connection's path.
    pub fn closes(&self) -> Vec<(String, CloseSeen)> {
        lock(&self.state.closes).clone()
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while let Ok((stream, _peer)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, Arc::clone(&state)));
    }
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let mut path = String::new();
    // The signature is tungstenite's handshake callback: its error type is
    // the response to refuse with, never used here.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    state.open.fetch_add(1, Ordering::SeqCst);
    if path == QUIET_PATH {
        serve_quiet(ws.get_mut(), &path, &state).await;
    } else {
        serve_room(ws, &path, &state).await;
    }
    state.open.fetch_sub(1, Ordering::SeqCst);
}

async fn serve_room(ws: WebSocketStream<TcpStream>, path: &str, state: &State) {
    // An echo is a room of one.
    let room = match path.strip_prefix("/room/") {
        Some(name) => lock(&state.rooms)
            .entry(name.to_owned())
            .or_insert_with(|| broadcast::channel(64).0)
            .clone(),
        None => broadcast::channel(64).0,
    };
    let mut inbox = room.subscribe();
    let (mut sink, mut stream) = ws.split();
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    lock(&state.messages).push(Received {
                        path: path.to_owned(),
                        payload: message.clone().into_data().to_vec(),
                    });
                    let _ = room.send(message);
                }
                Some(Ok(Message::Close(frame))) => {
                    let seen = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    lock(&state.closes).push((path.to_owned(), seen));
                    // tungstenite answers the Close; flushing sends the answer.
                    let _ = sink.flush().await;
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            outgoing = inbox.recv() => {
                let Ok(message) = outgoing else { break };
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Echoes complete data frames and records Close frames without answering
/// them, until the peer closes the TCP connection.
async fn serve_quiet(stream: &mut TcpStream, path: &str, state: &State) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        while let Ok(Some((frame, used))) = ws_frame::parse(&pending) {
            pending.drain(..used);
            match frame.opcode {
                opcode::TEXT | opcode::BINARY => {
                    lock(&state.messages).push(Received {
                        path: path.to_owned(),
                        payload: frame.payload.clone(),
                    });
                    let echo = ws_frame::encode(true, frame.opcode, &frame.payload, None);
                    if stream.write_all(&echo).await.is_err() {
                        return;
                    }
                }
                opcode::CLOSE => lock(&state.closes).push((path.to_owned(), frame.close())),
                _ => {}
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}
