//! The `sluice` command: runs the quota server and checks configurations.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sluice_quota_server::admin;
use sluice_quota_server::cli;
use sluice_quota_server::config::{self, LoadError};
use sluice_quota_server::controls::Controls;
use sluice_quota_server::limits;
use sluice_quota_server::reload;
use sluice_quota_server::service;
use sluice_quota_server::shared::Shared;
use sluice_quota_server::source::ConfigSource;
use sluice_quota_server::storage::{system_now, Store};

/// Every call allocates (decoding, the response, its headers): mimalloc's
/// per-thread heaps cost less per decision than the system allocator
/// (measured with `benchquota --against`, a build without it).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Sluice: exact rate limiting for Envoy.
#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the quota server (Envoy's rate limit service and gRPC health).
    Serve {
        /// The server's file (`sluice.yaml`) or an envoyproxy/ratelimit file.
        #[arg(long, short, default_value = "sluice.yaml")]
        config: PathBuf,
    },
    /// Checks or prints configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Shows what N requests would get from one limit (offline: no server).
    Test(cli::TestArgs),
    /// Checks the filter's configuration, or simulates traffic through it.
    Filter {
        #[command(subcommand)]
        command: cli::FilterCommand,
    },
    #[command(flatten)]
    Admin(cli::AdminCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Prints each error with its location; exits non-zero if there is any.
    /// Reads `sluice.yaml`, envoyproxy/ratelimit files and the filter's
    /// JSON or YAML configuration.
    Validate {
        /// The file.
        file: PathBuf,
    },
    /// Prints the configuration in effect (defaults filled in, descriptor
    /// files inlined as domains).
    Show {
        /// The file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Config {
            command: ConfigCommand::Validate { file },
        } => validate(&file),
        Command::Config {
            command: ConfigCommand::Show { file },
        } => show(&file),
        Command::Test(args) => match cli::simulate(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice test: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Filter { command } => cli::filter::run(command),
        Command::Admin(command) => admin_command(command),
    }
}

/// Runs a subcommand that calls the admin API and prints its answer.
fn admin_command(command: cli::AdminCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(command)) {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &Path) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (config, limits) = match limits::load(path) {
        Ok(loaded) => loaded,
        Err(e) => return report(path, &e),
    };
    let store = match Store::from_config(&config) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("sluice: storage: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match service::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("sluice: {}: {e}", config.listen.grpc);
                return ExitCode::FAILURE;
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let controls = match Controls::new(&config.admin, base) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sluice: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shared = Arc::new(Shared::new(limits, controls, store));
        let source = Arc::new(ConfigSource::new(path.to_path_buf(), config.clone()));
        if let Some(log) = &config.admin.audit_log {
            match admin::replay::replay(&base.join(log), &shared, &source, system_now()) {
                Ok(r) => tracing::info!(restored = r.restored, skipped = r.skipped, "runtime grants restored from the audit log"),
                Err(e) => tracing::warn!(%e),
            }
        }
        // Kept alive until the server stops; dropping it stops watching.
        let _watch = reload::watch(source.clone(), shared.clone())
            .map_err(|e| {
                tracing::warn!(%e, path = %path.display(), "not watching the configuration; restart to apply changes");
            })
            .ok();
        // Printed on stdout so scripts and tests using port 0 learn the
        // ports; the gRPC line comes last, once everything is up. Write
        // errors are ignored: a reader may have stopped reading.
        match admin::start(&config, shared.clone(), source).await {
            Ok(Some(addr)) => {
                let _ = writeln!(std::io::stdout(), "sluice: admin on {addr}");
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("sluice: admin listener {}: {e}", config.listen.admin);
                return ExitCode::FAILURE;
            }
        }
        let address = listener.local_addr();
        // Announced once storage is in place, so whoever waits for this
        // line can use every API at once.
        let ready = move || match address {
            Ok(addr) => println!("sluice: listening on {addr}"),
            Err(e) => eprintln!("sluice: listening (address unknown: {e})"),
        };
        let threads = service::threads(config.listen.worker_threads);
        match service::serve(&config, shared, listener, threads, shutdown_signal(), ready).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(%e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Prints a load error, one line per problem, each with its location.
fn report(path: &Path, error: &LoadError) -> ExitCode {
    match error {
        LoadError::Invalid(errors) => {
            for e in errors {
                eprintln!("{}: {e}", path.display());
            }
        }
        other => eprintln!("{other}"),
    }
    ExitCode::FAILURE
}

/// What a file to validate is.
enum FileKind {
    /// The filter's configuration (top-level `rules:`).
    Filter,
    /// `sluice.yaml` or an envoyproxy/ratelimit file.
    Server,
}

fn kind_of(path: &Path, text: &str) -> FileKind {
    if path.extension().is_some_and(|e| e == "json") {
        return FileKind::Filter;
    }
    let top: serde_norway::Value =
        serde_norway::from_str(text).unwrap_or(serde_norway::Value::Null);
    match top.as_mapping() {
        Some(map) if map.contains_key("rules") && !map.contains_key("domain") => FileKind::Filter,
        _ => FileKind::Server,
    }
}

fn validate(path: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    match kind_of(path, &text) {
        FileKind::Filter => validate_filter(path, &text),
        FileKind::Server => match limits::load(path) {
            Ok((_, limits)) => {
                println!(
                    "{}: ok ({} domains, {} limits)",
                    path.display(),
                    limits.domain_names().len(),
                    limits.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => report(path, &e),
        },
    }
}

/// The filter's configuration, checked by core as `sluice filter validate`
/// does (a file not ending in `.json` was recognised as YAML).
fn validate_filter(path: &Path, text: &str) -> ExitCode {
    use cli::filter::{check, Checked, Format};
    let format = if path.extension().is_some_and(|e| e == "json") {
        Format::Json
    } else {
        Format::Yaml
    };
    let name = path.display().to_string();
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    match check(&name, text, format, &mut out, &mut err) {
        Checked::Ok => ExitCode::SUCCESS,
        Checked::Invalid => ExitCode::FAILURE,
    }
}

fn show(path: &Path) -> ExitCode {
    let (config, _) = match limits::load(path) {
        Ok(loaded) => loaded,
        Err(e) => return report(path, &e),
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let effective = match config::inline_descriptor_files(config, base) {
        Ok(c) => c,
        Err(e) => return report(path, &e),
    };
    match serde_norway::to_string(&effective) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: cannot print: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
