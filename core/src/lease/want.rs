//! How many permits a sync asks for: enough for about one and a half
//! intervals of the key's recent demand, doubling while leases run dry,
//! never more than the rule's `max_lease`.

use crate::policy::Leasing;
use crate::time::Span;

/// What a key did since its last sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Permits taken from its leases.
    pub admitted: u64,
    /// Requests that found no lease with room (asked the quota server or
    /// were refused), including those that woke the service.
    pub missed: u64,
    /// How long ago the last sync was (the span the counts cover).
    pub over: Span,
    /// The lease of the half being refilled, as it was.
    pub last_grant: u64,
}

/// Permits to ask for: the demand rate over `usage.over` (at least an
/// interval, so one burst right after a sync does not look like a flood)
/// times one and a half intervals, at least double the last lease if it
/// ran dry, at most `max_lease`; 0 (give everything back) without demand.
pub fn want(usage: &Usage, leasing: &Leasing) -> u64 {
    let demand = usage.admitted.saturating_add(usage.missed);
    if demand == 0 {
        return 0;
    }
    let interval = u128::from(leasing.interval.as_nanos().max(1));
    let over = u128::from(usage.over.as_nanos()).max(interval);
    let rate_based = (u128::from(demand) * interval * 3).div_ceil(over * 2);
    let mut want = u64::try_from(rate_based).unwrap_or(u64::MAX).max(1);
    if usage.missed > 0 {
        want = want.max(usage.last_grant.saturating_mul(2));
    }
    want.min(leasing.max_lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leasing(max_lease: u64) -> Leasing {
        Leasing {
            interval: Span::from_millis(100),
            max_lease,
            replicas: 3,
            max_keys: 16,
        }
    }

    #[test]
    fn no_demand_gives_everything_back() {
        assert_eq!(want(&Usage::default(), &leasing(100)), 0);
    }

    #[test]
    fn a_steady_rate_asks_for_one_and_a_half_intervals() {
        let usage = Usage {
            admitted: 40,
            over: Span::from_millis(200),
            last_grant: 30,
            ..Usage::default()
        };
        assert_eq!(want(&usage, &leasing(1000)), 30);
        // A burst right after the last sync counts over a whole interval.
        let burst = Usage {
            admitted: 10,
            over: Span::from_millis(5),
            ..Usage::default()
        };
        assert_eq!(want(&burst, &leasing(1000)), 15);
    }

    #[test]
    fn a_dry_lease_doubles_up_to_the_bound() {
        let usage = Usage {
            admitted: 4,
            missed: 1,
            over: Span::from_millis(100),
            last_grant: 4,
        };
        assert_eq!(want(&usage, &leasing(1000)), 8);
        assert_eq!(want(&usage, &leasing(6)), 6);
        let first = Usage {
            missed: 1,
            ..Usage::default()
        };
        assert_eq!(want(&first, &leasing(1000)), 2, "a new key's first demand");
    }
}
