//! `make demo`: the local stack (tests/src/stack/) with two Envoys and the
//! in-memory quota server, HTTP, gRPC and WebSocket traffic through both
//! Envoys against the shared limits of `envoy/stack/filter.json` and
//! `envoy/stack/sluice.yaml`, a summary, and everything stopped. Builds
//! nothing itself: `make demo` builds the filter, the quota server and the
//! `upstreams` binary first.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use sluice_e2e::stack::demo::{drive, summary};
use sluice_e2e::stack::files;
use sluice_e2e::stack::local::{LocalStack, Options};
use sluice_e2e::target_dir;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let started = Instant::now();
    let options = Options::new(&target_dir().join("demo"))?;
    println!("Sluice demo: starting two Envoys, the quota server (memory) and the upstreams...");
    let stack = LocalStack::start(&options).await?;
    println!("{}", stack.describe());
    let demo = drive(&stack).await?;
    print!("{}", summary(&demo, &stack.filter, &files::quota_limits()?));
    drop(stack);
    println!(
        "\nStopped every process of the stack ({:.1} s in all; logs kept in {}).",
        started.elapsed().as_secs_f64(),
        options.dir.display()
    );
    Ok(())
}
