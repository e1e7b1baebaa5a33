//! `make bench-playground`: the time to simulate 1,000,000 requests
//! natively (release build, this machine), as the page runs them: traffic
//! generated, run through core's simulation and summed into the report.
//! Three rounds; the fastest is printed with the others.

use std::time::Instant;

use sluice_playground::traffic::{Client, Shape};
use sluice_playground::Traffic;

const CONFIG: &str = r#"{"rules": [
    {"name": "per-client", "key": ["client_ip"], "limit": {"count": 1000, "per": "1s"}, "algorithm": "token_bucket"},
    {"name": "api", "match": {"path": {"prefix": "/api"}}, "limit": {"count": 50000, "per": "1m"}, "algorithm": "sliding_window_counter"}
]}"#;

fn main() {
    // Ten clients at 10,000 requests a second for 10 s: 1,000,000 requests.
    let traffic = Traffic::Generated {
        duration: "10s".into(),
        clients: (1..=10)
            .map(|i| Client {
                client: format!("10.0.0.{i}"),
                method: "GET".into(),
                path: "/api/items".into(),
                shape: Shape::Steady { rate: 10_000.0 },
            })
            .collect(),
    };
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let report = match sluice_playground::simulate(CONFIG, &traffic) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("bench-playground: {e:?}");
                std::process::exit(1);
            }
        };
        rounds.push(started.elapsed());
        assert_eq!(report.total, 1_000_000, "the traffic is a million requests");
    }
    rounds.sort();
    let shown: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.0} ms", r.as_secs_f64() * 1e3))
        .collect();
    println!(
        "native (release, one core): 1,000,000 requests generated, simulated and reported in {} (rounds: {})",
        shown[0],
        shown.join(", ")
    );
}
