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
