//! The proxy-wasm glue: Envoy's callbacks in, [`Plugin`] decisions out.

#[allow(unsafe_code)] // Host calls through the proxy-wasm ABI: each block has its SAFETY note.
mod abi;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use sluice_core::policy::Direction;
use sluice_core::store::{SharedBytes, StoreError, WriteOutcome};
use sluice_core::time::{Nanos, Span};

use crate::host::{Host, MetricId};
use crate::http::LocalReply;
use crate::plugin::{Plugin, Step, Wake};
use crate::sync_service::SyncService;

const LOG_WARN: u32 = 3;
const LOG_ERROR: u32 = 4;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { plugin: Rc::new(RefCell::new(None)), service: None })
    });
}}

/// The `root_id` of the plugin that runs the lease sync service (a
/// singleton `WasmService`) instead of the HTTP filter.
const SYNC_ROOT_ID: &str = "sluice_sync";
/// The `vm_id` the demand queue is looked up under when the host does
/// not tell this VM's own.
const DEFAULT_VM_ID: &str = "sluice";

/// How long a worker waits before looking for the demand queue again
/// after not finding it (no sync service configured, or not started yet).
const QUEUE_RETRY: Span = Span::SECOND;

thread_local! {
    /// The demand queue's id once resolved (the service registers it).
    static DEMAND_QUEUE_ID: Cell<Option<u32>> = const { Cell::new(None) };
    /// No lookup of the demand queue before this time (nanoseconds).
    static DEMAND_QUEUE_RETRY_AT: Cell<u64> = const { Cell::new(0) };
}

/// The VM's plugin, shared by its root and HTTP contexts.
type SharedPlugin = Rc<RefCell<Option<Plugin<EnvoyShared>>>>;

/// Envoy through the raw ABI; host failures are logged, never fatal.
struct EnvoyHost;

/// The host's bytes as text: in place when they are UTF-8 (as header
/// values nearly always are), else a lossy copy.
fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

impl Host for EnvoyHost {
    fn now(&self) -> Nanos {
        // Without a clock, time stands still: algorithms then refill
        // nothing, which never admits more.
        Nanos(abi::now_nanos().unwrap_or(0))
    }
    fn request_header(&self, name: &str) -> Option<String> {
        text(abi::header(abi::Map::RequestHeaders, name).ok().flatten())
    }
    fn set_request_header(&self, name: &str, value: &str) {
        if let Err(s) = abi::set_header(abi::Map::RequestHeaders, name, value) {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot set header {name}: status {}", s.0),
            );
        }
    }
    fn remove_request_header(&self, name: &str) {
        if let Err(s) = abi::remove_header(abi::Map::RequestHeaders, name) {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot remove header {name}: status {}", s.0),
            );
        }
    }
    fn response_header(&self, name: &str) -> Option<String> {
        text(abi::header(abi::Map::ResponseHeaders, name).ok().flatten())
    }
    fn set_response_header(&self, name: &str, value: &str) {
        if let Err(s) = abi::set_header(abi::Map::ResponseHeaders, name, value) {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot set header {name}: status {}", s.0),
            );
        }
    }
    fn peer_address(&self) -> Option<String> {
        text(abi::property(b"source\0address\0").ok().flatten())
    }
    fn response_trailer(&self, name: &str) -> Option<String> {
        text(abi::header(abi::Map::ResponseTrailers, name).ok().flatten())
    }
    fn set_response_trailer(&self, name: &str, value: &str) {
        if let Err(s) = abi::set_header(abi::Map::ResponseTrailers, name, value) {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot set trailer {name}: status {}", s.0),
            );
        }
    }
    fn body(&self, direction: Direction, size: usize) -> Option<Vec<u8>> {
        abi::body(body_of(direction), size).ok()
    }
    fn set_body(&self, direction: Direction, size: usize, bytes: &[u8]) {
        if let Err(s) = abi::set_body(body_of(direction), size, bytes) {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot rewrite a body chunk: status {}", s.0),
            );
        }
    }
    fn set_tick_millis(&self, millis: u32) {
        if let Err(s) = abi::set_tick_period(millis) {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot set tick period: status {}", s.0),
            );
        }
    }
    fn define_counter(&self, name: &str) -> Option<MetricId> {
        define(abi::MetricKind::Counter, name)
    }
    fn define_gauge(&self, name: &str) -> Option<MetricId> {
        define(abi::MetricKind::Gauge, name)
    }
    fn increment(&self, metric: MetricId, by: u64) {
        if by > 0 {
            let _ = abi::increment_metric(metric.0, i64::try_from(by).unwrap_or(i64::MAX));
        }
    }
    fn add_to_gauge(&self, metric: MetricId, delta: i64) {
        if delta != 0 {
            let _ = abi::increment_metric(metric.0, delta);
        }
    }
    fn warn(&self, message: &str) {
        abi::log(LOG_WARN, message);
    }
    fn random_u64(&self) -> Option<u64> {
        // WASI's random_get, which Envoy's V8 runtime provides.
        getrandom::u64().ok()
    }
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Span,
    ) -> Option<u32> {
        // Through the SDK, not `abi`: only its dispatch registers the token,
        // without which the SDK drops the answer instead of routing it to
        // `on_grpc_call_response`. It returns Envoy's statuses for a call
        // that cannot start (unknown cluster: ParseFailure; InternalFailure)
        // and panics only on ones Envoy does not return for a cluster name.
        let timeout = Duration::from_nanos(timeout.as_nanos());
        match proxy_wasm::hostcalls::dispatch_grpc_call(
            cluster,
            service,
            method,
            Vec::new(),
            Some(message),
            timeout,
        ) {
            Ok(token) => Some(token),
            Err(status) => {
                abi::log(
                    LOG_WARN,
                    &format!(
                        "sluice: cannot call {service}/{method} on cluster {cluster}: {status:?}"
                    ),
                );
                None
            }
        }
    }
    fn enqueue(&self, name: &str, message: &[u8]) -> bool {
        let Some(id) = queue_id(name) else {
            return false;
        };
        match abi::enqueue(id, message) {
            Ok(()) => true,
            Err(_) => {
                // The service's VM went away: look the queue up again.
                DEMAND_QUEUE_ID.with(|c| c.set(None));
                false
            }
        }
    }
    fn register_queue(&self, name: &str) -> Option<u32> {
        abi::register_queue(name).ok()
    }
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        abi::dequeue(queue).ok().flatten()
    }
    fn node_id(&self) -> Option<String> {
        text(abi::property(b"node\0id\0").ok().flatten())
    }
}

/// The id of the shared queue `name` registered by the service of this
/// VM's `vm_id`, cached once found.
fn queue_id(name: &str) -> Option<u32> {
    if let Some(id) = DEMAND_QUEUE_ID.with(Cell::get) {
        return Some(id);
    }
    let now = abi::now_nanos().unwrap_or(0);
    if now < DEMAND_QUEUE_RETRY_AT.with(Cell::get) {
        return None;
    }
    let vm_id = text(abi::property(b"plugin_vm_id\0").ok().flatten())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_VM_ID.to_owned());
    match abi::resolve_queue(&vm_id, name).ok().flatten() {
        Some(id) => {
            DEMAND_QUEUE_ID.with(|c| c.set(Some(id)));
            Some(id)
        }
        None => {
            // Without a service every request of a key without lease would
            // look again: two host calls each. Once a second is enough.
            DEMAND_QUEUE_RETRY_AT.with(|c| c.set(Nanos(now).plus(QUEUE_RETRY).get()));
            None
        }
    }
}

fn define(kind: abi::MetricKind, name: &str) -> Option<MetricId> {
    match abi::define_metric(kind, name) {
        Ok(id) => Some(MetricId(id)),
        Err(s) => {
            abi::log(
                LOG_WARN,
                &format!("sluice: cannot define stat {name}: status {}", s.0),
            );
            None
        }
    }
}

fn body_of(direction: Direction) -> abi::Body {
    match direction {
        Direction::Client => abi::Body::Request,
        Direction::Server => abi::Body::Response,
    }
}

/// Envoy's shared data: visible to every worker's VM, with CAS.
#[derive(Debug)]
struct EnvoyShared;

impl SharedBytes for EnvoyShared {
    fn get(&self, name: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        abi::get_shared(name).map_err(|_| StoreError::Unavailable("shared data read failed"))
    }
    fn set(&mut self, name: &str, value: &[u8], cas: u32) -> Result<WriteOutcome, StoreError> {
        match abi::set_shared(name, value, cas) {
            Ok(()) => Ok(WriteOutcome::Written),
            Err(abi::CAS_MISMATCH) => Ok(WriteOutcome::CasMismatch),
            Err(_) => Err(StoreError::Unavailable("shared data write failed")),
        }
    }
}

/// Resets the current stream, towards the client and the upstream alike.
fn reset() {
    if let Err(s) = abi::reset_stream() {
        abi::log(
            LOG_WARN,
            &format!("sluice: cannot reset a stream: status {}", s.0),
        );
    }
}

/// gRPC's INTERNAL: the answer of a successful call could not be read.
const GRPC_INTERNAL: u32 = 13;

/// Performs a plugin decision on the current request.
fn wake(wake: Wake) {
    match wake {
        Wake::Resume => {
            let _ = abi::resume_request();
        }
        Wake::Reply(reply) => send(&reply),
        Wake::Reset => reset(),
    }
}

/// Hands the answer of gRPC call `token` (status 0: a message of `size`
/// bytes) to the plugin, then resumes or answers the request that waited
/// for it. Calls started from a tick answer on the root context, so the
/// request is made current first.
fn quota_answer(plugin: &SharedPlugin, token: u32, status: u32, size: usize) {
    let answer = grpc_answer(status, size);
    let decided = match plugin.try_borrow_mut() {
        Ok(mut slot) => slot
            .as_mut()
            .and_then(|p| p.on_quota_answer(&EnvoyHost, token, answer.as_deref().map_err(|s| *s))),
        Err(_) => None,
    };
    if let Some((context_id, decision)) = decided {
        if abi::set_effective_context(context_id).is_ok() {
            wake(decision);
        }
    }
}

fn send(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    if let Err(s) = abi::send_local_response(reply.status, &headers, &reply.body, reply.grpc_status)
    {
        abi::log(
            LOG_WARN,
            &format!("sluice: cannot send local reply: status {}", s.0),
        );
    }
}

/// A plugin's root: the HTTP filter's (with its HTTP contexts), or the
/// lease sync service's when the plugin's `root_id` is [`SYNC_ROOT_ID`].
struct Root {
    plugin: SharedPlugin,
    service: Option<SyncService<EnvoyShared>>,
}

/// The answer of gRPC call (status 0: a message of `size` bytes).
fn grpc_answer(status: u32, size: usize) -> Result<Vec<u8>, u32> {
    if status != 0 {
        return Err(status);
    }
    abi::grpc_answer(size).map_err(|s| {
        abi::log(
            LOG_WARN,
            &format!(
                "sluice: cannot read the quota server's answer: status {}",
                s.0
            ),
        );
        GRPC_INTERNAL
    })
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // The VM stops: the stats increments still waiting reach Envoy.
        if let Ok(slot) = self.plugin.try_borrow() {
            if let Some(plugin) = slot.as_ref() {
                plugin.flush_metrics(&EnvoyHost);
            }
        }
        true
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        match self.service.as_mut() {
            Some(service) => {
                let answer = grpc_answer(status_code, response_size);
                service.on_sync_answer(&EnvoyHost, token_id, answer.as_deref().map_err(|s| *s));
            }
            None => quota_answer(&self.plugin, token_id, status_code, response_size),
        }
    }
}

impl Root {
    /// Starts the lease sync service from the plugin configuration.
    fn configure_service(&mut self, config: &[u8]) -> bool {
        match SyncService::configure(&EnvoyHost, EnvoyShared, config) {
            Ok(service) => {
                self.service = Some(service);
                true
            }
            Err(e) => {
                abi::log(LOG_ERROR, &e.to_string());
                false
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = match abi::plugin_configuration() {
            Ok(c) => c,
            Err(s) => {
                abi::log(
                    LOG_ERROR,
                    &format!("sluice: cannot read plugin configuration: status {}", s.0),
                );
                return false;
            }
        };
        let root_id = text(abi::property(b"plugin_root_id\0").ok().flatten());
        if root_id.as_deref() == Some(SYNC_ROOT_ID) {
            return self.configure_service(&config);
        }
        match Plugin::configure(&EnvoyHost, EnvoyShared, &config) {
            Ok(plugin) => match self.plugin.try_borrow_mut() {
                Ok(mut slot) => {
                    // The stats increments the old configuration counted
                    // still reach Envoy.
                    if let Some(old) = slot.replace(plugin) {
                        old.flush_metrics(&EnvoyHost);
                    }
                    true
                }
                Err(_) => false,
            },
            Err(e) => {
                abi::log(LOG_ERROR, &e.to_string());
                false
            }
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some(service) = self.service.as_mut() {
            service.on_queue_ready(&EnvoyHost);
        }
    }

    fn on_tick(&mut self) {
        if let Some(service) = self.service.as_mut() {
            service.on_tick(&EnvoyHost);
            return;
        }
        // Decide first, then act: resuming or replying calls back into the
        // filter, which must find the plugin free.
        let wakes = match self.plugin.try_borrow_mut() {
            Ok(mut slot) => slot
                .as_mut()
                .map(|p| p.on_tick(&EnvoyHost))
                .unwrap_or_default(),
            Err(_) => return,
        };
        for (context_id, decision) in wakes {
            if abi::set_effective_context(context_id).is_ok() {
                wake(decision);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            plugin: Rc::clone(&self.plugin),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    context_id: u32,
    plugin: SharedPlugin,
}

impl Http {
    /// Runs `f` on the plugin if it is configured and not busy (a call
    /// re-entering from our own local reply finds it busy and passes).
    fn with_plugin<T>(&self, default: T, f: impl FnOnce(&mut Plugin<EnvoyShared>) -> T) -> T {
        match self.plugin.try_borrow_mut() {
            Ok(mut slot) => slot.as_mut().map_or(default, f),
            Err(_) => default,
        }
    }
}

impl Context for Http {
    fn on_done(&mut self) -> bool {
        let id = self.context_id;
        self.with_plugin((), |p| p.on_done(&EnvoyHost, id));
        true
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        quota_answer(&self.plugin, token_id, status_code, response_size);
    }
}

impl Http {
    /// Runs a plugin step and performs what it asks: a reply is sent only
    /// after the plugin is free again (Envoy calls straight back into it).
    fn act(&self, step: Step) -> Action {
        match step {
            Step::Continue => Action::Continue,
            Step::Pause => Action::Pause,
            Step::Reply(reply) => {
                send(&reply);
                Action::Pause
            }
            Step::Reset => {
                reset();
                Action::Pause
            }
        }
    }

    fn body(&self, direction: Direction, size: usize, end_of_stream: bool) -> Action {
        let id = self.context_id;
        let step = self.with_plugin(Step::Continue, |p| {
            p.on_body(&EnvoyHost, id, direction, size, end_of_stream)
        });
        self.act(step)
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let id = self.context_id;
        let step = self.with_plugin(Step::Continue, |p| p.on_request_headers(&EnvoyHost, id));
        self.act(step)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(Direction::Client, size, end_of_stream)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(Direction::Server, size, end_of_stream)
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        let id = self.context_id;
        self.with_plugin((), |p| p.on_response_trailers(&EnvoyHost, id));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let id = self.context_id;
        self.with_plugin((), |p| p.on_response_headers(&EnvoyHost, id));
        Action::Continue
    }
}
