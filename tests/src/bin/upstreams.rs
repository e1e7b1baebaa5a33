//! `upstreams`: the demo upstreams as one process, for the stack (`make
//! stack-up`, `make demo`) and its containers (`envoy/compose.yaml`).
//!
//! Serves the harness's HTTP echo ([`Upstream`]), gRPC services
//! ([`GrpcUpstream`]) and WebSocket echo and rooms ([`WsUpstream`]), each on
//! its own address (default 127.0.0.1 on a free port), prints one line per
//! listener and then `upstreams: ready`, and runs until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser;
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::stack::upstreams::{READY_LINE, SERVING_PREFIX};
use sluice_e2e::upstream::Upstream;
use sluice_e2e::ws_upstream::WsUpstream;
use tokio::signal::unix::{signal, SignalKind};

/// The demo's HTTP, gRPC and WebSocket upstreams.
#[derive(Parser)]
#[command(name = "upstreams")]
struct Args {
    /// HTTP/1.1 and h2c echo.
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
    /// gRPC (h2c): user.UserService and chat.ChatService.
    #[arg(long, default_value = "127.0.0.1:0")]
    grpc: SocketAddr,
    /// WebSocket echo (/ws) and chat rooms (/room/<name>).
    #[arg(long, default_value = "127.0.0.1:0")]
    ws: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("upstreams: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upstreams: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let http = Upstream::start_on(args.http).await?;
    let grpc = GrpcUpstream::start_on(args.grpc).await?;
    let ws = WsUpstream::start_on(args.ws).await?;
    println!("{SERVING_PREFIX}http {}", http.addr());
    println!("{SERVING_PREFIX}grpc {}", grpc.addr());
    println!("{SERVING_PREFIX}ws {}", ws.addr());
    println!("{READY_LINE}");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
