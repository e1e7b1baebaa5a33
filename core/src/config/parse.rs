//! Reading the configuration text: JSON for the filter, YAML for the quota
//! server. A value of the wrong shape is reported with its field path.

use alloc::string::{String, ToString};

use super::error::{ConfigError, FieldError};
use super::schema::Config;
use crate::policy::Policy;

impl Config {
    /// Reads JSON (the filter's plugin configuration).
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_data() {
                shape_error(path, inner.to_string())
            } else {
                ConfigError::Syntax {
                    format: "JSON",
                    message: inner.to_string(),
                }
            }
        })?;
        de.end().map_err(|e| ConfigError::Syntax {
            format: "JSON",
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Reads YAML (the quota server's file).
    #[cfg(feature = "std")]
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            shape_error(path, e.into_inner().to_string())
        })
    }
}

impl Policy {
    /// Parses and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Policy, ConfigError> {
        Config::from_json(text)?.validate()
    }
}

/// A value of the wrong shape, at `path` (`.` when the whole document).
fn shape_error(path: String, message: String) -> ConfigError {
    let path = if path == "." {
        String::from("(document)")
    } else {
        path
    };
    ConfigError::Invalid([FieldError { path, message }].into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;
    use crate::time::Span;

    #[test]
    fn unknown_fields_are_refused() {
        let err = Policy::from_json(r#"{"rules":[{"name":"r","limits":{}}]}"#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("rules[0].limits: unknown field `limits`"),
            "{err}"
        );
        let err =
            Policy::from_json(r#"{"rules":[],"headers":{"sets":["ietf","x_rate"]}}"#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("headers.sets[1]: unknown variant `x_rate`"),
            "{err}"
        );
        let err = Policy::from_json(r#"{"rules":[]"#).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let err = Policy::from_json(r#"{"rules":[]} trailing"#).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let sets = Policy::from_json(r#"{"headers":{"sets":["x_ratelimit"]}}"#).unwrap();
        assert!(sets.header_sets.x_ratelimit && !sets.header_sets.ietf);
        let err = Policy::from_json(
            r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1 fortnight"}}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rules[0].limit.per: unknown unit: use ns, us, ms, s, m, h or d"
        );
    }

    /// serde reads a struct from an array of its fields in order; a
    /// configuration written that way is a mistake, refused where it is.
    #[test]
    fn arrays_in_place_of_objects_are_refused() {
        let cases = [
            ("[]", "(document)"),
            (
                r#"[[{"name":"r","limit":{"count":1,"per":"1s"}}]]"#,
                "(document)",
            ),
            (r#"{"rules":[["r"]]}"#, "rules[0]"),
            (
                r#"{"rules":[{"name":"r","limit":[1,"1s"]}]}"#,
                "rules[0].limit",
            ),
            (
                r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1s"},"match":{"grpc":["a"]}}]}"#,
                "rules[0].match.grpc",
            ),
            (r#"{"client_ip":[1]}"#, "client_ip"),
        ];
        for (text, path) in cases {
            let err = Config::from_json(text).unwrap_err().to_string();
            assert!(
                err.starts_with(&alloc::format!(
                    "{path}: invalid type: sequence, expected an object"
                )),
                "{text}: {err}"
            );
        }
    }

    #[cfg(feature = "std")]
    #[test]
    fn arrays_in_place_of_objects_are_refused_in_yaml() {
        let cases = [
            ("[]", "(document)"),
            (
                "rules:
  - [r, {}, [client_ip]]
",
                "rules[0]",
            ),
            (
                "rules:
  - name: r
    limit: [1, 1s]
",
                "rules[0].limit",
            ),
        ];
        for (text, path) in cases {
            // serde_norway repeats the path in its own message.
            let err = Config::from_yaml(text).unwrap_err().to_string();
            assert!(
                err.starts_with(&alloc::format!("{path}: "))
                    && err.contains("invalid type: sequence, expected an object"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn periods_take_exact_decimals() {
        let policy = Policy::from_json(
            r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1.5s"},"action":"delay","max_delay":"0.25s"}]}"#,
        )
        .unwrap();
        assert_eq!(policy.rules[0].quota.per(), Span::from_millis(1500));
        assert_eq!(
            policy.rules[0].action,
            Action::Delay {
                max: Span::from_millis(250)
            }
        );
        let err = Policy::from_json(
            r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1.0000000001s"}}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rules[0].limit.per: not a whole number of nanoseconds: use fewer decimals or a smaller unit"
        );
        let err = Policy::from_json(r#"{"rules":[{"name":"r","limit":{"count":1,"per":1.5}}]}"#)
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "rules[0].limit.per: expected a duration such as \"500ms\" or \"1.5s\", or a whole number of seconds"
            ),
            "{err}"
        );
    }

    #[test]
    fn round_trips_through_json() {
        let text = r#"{"rules":[{"name":"r","match":{"methods":["post"],"path":{"glob":"/a/*","ignore_case":true}},"key":["header:x-api-key"],"limit":{"count":3,"per":"1m","burst":5},"action":"delay","max_delay":"250ms"}],"exclude_statuses":[503,"5xx"],"client_ip":{"trusted_hops":1}}"#;
        let config = Config::from_json(text).unwrap();
        let again = Config::from_json(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(config, again);
        let policy = config.validate().unwrap();
        assert_eq!(policy.rules[0].matcher.methods, ["POST"]);
        assert!(matches!(&policy.rules[0].matcher.paths[..],
            [p] if p.ignores_case() && p.matches("/A/b")));
        assert_eq!(
            policy.rules[0].action,
            Action::Delay {
                max: Span::from_millis(250)
            }
        );
        assert!(policy.exclude_statuses.contains(502));
        assert_eq!(policy.client_ip.trusted_hops, 1);
    }

    #[cfg(feature = "std")]
    #[test]
    fn reads_yaml() {
        let config = Config::from_yaml(
            "rules:\n  - name: r\n    limit: {count: 10, per: 10s}\n    algorithm: gcra\n",
        )
        .unwrap();
        assert_eq!(
            config.validate().unwrap().rules[0].limiter.kind(),
            crate::algorithm::AlgorithmKind::Gcra
        );
    }
}
