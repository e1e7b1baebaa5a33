//! The scenario `make bench-playground` times, natively and in the
//! browser: a million requests against two rules.

use crate::traffic::{Client, Shape, Traffic};

/// How many requests [`traffic`] sends.
pub const REQUESTS: u64 = 1_000_000;

/// A per-client token bucket and a sliding window over one path.
pub const CONFIG: &str = r#"{"rules": [
    {"name": "per-client", "key": ["client_ip"], "limit": {"count": 1000, "per": "1s"}, "algorithm": "token_bucket"},
    {"name": "api", "match": {"path": {"prefix": "/api"}}, "limit": {"count": 50000, "per": "1m"}, "algorithm": "sliding_window_counter"}
]}"#;

/// Ten clients at 10,000 requests a second for 10 s.
pub fn traffic() -> Traffic {
    Traffic::Generated {
        duration: "10s".into(),
        clients: (1..=10)
            .map(|i| Client {
                client: format!("10.0.0.{i}"),
                method: "GET".into(),
                path: "/api/items".into(),
                shape: Shape::Steady { rate: 10_000.0 },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_sends_a_million_requests() {
        let sent = traffic().requests().unwrap();
        assert_eq!(sent.arrivals.len() as u64, REQUESTS);
        assert!(crate::validate(CONFIG).is_ok());
    }
}
