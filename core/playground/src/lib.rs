//! Sluice's policy playground: core's validator and engine (the same code
//! the filter runs in Envoy) over simulated traffic, compiled for the
//! browser with wasm-bindgen. The page (`www/`) calls [`validate_json`],
//! [`simulate_json`] and [`compare_json`]; each takes and gives JSON text.

pub mod bench;
pub mod locate;
pub mod report;
pub mod traffic;

use serde::Serialize;
use sluice_core::config::{Config, ConfigError};
use sluice_core::policy::Policy;
use wasm_bindgen::prelude::wasm_bindgen;

pub use report::Report;
pub use traffic::{Requests, Traffic};

/// One problem in a pasted configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The field's path (`rules[2].limit.per`), or `(syntax)`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
    /// Where the field is in the text (1-based), when found.
    pub line: Option<usize>,
    /// The column there (1-based).
    pub column: Option<usize>,
}

/// Parses and validates a filter configuration (JSON, as Envoy passes it)
/// with core's validator: the policy, or every problem.
pub fn validate(text: &str) -> Result<Policy, Vec<Problem>> {
    let refused = match Config::from_json(text).and_then(|c| c.validate()) {
        Ok(policy) => return Ok(policy),
        Err(e) => e,
    };
    Err(match refused {
        ConfigError::Syntax { message, .. } => {
            let (line, column) = syntax_position(&message).unzip();
            vec![Problem {
                path: "(syntax)".into(),
                message,
                line,
                column,
            }]
        }
        ConfigError::Invalid(errors) => errors
            .into_iter()
            .map(|e| {
                let (line, column) = locate::locate(text, &e.path).unzip();
                Problem {
                    path: e.path,
                    message: e.message,
                    line,
                    column,
                }
            })
            .collect(),
    })
}

/// `line L column C` in a parser's message.
fn syntax_position(message: &str) -> Option<(usize, usize)> {
    let rest = message.rsplit_once("line ")?.1;
    let (line, rest) = rest.split_once(" column ")?;
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((line.parse().ok()?, column.parse().ok()?))
}

/// Why a scenario cannot run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum ScenarioError {
    /// The configuration is refused.
    Config {
        /// Every problem.
        problems: Vec<Problem>,
    },
    /// The traffic is refused.
    Traffic {
        /// Why.
        message: String,
    },
}

/// Validates `config`, generates `traffic` and runs it through the engine.
pub fn simulate(config: &str, traffic: &Traffic) -> Result<Report, ScenarioError> {
    let policy = validate(config).map_err(|problems| ScenarioError::Config { problems })?;
    let requests = traffic.requests().map_err(|e| ScenarioError::Traffic {
        message: e.to_string(),
    })?;
    report::run(&policy, &requests).map_err(|e| ScenarioError::Traffic {
        message: format!("engine: {e}"),
    })
}

/// The algorithms a comparison runs, in the page's order.
pub const COMPARED: [&str; 6] = [
    "token_bucket",
    "gcra",
    "sliding_window_counter",
    "sliding_window_log",
    "fixed_window",
    "leaky_bucket",
];

/// One algorithm's run in a comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Compared {
    /// The algorithm every rate rule was given.
    pub algorithm: &'static str,
    /// The run, or why this algorithm cannot take the configuration.
    pub result: Result<Report, ScenarioError>,
}

/// The configuration with every rate rule's algorithm set to `algorithm`
/// (and `burst` dropped where the algorithm has none): the same limits,
/// counted another way. Rules that count in-flight requests or bytes keep
/// theirs.
pub fn with_algorithm(config: &str, algorithm: &str) -> Option<String> {
    let mut value: serde_json::Value = serde_json::from_str(config).ok()?;
    let bursty = matches!(algorithm, "token_bucket" | "leaky_bucket" | "gcra");
    for rule in value.get_mut("rules")?.as_array_mut()? {
        let Some(rule) = rule.as_object_mut() else {
            continue;
        };
        if rule.contains_key("counts") && rule.get("counts") != Some(&"requests".into()) {
            continue;
        }
        rule.insert("algorithm".into(), algorithm.into());
        if !bursty {
            for limit in ["limit", "fallback"] {
                let quota = match limit {
                    "limit" => rule.get_mut("limit"),
                    _ => rule.get_mut("sync").and_then(|s| s.get_mut("fallback")),
                };
                if let Some(quota) = quota.and_then(|q| q.as_object_mut()) {
                    quota.remove("burst");
                }
            }
        }
    }
    serde_json::to_string(&value).ok()
}

/// Runs the same traffic under each of [`COMPARED`].
pub fn compare(config: &str, traffic: &Traffic) -> Result<Vec<Compared>, ScenarioError> {
    validate(config).map_err(|problems| ScenarioError::Config { problems })?;
    Ok(COMPARED
        .iter()
        .map(|algorithm| Compared {
            algorithm,
            result: match with_algorithm(config, algorithm) {
                Some(config) => simulate(&config, traffic),
                None => Err(ScenarioError::Traffic {
                    message: "the configuration has no rules to rewrite".into(),
                }),
            },
        })
        .collect())
}

/// JSON text of `value` (serialising the playground's own types cannot
/// fail; an empty object stands in if it ever did).
fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".into())
}

/// The traffic's JSON, or the scenario error it is.
fn traffic_of(traffic: &str) -> Result<Traffic, ScenarioError> {
    serde_json::from_str(traffic).map_err(|e| ScenarioError::Traffic {
        message: e.to_string(),
    })
}

/// `{"ok": true, "rules": N}` or `{"ok": false, "problems": [...]}`.
#[wasm_bindgen]
pub fn validate_json(config: &str) -> String {
    #[derive(Serialize)]
    struct Checked {
        ok: bool,
        rules: usize,
        problems: Vec<Problem>,
    }
    json(&match validate(config) {
        Ok(policy) => Checked {
            ok: true,
            rules: policy.rules.len(),
            problems: Vec::new(),
        },
        Err(problems) => Checked {
            ok: false,
            rules: 0,
            problems,
        },
    })
}

/// A [`Report`], or a [`ScenarioError`] (it has an `error` field).
#[wasm_bindgen]
pub fn simulate_json(config: &str, traffic: &str) -> String {
    match traffic_of(traffic).and_then(|t| simulate(config, &t)) {
        Ok(report) => json(&report),
        Err(e) => json(&e),
    }
}

/// Each of [`COMPARED`] as `{"algorithm", "result": {"Ok": report} or
/// {"Err": error}}`, or a [`ScenarioError`].
#[wasm_bindgen]
pub fn compare_json(config: &str, traffic: &str) -> String {
    match traffic_of(traffic).and_then(|t| compare(config, &t)) {
        Ok(runs) => json(&runs),
        Err(e) => json(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"rules": [{"name": "per-client", "key": ["client_ip"],
        "limit": {"count": 5, "per": "1s"}, "algorithm": "fixed_window"}]}"#;

    fn steady(rate: f64, duration: &str) -> Traffic {
        serde_json::from_value(serde_json::json!({
            "kind": "generated", "duration": duration,
            "clients": [{"client": "10.0.0.1", "shape": {"type": "steady", "rate": rate}}]
        }))
        .unwrap()
    }

    #[test]
    fn errors_carry_their_path_and_place() {
        let text =
            "{\"rules\": [\n  {\"name\": \"r\", \"limit\": {\"count\": 1, \"per\": \"soon\"}}\n]}";
        let problems = validate(text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "rules[0].limit.per");
        assert_eq!((problems[0].line, problems[0].column), (Some(2), Some(39)));
        let syntax = validate("{\"rules\": [\n}").unwrap_err();
        assert_eq!(syntax[0].path, "(syntax)");
        assert_eq!(syntax[0].line, Some(2));
    }

    #[test]
    fn a_steady_overload_is_limited_to_the_rate() {
        // 10 a second for 3 s against 5 a second: 5 of each second's 10 go.
        let report = simulate(CONFIG, &steady(10.0, "3s")).unwrap();
        assert_eq!(report.total, 30);
        assert_eq!((report.totals.allowed, report.totals.limited), (15, 15));
        assert_eq!(report.rules[0].limited, 15);
        assert_eq!(report.lanes.len(), 1);
        assert_eq!(report.lanes[0].totals, report.totals);
        let plotted: u64 = report.slices.iter().map(|s| s.allowed + s.limited).sum();
        assert_eq!(plotted, 30);
        let limited = report.requests.iter().find(|r| r.status == 429).unwrap();
        let names: Vec<&str> = limited.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"retry-after"), "{names:?}");
        assert_eq!(limited.limited_by.as_deref(), Some("per-client"));
    }

    #[test]
    fn a_held_request_is_plotted_as_delayed() {
        let config = r#"{"rules": [{"name": "slow", "key": ["method"], "limit": {"count": 1, "per": "1s"},
            "action": "delay", "max_delay": "2s", "algorithm": "gcra"}]}"#;
        let traffic = Traffic::List {
            text: "0 10.0.0.1 GET /\n0 10.0.0.1 GET /".into(),
        };
        let report = simulate(config, &traffic).unwrap();
        assert_eq!((report.totals.allowed, report.totals.delayed), (1, 1));
        assert_eq!(report.lanes[0].totals.delayed, 1);
        assert_eq!(report.rules[0].delayed, 1);
        let held = &report.requests[1];
        assert_eq!(
            (held.class, held.held_ms, held.at_ms),
            (report::Class::Delayed, 1000.0, 1000.0)
        );
    }

    #[test]
    fn a_comparison_runs_every_algorithm_on_the_same_traffic() {
        let runs = compare(CONFIG, &steady(10.0, "3s")).unwrap();
        assert_eq!(runs.len(), COMPARED.len());
        for run in &runs {
            let report = run.result.as_ref().unwrap();
            assert_eq!(report.total, 30, "{}", run.algorithm);
            assert_eq!(report.rules[0].algorithm, run.algorithm);
        }
    }

    #[test]
    fn bursts_are_dropped_for_algorithms_without_one() {
        let config =
            r#"{"rules": [{"name": "r", "limit": {"count": 5, "per": "1s", "burst": 10}}]}"#;
        let rewritten = with_algorithm(config, "fixed_window").unwrap();
        assert!(!rewritten.contains("burst"), "{rewritten}");
        assert!(validate(&rewritten).is_ok());
        assert!(with_algorithm(config, "gcra").unwrap().contains("burst"));
    }

    #[test]
    fn the_bindings_speak_json() {
        let checked: serde_json::Value =
            serde_json::from_str(&validate_json("{\"rulez\": []}")).unwrap();
        assert_eq!(checked["ok"], false);
        assert!(checked["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("rulez"));
        let traffic = r#"{"kind": "list", "text": "0 10.0.0.1 GET /\n0.1 10.0.0.1 GET /"}"#;
        let report: serde_json::Value =
            serde_json::from_str(&simulate_json(CONFIG, traffic)).unwrap();
        assert_eq!(report["totals"]["allowed"], 2);
        let refused: serde_json::Value =
            serde_json::from_str(&simulate_json(CONFIG, "{}")).unwrap();
        assert_eq!(refused["error"], "traffic");
    }
}
