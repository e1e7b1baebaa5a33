//! Failing fast while storage is known to be down: after a connection
//! failure, calls fail at once for a short pause instead of each waiting
//! out the timeout; then one call probes, and success closes the breaker.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A circuit breaker shared by every call to one storage.
#[derive(Debug)]
pub struct Breaker {
    epoch: Instant,
    /// Nanoseconds since `epoch` until which calls fail fast; 0 when closed.
    open_until: AtomicU64,
    pause: Duration,
}

impl Breaker {
    /// A closed breaker that, once tripped, fails calls for `pause`.
    pub fn new(pause: Duration) -> Breaker {
        Breaker {
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
            pause,
        }
    }

    fn now(&self) -> u64 {
        // Never 0, which means closed.
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn pause_ns(&self) -> u64 {
        u64::try_from(self.pause.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether this call may go to storage: always when closed; when open,
    /// only once the pause is over, and then only for the one caller that
    /// claims the probe (the others keep failing fast).
    pub fn admit(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now.saturating_add(self.pause_ns()),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Storage answered: close.
    pub fn success(&self) {
        self.open_until.store(0, Ordering::Release);
    }

    /// Storage is unreachable: open for the pause.
    pub fn failure(&self) {
        let until = self.now().saturating_add(self.pause_ns());
        self.open_until.store(until, Ordering::Release);
    }

    /// How long calls fail fast after a failure.
    pub fn pause(&self) -> Duration {
        self.pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_failure_and_lets_one_probe_through() {
        let b = Breaker::new(Duration::from_millis(5));
        assert!(b.admit());
        b.failure();
        assert!(!b.admit());
        std::thread::sleep(Duration::from_millis(6));
        assert!(b.admit(), "the pause is over: one probe");
        assert!(!b.admit(), "only one");
        b.success();
        assert!(b.admit());
        assert!(b.admit());
    }
}
