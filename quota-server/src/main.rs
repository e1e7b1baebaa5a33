//! The `sluice` command: for now it validates a filter configuration; the
//! quota server proper arrives with its own issue.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, sub, path] if cmd == "config" && sub == "validate" => validate(path),
        _ => {
            eprintln!("usage: sluice config validate <file.json|file.yaml>");
            ExitCode::from(2)
        }
    }
}

/// Prints each configuration error with its location.
fn validate(path: &str) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let parsed = if path.ends_with(".json") {
        sluice_core::config::Config::from_json(&text)
    } else {
        sluice_core::config::Config::from_yaml(&text)
    };
    match parsed.and_then(|c| c.validate()) {
        Ok(policy) => {
            println!("{path}: ok ({} rules enabled)", policy.rules.len());
            ExitCode::SUCCESS
        }
        Err(sluice_core::config::ConfigError::Invalid(errors)) => {
            for e in errors {
                eprintln!("{path}: {e}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{path}: {e}");
            ExitCode::FAILURE
        }
    }
}
