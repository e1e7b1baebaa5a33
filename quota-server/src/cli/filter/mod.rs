//! `sluice filter`: checks the filter's configuration before Envoy sees it
//! (`validate`), and runs traffic through core's engine as the filter
//! would (`simulate`, see `run`; its traffic script is `script`).

mod run;
pub mod script;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use sluice_core::config::{Config, ConfigError};
use sluice_core::policy::Policy;

pub use run::{simulate, FilterSimulateError};

/// `sluice filter` subcommands.
#[derive(Subcommand, Debug)]
pub enum FilterCommand {
    /// Checks filter configurations: prints `FILE: ok (N rules)` or every
    /// error with its field path. Exits 1 if a file has errors, 2 if one
    /// cannot be read. `-` reads standard input.
    Validate {
        /// The files (JSON; `.yaml`/`.yml` files are read as YAML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Runs a traffic script through the filter's engine on a simulated
    /// clock, printing each request's decision and response headers.
    Simulate {
        /// The filter configuration (`-`: standard input).
        file: PathBuf,
        /// The traffic script (see the README, "Check a configuration
        /// before deploying").
        #[arg(long)]
        traffic: PathBuf,
    },
}

/// How a configuration is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JSON, as Envoy passes it to the filter.
    Json,
    /// YAML (the same fields).
    Yaml,
}

impl Format {
    /// YAML for `.yaml` and `.yml` files, else JSON (the filter's own).
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Format::Yaml,
            _ => Format::Json,
        }
    }
}

/// Parses and validates a filter configuration as the filter does.
pub fn read_policy(text: &str, format: Format) -> Result<(Config, Policy), ConfigError> {
    let config = match format {
        Format::Json => Config::from_json(text)?,
        Format::Yaml => Config::from_yaml(text)?,
    };
    let policy = config.validate()?;
    Ok((config, policy))
}

/// Reads a file, or standard input for `-`.
pub fn read_input(path: &Path) -> std::io::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else {
        std::fs::read_to_string(path)
    }
}

/// The name a file is reported under.
fn shown(path: &Path) -> String {
    if path == Path::new("-") {
        "<stdin>".to_owned()
    } else {
        path.display().to_string()
    }
}

/// Whether a configuration was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Valid.
    Ok,
    /// Refused; its errors were printed.
    Invalid,
}

/// Checks one configuration's text: `NAME: ok (N rules)` on `out`, or
/// every error as `NAME: PATH: MESSAGE` on `err`, one a line.
pub fn check(
    name: &str,
    text: &str,
    format: Format,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Checked {
    // Output errors are ignored: a reader may have stopped reading, and
    // the exit status still tells the result.
    match read_policy(text, format) {
        Ok((config, policy)) => {
            let disabled = config.rules.len() - policy.rules.len();
            let disabled = match disabled {
                0 => String::new(),
                n => format!(", {n} disabled"),
            };
            let _ = writeln!(out, "{name}: ok ({} rules{disabled})", policy.rules.len());
            Checked::Ok
        }
        Err(ConfigError::Invalid(errors)) => {
            for e in errors {
                let _ = writeln!(err, "{name}: {e}");
            }
            Checked::Invalid
        }
        Err(e) => {
            let _ = writeln!(err, "{name}: {e}");
            Checked::Invalid
        }
    }
}

/// Exit status of `validate` when a file has errors.
const EXIT_INVALID: u8 = 1;
/// Exit status of `validate` when a file cannot be read.
const EXIT_UNREADABLE: u8 = 2;

/// Validates every file; the exit status is the worst outcome.
fn validate(files: &[PathBuf]) -> ExitCode {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let mut status = 0;
    for path in files {
        let name = shown(path);
        match read_input(path) {
            Ok(text) => {
                if check(&name, &text, Format::of(path), &mut out, &mut err) == Checked::Invalid {
                    status = status.max(EXIT_INVALID);
                }
            }
            Err(e) => {
                let _ = writeln!(err, "{name}: cannot read: {e}");
                status = EXIT_UNREADABLE;
            }
        }
    }
    ExitCode::from(status)
}

/// Runs a `sluice filter` subcommand.
pub fn run(command: FilterCommand) -> ExitCode {
    match command {
        FilterCommand::Validate { files } => validate(&files),
        FilterCommand::Simulate { file, traffic } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            match simulate(&file, &traffic, &mut out)
                .and_then(|()| out.flush().map_err(FilterSimulateError::Output))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice filter simulate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
