//! Rule groups, checked over random policies and requests against their
//! definition: of a group's rules, the first in evaluation order (higher
//! priority, then config order) that applies is the only enforcing one
//! that counts; shadow rules reached before it are dry runs; rules without
//! a group apply whenever their match holds and their key can be built.

use proptest::prelude::*;
use sluice_core::engine::applicable_rules;
use sluice_core::policy::{HttpRequest, Policy};

/// Headers a request may carry, and rules may match or key on.
const HEADERS: [&str; 3] = ["x-a", "x-b", "x-c"];

#[derive(Clone, Debug)]
struct RuleSpec {
    group: Option<&'static str>,
    priority: i32,
    /// A header the rule's match requires.
    matches: Option<usize>,
    /// A header the rule keys on (else the client address).
    keyed: Option<usize>,
    shadow: bool,
}

impl RuleSpec {
    fn applies(&self, present: &[bool; 3]) -> bool {
        [self.matches, self.keyed]
            .iter()
            .flatten()
            .all(|&h| present[h])
    }

    fn json(&self, index: usize) -> String {
        let mut fields = vec![
            format!(r#""name":"r{index}""#),
            r#""limit":{"count":5,"per":"1m"}"#.to_string(),
            format!(r#""priority":{}"#, self.priority),
        ];
        if let Some(g) = self.group {
            fields.push(format!(r#""group":"{g}""#));
        }
        if let Some(h) = self.matches {
            fields.push(format!(
                r#""match":{{"headers":[{{"name":"{}"}}]}}"#,
                HEADERS[h]
            ));
        }
        if let Some(h) = self.keyed {
            fields.push(format!(r#""key":["header:{}"]"#, HEADERS[h]));
        }
        if self.shadow {
            fields.push(r#""action":"shadow""#.to_string());
        }
        format!("{{{}}}", fields.join(","))
    }
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    (
        prop_oneof![Just(None), Just(Some("g")), Just(Some("h"))],
        -1i32..=1,
        prop::option::of(0usize..3),
        prop::option::of(0usize..3),
        prop::bool::weighted(0.25),
    )
        .prop_map(|(group, priority, matches, keyed, shadow)| RuleSpec {
            group,
            priority,
            matches,
            keyed,
            shadow,
        })
}

/// The rules that apply, by the definition above: positions in `specs`.
fn expected(specs: &[RuleSpec], present: &[bool; 3]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(specs[i].priority));
    order
        .iter()
        .copied()
        .filter(|&i| {
            let spec = &specs[i];
            if !spec.applies(present) {
                return false;
            }
            let Some(group) = spec.group else {
                return true;
            };
            // No enforcing rule of the group applies before it.
            !order.iter().take_while(|&&j| j != i).any(|&j| {
                let other = &specs[j];
                other.group == Some(group) && !other.shadow && other.applies(present)
            })
        })
        .collect()
}

proptest! {
    #[test]
    fn one_enforcing_rule_per_group_the_first_that_applies(
        specs in prop::collection::vec(rule_spec(), 1..10),
        present in prop::array::uniform3(any::<bool>()),
    ) {
        let rules: Vec<String> = specs.iter().enumerate().map(|(i, s)| s.json(i)).collect();
        let policy = Policy::from_json(&format!(r#"{{"rules":[{}]}}"#, rules.join(","))).unwrap();
        let mut request = HttpRequest::new("GET", "/").with_client_ip("192.0.2.1".parse().unwrap());
        for (h, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            request = request.with_header(HEADERS[h], "v");
        }
        let chosen: Vec<usize> = applicable_rules(&policy, &request)
            .into_iter()
            .map(|(i, _)| policy.rules[i].name[1..].parse().unwrap())
            .collect();
        prop_assert_eq!(&chosen, &expected(&specs, &present));
        for group in ["g", "h"] {
            let enforcing = chosen
                .iter()
                .filter(|&&i| specs[i].group == Some(group) && !specs[i].shadow)
                .count();
            prop_assert!(enforcing <= 1, "group {} has {} enforcing rules", group, enforcing);
        }
    }
}
