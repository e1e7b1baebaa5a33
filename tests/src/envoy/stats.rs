//! Reading stats out of the admin endpoint's replies: Prometheus text and
//! `/stats?format=json`.

use serde_json::Value;

/// The value of `name{labels}` in Prometheus text (labels compared as a set);
/// `None` if there is no such sample.
pub fn prometheus_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, got_labels) = match series.split_once('{') {
            Some((metric, rest)) => (metric, parse_labels(rest.strip_suffix('}')?)),
            None => (series, Vec::new()),
        };
        if metric != name || got_labels.len() != labels.len() {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| got_labels.iter().any(|(gk, gv)| gk == k && gv == v))
        {
            return value.trim().parse().ok();
        }
    }
    None
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out
}

/// Finds a stat by name in `/stats?format=json`.
pub fn find_stat(stats: &Value, name: &str) -> Option<u64> {
    stats
        .get("stats")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(name))?
        .get("value")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_parsing() {
        let text = "# TYPE sluice_http counter\n\
                    sluice_http{rule=\"per-ip\",outcome=\"allowed\"} 3\n\
                    sluice_http{rule=\"per-ip\",outcome=\"limited\"} 6\n\
                    sluice_http_errors{} 12\n";
        assert_eq!(
            prometheus_value(
                text,
                "sluice_http",
                &[("outcome", "limited"), ("rule", "per-ip")]
            ),
            Some(6.0)
        );
        assert_eq!(
            prometheus_value(text, "sluice_http_errors", &[]),
            Some(12.0)
        );
        assert_eq!(
            prometheus_value(text, "sluice_http", &[("rule", "per-ip")]),
            None
        );
    }
}
