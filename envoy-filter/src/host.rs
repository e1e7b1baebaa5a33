//! What the filter needs from Envoy, as one small trait.

use sluice_core::time::Nanos;

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
    /// A response header of the current request.
    fn response_header(&self, name: &str) -> Option<String>;
    /// Sets (replaces) a response header of the current request.
    fn set_response_header(&self, name: &str, value: &str);
    /// The downstream peer address (`ip:port`).
    fn peer_address(&self) -> Option<String>;
    /// Asks for ticks every `millis` (0 stops them).
    fn set_tick_millis(&self, millis: u32);
    /// Defines a counter; `None` if the host refused.
    fn define_counter(&self, name: &str) -> Option<MetricId>;
    /// Adds `by` (> 0) to a counter.
    fn increment(&self, metric: MetricId, by: u64);
    /// Logs a warning.
    fn warn(&self, message: &str);
}

/// A scripted Envoy for unit tests: one current request at a time.
#[cfg(test)]
pub(crate) mod fake {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::{Host, MetricId};
    use sluice_core::time::Nanos;

    #[derive(Default)]
    pub(crate) struct FakeHost {
        pub now: Cell<u64>,
        pub request: RefCell<HashMap<String, String>>,
        pub response: RefCell<HashMap<String, String>>,
        pub peer: RefCell<Option<String>>,
        pub tick_millis: Cell<u32>,
        pub metric_names: RefCell<Vec<String>>,
        pub metric_values: RefCell<HashMap<u32, u64>>,
        pub warnings: RefCell<Vec<String>>,
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
        }

        pub fn respond(&self, status: u16) {
            self.response
                .borrow_mut()
                .insert(":status".into(), status.to_string());
        }

        pub fn counter(&self, name: &str) -> u64 {
            let names = self.metric_names.borrow();
            names
                .iter()
                .position(|n| n == name)
                .and_then(|i| self.metric_values.borrow().get(&(i as u32)).copied())
                .unwrap_or(0)
        }
    }

    impl Host for FakeHost {
        fn now(&self) -> Nanos {
            Nanos(self.now.get())
        }
        fn request_header(&self, name: &str) -> Option<String> {
            self.request.borrow().get(name).cloned()
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
        fn set_tick_millis(&self, millis: u32) {
            self.tick_millis.set(millis);
        }
        fn define_counter(&self, name: &str) -> Option<MetricId> {
            let mut names = self.metric_names.borrow_mut();
            let id = names.iter().position(|n| n == name).unwrap_or_else(|| {
                names.push(name.into());
                names.len() - 1
            });
            Some(MetricId(id as u32))
        }
        fn increment(&self, metric: MetricId, by: u64) {
            assert!(by > 0, "Envoy refuses increments of 0");
            *self.metric_values.borrow_mut().entry(metric.0).or_default() += by;
        }
        fn warn(&self, message: &str) {
            self.warnings.borrow_mut().push(message.into());
        }
    }
}
