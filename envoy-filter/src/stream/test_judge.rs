//! A scripted [`Judge`] for the stream tests.

use sluice_core::policy::Direction;

use super::{side, Answer, Ask, Judge, Violation};

/// Allows `budget` messages per direction, then answers `over`.
pub(super) struct Budget {
    left: [u64; 2],
    /// The answer once the budget is spent.
    pub(super) over: Answer,
    /// Every ask seen, in order.
    pub(super) asks: Vec<(Direction, Ask)>,
}

impl Judge for Budget {
    fn judge(&mut self, direction: Direction, ask: Ask) -> Answer {
        self.asks.push((direction, ask));
        let left = &mut self.left[side(direction)];
        if ask.messages == 0 {
            return Answer::Pass;
        }
        if *left == 0 {
            return self.over.clone();
        }
        *left -= 1;
        Answer::Pass
    }
}

/// `n` messages per direction, then `over`.
pub(super) fn budget(n: u64, over: Answer) -> Budget {
    Budget {
        left: [n, n],
        over,
        asks: Vec::new(),
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
