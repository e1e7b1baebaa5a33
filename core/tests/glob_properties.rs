//! `Glob` gives the same answers as the reference matcher (a memoised
//! character-by-character one) on random patterns and paths over a small
//! alphabet, where wildcards, `/` and repeats collide often.

use proptest::prelude::*;
use sluice_core::policy::matcher::reference::glob_matches;
use sluice_core::policy::Glob;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 4096,
        ..ProptestConfig::default()
    }
}

/// Random text from `alphabet`, up to `max` pieces long.
fn text(alphabet: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(alphabet), 0..=max)
        .prop_map(|pieces| pieces.concat())
}

/// A pattern and a path made from it, each wildcard replaced by a random
/// fill that may hold `/`: matches and near misses, rarely hit at random.
fn pattern_and_instance() -> impl Strategy<Value = (String, String)> {
    let token = prop::sample::select(&["/", "a", "b", "é", "*", "**"][..]);
    let fill = text(&["/", "a", "b"], 4);
    prop::collection::vec((token, fill), 0..=10).prop_map(|tokens| {
        let pattern = tokens.iter().map(|(token, _)| *token).collect();
        let path = tokens
            .iter()
            .map(|(token, fill)| {
                if token.starts_with('*') {
                    fill.as_str()
                } else {
                    token
                }
            })
            .collect();
        (pattern, path)
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn agrees_with_the_reference_on_random_paths(
        pattern in text(&["/", "a", "b", "*"], 12),
        path in text(&["/", "a", "b"], 16),
    ) {
        prop_assert_eq!(Glob::new(&pattern).matches(&path), glob_matches(&pattern, &path));
    }

    #[test]
    fn agrees_with_the_reference_on_instances((pattern, path) in pattern_and_instance()) {
        prop_assert_eq!(Glob::new(&pattern).matches(&path), glob_matches(&pattern, &path));
    }

    #[test]
    fn agrees_with_the_reference_on_prefixes_of_instances(
        (pattern, path) in pattern_and_instance(),
        cut in any::<prop::sample::Index>(),
    ) {
        let ends: Vec<usize> = path.char_indices().map(|(i, _)| i).chain([path.len()]).collect();
        let path = &path[..*cut.get(&ends)];
        prop_assert_eq!(Glob::new(&pattern).matches(path), glob_matches(&pattern, path));
    }
}

#[test]
fn instances_match_often_enough_to_test_something() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = pattern_and_instance();
    let matched = (0..1000)
        .filter(|_| {
            let (pattern, path) = strategy.new_tree(&mut runner).unwrap().current();
            glob_matches(&pattern, &path)
        })
        .count();
    assert!(
        (200..=950).contains(&matched),
        "{matched} of 1000 instances match"
    );
}

/// A pattern and path over letters in both cases, where ignoring case
/// changes answers often.
fn mixed_case(max: usize) -> impl Strategy<Value = String> {
    text(&["/", "a", "A", "b", "B", "*"], max)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ignoring_case_agrees_with_the_reference_on_lowered_text(
        pattern in mixed_case(12),
        path in text(&["/", "a", "A", "b", "B", "é"], 16),
    ) {
        prop_assert_eq!(
            Glob::ignoring_case(&pattern).matches(&path),
            glob_matches(&pattern.to_ascii_lowercase(), &path.to_ascii_lowercase())
        );
    }

    #[test]
    fn ignoring_case_agrees_on_instances_in_another_case(
        (pattern, path) in pattern_and_instance(),
        flips in prop::collection::vec(any::<bool>(), 64),
    ) {
        // The same instance with some letters upper-cased.
        let path: String = path
            .chars()
            .zip(flips.iter().cycle())
            .map(|(c, &flip)| if flip { c.to_ascii_uppercase() } else { c })
            .collect();
        prop_assert_eq!(
            Glob::ignoring_case(&pattern).matches(&path),
            glob_matches(&pattern, &path.to_ascii_lowercase())
        );
    }
}
