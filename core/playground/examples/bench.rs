//! `make bench-playground`, natively: the time to simulate the bench
//! scenario's 1,000,000 requests (release build, one core of this machine)
//! as the page runs them: traffic generated, run through core's simulation
//! and summed into the report. Three rounds; the fastest first.

use std::time::Instant;

use sluice_playground::bench;

fn main() {
    let traffic = bench::traffic();
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        match sluice_playground::simulate(bench::CONFIG, &traffic) {
            Ok(report) if report.total == bench::REQUESTS => {}
            other => {
                eprintln!("bench-playground: not the bench's million requests: {other:?}");
                std::process::exit(1);
            }
        }
        rounds.push(started.elapsed().as_secs_f64() * 1e3);
    }
    rounds.sort_by(f64::total_cmp);
    let shown: Vec<String> = rounds.iter().map(|ms| format!("{ms:.0} ms")).collect();
    println!(
        "native (release): {} requests generated, simulated and reported in {} (rounds: {})",
        bench::REQUESTS,
        shown.first().map_or("?", String::as_str),
        shown.join(", ")
    );
}
