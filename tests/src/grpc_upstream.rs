//! An in-process tonic upstream (h2c on 127.0.0.1) serving
//! `user.UserService` and `chat.ChatService`, counting what reached it so
//! tests can tell what Envoy let through:
//! - [`GrpcUpstream::calls`]: calls received per method;
//! - [`GrpcUpstream::received`]: client messages received per method;
//! - [`GrpcUpstream::open_streams`]: `Chat` and `Subscribe` streams whose
//!   handler is still running;
//! - [`GrpcUpstream::release_held`]: ends the `Subscribe` streams asked to
//!   hold;
//! - [`GrpcUpstream::sent`]: `Subscribe` messages sent;
//! - [`GrpcUpstream::ends`]: how `Upload` and `Chat` requests ended: cleanly
//!   (the client's end of stream: an upload is committed) or broken (a reset).
//!
//! It takes gzip-compressed messages, as many servers do.
//!
//! `GetUser` and `ListUsers` answer as their request metadata asks:
//! - `x-echo-usage: <value>`: the call's trailers carry `x-tokens-used:
//!   <value>` (verbatim), an upstream reporting what the call used (README.md,
//!   "Charging by usage"); a failed unary call carries it in its
//!   trailers-only response;
//! - `x-fail-with: <code>` (0–16): the call ends with that gRPC status:
//!   `GetUser` at once, a trailers-only response; `ListUsers` after sending
//!   its users, in trailers after the response.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use anyhow::{Context as _, Result};
use http_body_util::BodyExt as _;
use hyper::header::HeaderValue;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use tower::util::MapResponseLayer;

use crate::grpc::chat::chat_service_server::{ChatService, ChatServiceServer};
use crate::grpc::chat::{ChatMessage, SubscribeRequest, UploadReply};
use crate::grpc::user::user_service_server::{UserService, UserServiceServer};
use crate::grpc::user::{GetUserRequest, ListUsersRequest, User};
use crate::upstream::{ECHO_USAGE, USAGE};

/// The request metadata naming the gRPC status a call should end with.
pub const FAIL_WITH: &str = "x-fail-with";

/// A running gRPC upstream; stops when dropped.
pub struct GrpcUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

struct State {
    calls: Mutex<HashMap<&'static str, u64>>,
    received: Mutex<HashMap<&'static str, u64>>,
    sent: Mutex<HashMap<&'static str, u64>>,
    clean_ends: Mutex<HashMap<&'static str, u64>>,
    broken_ends: Mutex<HashMap<&'static str, u64>>,
    open_streams: AtomicU64,
    release: watch::Sender<bool>,
}

impl GrpcUpstream {
    /// Binds 127.0.0.1:0 and serves in the background (needs a tokio runtime).
    pub async fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Binds `addr` and serves in the background (needs a tokio runtime).
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the gRPC upstream on {addr}"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            calls: Mutex::default(),
            received: Mutex::default(),
            sent: Mutex::default(),
            clean_ends: Mutex::default(),
            broken_ends: Mutex::default(),
            open_streams: AtomicU64::new(0),
            release: watch::Sender::new(false),
        });
        let service = Service(Arc::clone(&state));
        let server = tonic::transport::Server::builder()
            .layer(MapResponseLayer::new(usage_into_trailers))
            .add_service(
                UserServiceServer::new(service.clone())
                    .accept_compressed(CompressionEncoding::Gzip),
            )
            .add_service(
                ChatServiceServer::new(service).accept_compressed(CompressionEncoding::Gzip),
            )
            .serve_with_incoming(TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        Ok(Self { addr, state, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Calls of `method` (e.g. `"GetUser"`) received so far.
    pub fn calls(&self, method: &str) -> u64 {
        count(&self.state.calls, method)
    }

    /// Client messages of `method` received so far.
    pub fn received(&self, method: &str) -> u64 {
        count(&self.state.received, method)
    }

    /// `Chat` and `Subscribe` streams still open on the upstream's side.
    pub fn open_streams(&self) -> u64 {
        self.state.open_streams.load(Ordering::SeqCst)
    }

    /// Messages of `method` sent so far.
    pub fn sent(&self, method: &str) -> u64 {
        count(&self.state.sent, method)
    }

    /// How the requests of `method` ended so far: (clean, broken). A clean
    /// end is the client's end of stream; a broken one a reset or error.
    pub fn ends(&self, method: &str) -> (u64, u64) {
        (
            count(&self.state.clean_ends, method),
            count(&self.state.broken_ends, method),
        )
    }

    /// Ends every held `Subscribe` stream, present and future.
    pub fn release_held(&self) {
        self.state.release.send_replace(true);
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn count(map: &Mutex<HashMap<&'static str, u64>>, method: &str) -> u64 {
    lock(map).get(method).copied().unwrap_or(0)
}

fn add(map: &Mutex<HashMap<&'static str, u64>>, method: &'static str) {
    *lock(map).entry(method).or_insert(0) += 1;
}

/// Counts a stream as open until dropped (with the task serving it).
struct OpenStream(Arc<State>);

impl OpenStream {
    fn new(state: &Arc<State>) -> Self {
        state.open_streams.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(state))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Service(Arc<State>);

impl Service {
    /// Counts a call with one client message (unary and server streaming).
    fn single(&self, method: &'static str) {
        add(&self.0.calls, method);
        add(&self.0.received, method);
    }
}

/// What a call's request metadata asks of its answer (see the module docs).
struct Asked {
    usage: Option<HeaderValue>,
    fail_with: Option<Code>,
}

/// The usage a successful response (or one failing after its messages)
/// reports in its trailers: set by a handler in the response's extensions,
/// moved into the trailers by [`usage_into_trailers`], since tonic has no
/// trailing metadata of its own for a successful call.
#[derive(Clone)]
struct TrailerUsage(HeaderValue);

impl Asked {
    fn of<T>(request: &Request<T>) -> Self {
        let metadata = request.metadata();
        let usage = metadata
            .get(ECHO_USAGE)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
        let fail_with = metadata
            .get(FAIL_WITH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(Code::from_i32);
        Self { usage, fail_with }
    }

    /// The status a call asked to fail with, reporting its usage in the
    /// status's metadata (which a trailers-only response carries).
    fn failure(&self) -> Option<Status> {
        let code = self.fail_with?;
        let mut metadata = MetadataMap::new();
        if let Some(usage) = self.usage.as_ref().and_then(|u| u.to_str().ok()) {
            if let Ok(value) = usage.parse() {
                metadata.insert(USAGE, value);
            }
        }
        Some(Status::with_metadata(
            code,
            "the test asked to fail",
            metadata,
        ))
    }

    /// `message` as the answer, reporting the asked usage in its trailers.
    fn answer<T>(&self, message: T) -> Response<T> {
        let mut response = Response::new(message);
        if let Some(usage) = &self.usage {
            response
                .extensions_mut()
                .insert(TrailerUsage(usage.clone()));
        }
        response
    }
}

/// Adds the [`TrailerUsage`] a handler set to the response's trailers.
fn usage_into_trailers(
    response: hyper::Response<tonic::body::Body>,
) -> hyper::Response<tonic::body::Body> {
    let Some(TrailerUsage(usage)) = response.extensions().get::<TrailerUsage>().cloned() else {
        return response;
    };
    response.map(|body| {
        tonic::body::Body::new(body.map_frame(move |mut frame| {
            if let Some(trailers) = frame.trailers_mut() {
                trailers.insert(USAGE, usage.clone());
            }
            frame
        }))
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn user(user_id: u64) -> User {
    User {
        user_id,
        name: format!("user-{user_id}"),
    }
}

#[tonic::async_trait]
impl UserService for Service {
    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        self.single("GetUser");
        let asked = Asked::of(&request);
        if let Some(failure) = asked.failure() {
            return Err(failure);
        }
        Ok(asked.answer(user(request.into_inner().user_id)))
    }

    type ListUsersStream = BoxStream<User>;

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        self.single("ListUsers");
        let asked = Asked::of(&request);
        let count = u64::from(request.into_inner().count);
        let users = (1..=count)
            .map(|id| Ok(user(id)))
            .chain(asked.failure().map(Err));
        Ok(asked.answer(Box::pin(tokio_stream::iter(users))))
    }
}

#[tonic::async_trait]
impl ChatService for Service {
    async fn upload(
        &self,
        request: Request<Streaming<ChatMessage>>,
    ) -> Result<Response<UploadReply>, Status> {
        add(&self.0.calls, "Upload");
        let mut stream = request.into_inner();
        let mut received = 0;
        loop {
            match stream.message().await {
                Ok(Some(_message)) => {
                    add(&self.0.received, "Upload");
                    received += 1;
                }
                Ok(None) => break,
                Err(status) => {
                    add(&self.0.broken_ends, "Upload");
                    return Err(status);
                }
            }
        }
        // The client's end of stream: the upload is committed.
        add(&self.0.clean_ends, "Upload");
        Ok(Response::new(UploadReply { received }))
    }

    type ChatStream = BoxStream<ChatMessage>;

    async fn chat(
        &self,
        request: Request<Streaming<ChatMessage>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        add(&self.0.calls, "Chat");
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let open = OpenStream::new(&self.0);
        let state = Arc::clone(&self.0);
        tokio::spawn(async move {
            let _open = open;
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        add(&state.received, "Chat");
                        if tx.send(Ok(message)).await.is_err() {
                            // The response stream is gone: the call was
                            // torn down before the request ended.
                            add(&state.broken_ends, "Chat");
                            break;
                        }
                    }
                    Ok(None) => {
                        add(&state.clean_ends, "Chat");
                        break;
                    }
                    Err(_) => {
                        add(&state.broken_ends, "Chat");
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<ChatMessage>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.single("Subscribe");
        let SubscribeRequest {
            count,
            hold,
            interval_ms,
        } = request.into_inner();
        let mut released = self.0.release.subscribe();
        let (tx, rx) = mpsc::channel(16);
        let open = OpenStream::new(&self.0);
        let state = Arc::clone(&self.0);
        tokio::spawn(async move {
            let _open = open;
            for i in 1..=count {
                if i > 1 && interval_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(interval_ms.into())).await;
                }
                let message = ChatMessage {
                    text: format!("event-{i}"),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
                add(&state.sent, "Subscribe");
            }
            if hold {
                // Until the test releases it or the client goes away.
                tokio::select! {
                    _ = released.wait_for(|r| *r) => {}
                    () = tx.closed() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
