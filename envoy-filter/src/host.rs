//! What the filter needs from Envoy, as one small trait.

use sluice_core::policy::Direction;
use sluice_core::time::{Nanos, Span};

/// A counter defined with the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricId(pub u32);

/// Envoy, as seen by the filter. Every call is infallible from the
/// filter's point of view: implementations swallow and log host errors,
/// because a panic would kill the worker's VM.
pub trait Host {
    /// Wall-clock time: shared by every worker, and windows line up with
    /// calendar minutes and hours.
    fn now(&self) -> Nanos;
    /// A request header of the current request (lossy UTF-8).
    fn request_header(&self, name: &str) -> Option<String>;
    /// Replaces (or adds) a request header of the current request.
    fn set_request_header(&self, name: &str, value: &str);
    /// Removes a request header of the current request.
    fn remove_request_header(&self, name: &str);
    /// A response header of the current request.
    fn response_header(&self, name: &str) -> Option<String>;
    /// Sets (replaces) a response header of the current request.
    fn set_response_header(&self, name: &str, value: &str);
    /// The downstream peer address (`ip:port`).
    fn peer_address(&self) -> Option<String>;
    /// A response trailer of the current request.
    fn response_trailer(&self, name: &str) -> Option<String>;
    /// Sets (replaces) a response trailer of the current request.
    fn set_response_trailer(&self, name: &str, value: &str);
    /// The first `size` bytes of the current body chunk travelling `direction`.
    fn body(&self, direction: Direction, size: usize) -> Option<Vec<u8>>;
    /// Replaces the first `size` bytes of that chunk by `bytes`.
    fn set_body(&self, direction: Direction, size: usize, bytes: &[u8]);
    /// Asks for ticks every `millis` (0 stops them).
    fn set_tick_millis(&self, millis: u32);
    /// Defines a counter; `None` if the host refused.
    fn define_counter(&self, name: &str) -> Option<MetricId>;
    /// Defines a gauge; `None` if the host refused.
    fn define_gauge(&self, name: &str) -> Option<MetricId>;
    /// Adds `by` (> 0) to a counter.
    fn increment(&self, metric: MetricId, by: u64);
    /// Moves a gauge by `delta` (non-zero).
    fn add_to_gauge(&self, metric: MetricId, delta: i64);
    /// Logs a warning.
    fn warn(&self, message: &str);
    /// A random number from the host's secure source; `None` if it has none.
    fn random_u64(&self) -> Option<u64>;
    /// Starts a unary gRPC call of `service`/`method` carrying `message` to
    /// `cluster`, given up after `timeout`. Its answer comes back with the
    /// returned token; `None` when the host refused to start it.
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Span,
    ) -> Option<u32>;
    /// Puts `message` on the shared queue `name` (registered by the sync
    /// service); false when there is no such queue (yet).
    fn enqueue(&self, name: &str, message: &[u8]) -> bool;
    /// Registers this VM as the reader of the shared queue `name`: its id,
    /// or `None` if the host refused.
    fn register_queue(&self, name: &str) -> Option<u32>;
    /// The next message of queue `queue`, `None` when it is empty.
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>>;
    /// This Envoy's node id (`--service-node`, `node.id`); `None` if unset.
    fn node_id(&self) -> Option<String>;
}

/// A scripted Envoy for unit tests: one current request at a time.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::{Cell, RefCell};
    use std::collections::{HashMap, VecDeque};

    use super::{Host, MetricId};
    use sluice_core::policy::Direction;
    use sluice_core::time::{Nanos, Span};

    /// A gRPC call the filter started.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) struct GrpcCall {
        pub cluster: String,
        pub service: String,
        pub method: String,
        pub message: Vec<u8>,
        pub timeout: Span,
    }

    #[derive(Default)]
    pub(crate) struct FakeHost {
        pub now: Cell<u64>,
        pub request: RefCell<HashMap<String, String>>,
        pub response: RefCell<HashMap<String, String>>,
        pub peer: RefCell<Option<String>>,
        pub tick_millis: Cell<u32>,
        pub metric_names: RefCell<Vec<String>>,
        pub metric_values: RefCell<HashMap<u32, i64>>,
        pub warnings: RefCell<Vec<String>>,
        pub trailers: RefCell<HashMap<String, String>>,
        /// The current body chunk per direction (client, server).
        pub bodies: RefCell<[Vec<u8>; 2]>,
        /// What `random_u64` answers (`None`: no random source).
        pub random: Cell<Option<u64>>,
        /// gRPC calls started; call `i` has token `i + 1`.
        pub grpc_calls: RefCell<Vec<GrpcCall>>,
        /// Refuse to start gRPC calls (as Envoy does for an unknown cluster).
        pub refuse_grpc: Cell<bool>,
        /// Shared queues by name; queue `i` has id `i + 1`.
        pub queues: RefCell<Vec<(String, VecDeque<Vec<u8>>)>>,
        /// What `node_id` answers.
        pub node: RefCell<Option<String>>,
    }

    impl FakeHost {
        /// Starts a new request: clears both header maps.
        pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) {
            let mut map = self.request.borrow_mut();
            map.clear();
            map.insert(":method".into(), method.into());
            map.insert(":path".into(), path.into());
            for (n, v) in headers {
                map.insert((*n).into(), (*v).into());
            }
            self.response.borrow_mut().clear();
            self.trailers.borrow_mut().clear();
        }

        pub fn respond(&self, status: u16) {
            self.response
                .borrow_mut()
                .insert(":status".into(), status.to_string());
        }

        pub fn counter(&self, name: &str) -> i64 {
            let names = self.metric_names.borrow();
            names
                .iter()
                .position(|n| n == name)
                .and_then(|i| self.metric_values.borrow().get(&(i as u32)).copied())
                .unwrap_or(0)
        }

        fn side(direction: Direction) -> usize {
            match direction {
                Direction::Client => 0,
                Direction::Server => 1,
            }
        }

        /// Makes `bytes` the current chunk travelling `direction`.
        pub fn chunk(&self, direction: Direction, bytes: &[u8]) {
            self.bodies.borrow_mut()[Self::side(direction)] = bytes.to_vec();
        }

        /// The current chunk travelling `direction`, as the filter left it.
        pub fn passed(&self, direction: Direction) -> Vec<u8> {
            self.bodies.borrow()[Self::side(direction)].clone()
        }
    }

    impl Host for FakeHost {
        fn now(&self) -> Nanos {
            Nanos(self.now.get())
        }
        fn request_header(&self, name: &str) -> Option<String> {
            self.request.borrow().get(name).cloned()
        }
        fn set_request_header(&self, name: &str, value: &str) {
            self.request.borrow_mut().insert(name.into(), value.into());
        }
        fn remove_request_header(&self, name: &str) {
            self.request.borrow_mut().remove(name);
        }
        fn response_header(&self, name: &str) -> Option<String> {
            self.response.borrow().get(name).cloned()
        }
        fn set_response_header(&self, name: &str, value: &str) {
            self.response.borrow_mut().insert(name.into(), value.into());
        }
        fn peer_address(&self) -> Option<String> {
            self.peer.borrow().clone()
        }
        fn response_trailer(&self, name: &str) -> Option<String> {
            self.trailers.borrow().get(name).cloned()
        }
        fn set_response_trailer(&self, name: &str, value: &str) {
            self.trailers.borrow_mut().insert(name.into(), value.into());
        }
        fn body(&self, direction: Direction, size: usize) -> Option<Vec<u8>> {
            let bodies = self.bodies.borrow();
            let chunk = &bodies[Self::side(direction)];
            Some(chunk[..size.min(chunk.len())].to_vec())
        }
        fn set_body(&self, direction: Direction, size: usize, bytes: &[u8]) {
            let mut bodies = self.bodies.borrow_mut();
            let chunk = &mut bodies[Self::side(direction)];
            chunk.splice(..size.min(chunk.len()), bytes.iter().copied());
        }
        fn set_tick_millis(&self, millis: u32) {
            self.tick_millis.set(millis);
        }
        fn define_counter(&self, name: &str) -> Option<MetricId> {
            let mut names = self.metric_names.borrow_mut();
            if !names.iter().any(|n| n == name) {
                names.push(name.into());
            }
            let id = names.iter().position(|n| n == name)?;
            Some(MetricId(id as u32))
        }
        fn define_gauge(&self, name: &str) -> Option<MetricId> {
            self.define_counter(name)
        }
        fn increment(&self, metric: MetricId, by: u64) {
            assert!(by > 0, "Envoy refuses increments of 0");
            let mut values = self.metric_values.borrow_mut();
            let value = values.entry(metric.0).or_default();
            *value = value.saturating_add(i64::try_from(by).unwrap_or(i64::MAX));
        }
        fn add_to_gauge(&self, metric: MetricId, delta: i64) {
            assert!(delta != 0, "Envoy refuses increments of 0");
            let mut values = self.metric_values.borrow_mut();
            let value = values.entry(metric.0).or_default();
            *value = value.saturating_add(delta);
        }
        fn warn(&self, message: &str) {
            self.warnings.borrow_mut().push(message.into());
        }
        fn random_u64(&self) -> Option<u64> {
            self.random.get()
        }
        fn grpc_call(
            &self,
            cluster: &str,
            service: &str,
            method: &str,
            message: &[u8],
            timeout: Span,
        ) -> Option<u32> {
            if self.refuse_grpc.get() {
                return None;
            }
            let mut calls = self.grpc_calls.borrow_mut();
            calls.push(GrpcCall {
                cluster: cluster.into(),
                service: service.into(),
                method: method.into(),
                message: message.to_vec(),
                timeout,
            });
            Some(calls.len() as u32)
        }
        fn enqueue(&self, name: &str, message: &[u8]) -> bool {
            let mut queues = self.queues.borrow_mut();
            match queues.iter_mut().find(|(n, _)| n == name) {
                Some((_, queue)) => {
                    queue.push_back(message.to_vec());
                    true
                }
                None => false,
            }
        }
        fn register_queue(&self, name: &str) -> Option<u32> {
            let mut queues = self.queues.borrow_mut();
            let index = match queues.iter().position(|(n, _)| n == name) {
                Some(i) => i,
                None => {
                    queues.push((name.into(), VecDeque::new()));
                    queues.len().saturating_sub(1)
                }
            };
            u32::try_from(index).ok()?.checked_add(1)
        }
        fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
            let mut queues = self.queues.borrow_mut();
            let index = usize::try_from(queue.checked_sub(1)?).ok()?;
            queues.get_mut(index)?.1.pop_front()
        }
        fn node_id(&self) -> Option<String> {
            self.node.borrow().clone()
        }
    }
}
