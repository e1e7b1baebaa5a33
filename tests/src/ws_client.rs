//! WebSocket clients through Envoy:
//! - [`connect`]: a tokio-tungstenite client, or the HTTP response of a
//!   refused upgrade;
//! - [`RawWs`]: frames built by hand ([`ws_frame`]) on a plain TCP stream, for what
//!   libraries do not do: frames split across arbitrary TCP writes,
//!   fragmented messages with interleaved control frames, vanishing without
//!   a Close.
//!
//! Every read is bounded by [`READ_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::ws_frame::{self, Frame};

/// How long a read (a message, a frame, a handshake) may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A tokio-tungstenite connection over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// The outcome of an upgrade request.
pub enum Upgrade {
    Open(Box<Ws>),
    /// The upgrade was answered with this (non-101) response.
    Refused(Response<Option<Vec<u8>>>),
}

impl Upgrade {
    /// The connection; panics with the response when refused.
    // A test helper: failing the test is its purpose.
    #[allow(clippy::panic)]
    pub fn open(self, what: &str) -> Box<Ws> {
        match self {
            Self::Open(ws) => ws,
            Self::Refused(response) => panic!(
                "{what}: upgrade refused with {} {:?}",
                response.status(),
                response.headers()
            ),
        }
    }
}

/// Asks for a WebSocket upgrade of `path` on `addr` with extra `headers`.
pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Upgrade> {
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(http_name(name)?, value.parse().context("header value")?);
    }
    let stream = TcpStream::connect(addr).await.context("connecting")?;
    stream.set_nodelay(true)?;
    let handshake = tokio_tungstenite::client_async(request, stream);
    match tokio::time::timeout(READ_TIMEOUT, handshake).await {
        Err(_) => bail!("upgrade of {path}: no answer within {READ_TIMEOUT:?}"),
        Ok(Ok((ws, _response))) => Ok(Upgrade::Open(Box::new(ws))),
        Ok(Err(WsError::Http(response))) => Ok(Upgrade::Refused(*response)),
        Ok(Err(e)) => Err(e).with_context(|| format!("upgrade of {path}")),
    }
}

fn http_name(name: &str) -> Result<tokio_tungstenite::tungstenite::http::HeaderName> {
    name.parse().with_context(|| format!("header name {name}"))
}

/// The next message (pongs included), or an error at the end of the stream
/// or after [`READ_TIMEOUT`].
pub async fn next_message(ws: &mut Ws) -> Result<Message> {
    match tokio::time::timeout(READ_TIMEOUT, ws.next()).await {
        Err(_) => bail!("no message within {READ_TIMEOUT:?}"),
        Ok(None) => bail!("the connection ended without a Close frame"),
        Ok(Some(message)) => message.context("reading a message"),
    }
}

/// After a Close from the peer: keeps reading, as a real client does (which
/// sends tungstenite's answering Close), until the connection ends; errors
/// on any message or if it is still open after [`READ_TIMEOUT`].
pub async fn until_closed(ws: &mut Ws) -> Result<()> {
    match tokio::time::timeout(READ_TIMEOUT, ws.next()).await {
        Err(_) => bail!("still open {READ_TIMEOUT:?} after the Close"),
        Ok(None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) => Ok(()),
        Ok(Some(Err(e))) => Err(e).context("reading after the Close"),
        Ok(Some(Ok(message))) => bail!("a message after the Close: {message:?}"),
    }
}

/// Closes the TCP connection with a reset, without any Close frame (a
/// client that vanishes).
pub fn kill(ws: Box<Ws>) -> Result<()> {
    ws.get_ref().set_zero_linger()?;
    drop(ws);
    Ok(())
}

/// A hand-driven WebSocket client on a plain TCP stream.
pub struct RawWs {
    stream: TcpStream,
    /// Bytes read but not yet consumed as a frame.
    pending: Vec<u8>,
}

impl RawWs {
    /// Performs the upgrade of `path` on `addr`; errors unless it is a 101.
    pub async fn connect(addr: SocketAddr, path: &str) -> Result<Self> {
        let mut stream = TcpStream::connect(addr).await.context("connecting")?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Self {
            stream,
            pending: Vec::new(),
        };
        let head = loop {
            if let Some(end) = raw.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = raw.pending.drain(..end + 4).collect();
                break String::from_utf8_lossy(&head).into_owned();
            }
            raw.fill().await.context("reading the upgrade response")?;
        };
        if !head.starts_with("HTTP/1.1 101") {
            bail!("upgrade of {path} refused:\n{head}");
        }
        Ok(raw)
    }

    /// Sends one masked frame, written `chunk` bytes at a time (each chunk
    /// its own write; `TCP_NODELAY` is on, so they leave as separate
    /// segments unless the kernel coalesces them).
    pub async fn send_frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        chunk: usize,
    ) -> Result<()> {
        let frame = ws_frame::encode(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]));
        for piece in frame.chunks(chunk.max(1)) {
            self.stream.write_all(piece).await?;
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Sends masked frames, each `(fin, opcode, payload)`, in a single
    /// write: small enough, they reach the proxy as one chunk.
    pub async fn send_frames(&mut self, frames: &[(bool, u8, &[u8])]) -> Result<()> {
        let bytes: Vec<u8> = frames
            .iter()
            .flat_map(|&(fin, opcode, payload)| {
                ws_frame::encode(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
            })
            .collect();
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends `bytes` as they are, in a single write: frames no well-behaved
    /// client would write.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next frame from the server.
    pub async fn read_frame(&mut self) -> Result<Frame> {
        tokio::time::timeout(READ_TIMEOUT, self.read_frame_inner())
            .await
            .map_err(|_| anyhow!("no frame within {READ_TIMEOUT:?}"))?
    }

    async fn read_frame_inner(&mut self) -> Result<Frame> {
        loop {
            if let Some((frame, used)) = ws_frame::parse(&self.pending)? {
                self.pending.drain(..used);
                if frame.masked {
                    bail!("the server sent a masked frame: {frame:?}");
                }
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let mut buf = [0u8; 4096];
        let n = self.stream.read(&mut buf).await?;
        if n == 0 {
            bail!(
                "the connection was closed ({} bytes unparsed)",
                self.pending.len()
            );
        }
        self.pending.extend_from_slice(&buf[..n]);
        Ok(())
    }
}
