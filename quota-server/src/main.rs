//! The `sluice` command: runs the quota server and checks configurations.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_quota_server::config::{self, DomainConfig, LoadError, ServerConfig};
use sluice_quota_server::service;

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
    let (config, limits) = match config::load(path) {
        Ok(loaded) => loaded,
        Err(e) => return report(path, &e),
    };
    let runtime = match tokio::runtime::Runtime::new() {
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
        match listener.local_addr() {
            // Printed on stdout so scripts and tests using port 0 learn the port.
            Ok(addr) => println!("sluice: listening on {addr}"),
            Err(e) => eprintln!("sluice: listening (address unknown: {e})"),
        }
        match service::serve(&config, limits, listener, shutdown_signal()).await {
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
        FileKind::Server => match config::load(path) {
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

/// The filter's configuration, checked by core.
fn validate_filter(path: &Path, text: &str) -> ExitCode {
    let is_json = path.extension().is_some_and(|e| e == "json");
    let parsed = if is_json {
        sluice_core::config::Config::from_json(text)
    } else {
        sluice_core::config::Config::from_yaml(text)
    };
    match parsed.and_then(|c| c.validate()) {
        Ok(policy) => {
            println!(
                "{}: ok ({} rules enabled)",
                path.display(),
                policy.rules.len()
            );
            ExitCode::SUCCESS
        }
        Err(sluice_core::config::ConfigError::Invalid(errors)) => {
            for e in errors {
                eprintln!("{}: {e}", path.display());
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn show(path: &Path) -> ExitCode {
    let (config, _) = match config::load(path) {
        Ok(loaded) => loaded,
        Err(e) => return report(path, &e),
    };
    let effective = match inline_descriptor_files(config, path) {
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

/// The config with each descriptor file turned into an inline domain.
fn inline_descriptor_files(
    mut config: ServerConfig,
    path: &Path,
) -> Result<ServerConfig, LoadError> {
    let base = path.parent().unwrap_or(Path::new("."));
    for f in std::mem::take(&mut config.descriptor_files) {
        let file = config::read_descriptor_file(&base.join(&f.path))?;
        config.domains.push(DomainConfig {
            name: file.domain,
            failure_mode: f.failure_mode,
            fallback: f.fallback,
            descriptors: file.descriptors,
            rules: Vec::new(),
        });
    }
    Ok(config)
}
