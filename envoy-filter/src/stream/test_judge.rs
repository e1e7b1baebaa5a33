//! A scripted [`Judge`] for the stream tests.

use sluice_core::policy::Direction;

use super::{Answer, Ask, Enforced, Judge, PerDirection, Violation};

/// Allows `budget` messages per direction, then answers `over`.
pub(super) struct Budget {
    left: PerDirection<u64>,
    /// The answer once the budget is spent.
    pub(super) over: Answer,
    /// Every ask seen, in order.
    pub(super) asks: Vec<(Direction, Ask)>,
    /// Every refusal enforced, in order.
    pub(super) enforced: Vec<(Direction, String, Enforced)>,
}

impl Judge for Budget {
    fn judge(&mut self, direction: Direction, ask: Ask) -> Answer {
        self.asks.push((direction, ask));
        let left = self.left.get_mut(direction);
        if ask.messages == 0 {
            return Answer::Pass;
        }
        match left.checked_sub(1) {
            Some(fewer) => {
                *left = fewer;
                Answer::Pass
            }
            None => self.over.clone(),
        }
    }

    fn enforced(&mut self, direction: Direction, rule: &str, outcome: Enforced) {
        self.enforced.push((direction, rule.to_owned(), outcome));
    }
}

/// `n` messages per direction, then `over`.
pub(super) fn budget(n: u64, over: Answer) -> Budget {
    Budget {
        left: PerDirection {
            client: n,
            server: n,
        },
        over,
        asks: Vec::new(),
        enforced: Vec::new(),
    }
}

/// A refusal by rule `r` with a 3 s retry.
pub(super) fn refuse(violation: Violation) -> Answer {
    Answer::Refuse {
        rule: "r".into(),
        violation,
        retry_after: 3,
        metadata: vec![("retry-after", "3".into())],
    }
}

/// Refuses messages over 4 bytes with `over`; records enforcements.
pub(super) struct SizeJudge {
    over: Answer,
    /// Every refusal enforced, in order.
    pub(super) enforced: Vec<(String, Enforced)>,
}

impl SizeJudge {
    /// Refuses with `over`.
    pub(super) fn new(over: Answer) -> SizeJudge {
        SizeJudge {
            over,
            enforced: Vec::new(),
        }
    }
}

impl Judge for SizeJudge {
    fn judge(&mut self, _: Direction, ask: Ask) -> Answer {
        if ask.size > 4 {
            self.over.clone()
        } else {
            Answer::Pass
        }
    }

    fn enforced(&mut self, _: Direction, rule: &str, outcome: Enforced) {
        self.enforced.push((rule.to_owned(), outcome));
    }
}
