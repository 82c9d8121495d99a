//! A forward-only walk over a truth's states.

use crate::keys::KeyRange;
use crate::state::State;

use super::Truth;

/// The state of one key range at a revision, moved forward revision by
/// revision in O(changes) (see [`Truth::cursor`]).
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    truth: &'a Truth,
    range: KeyRange,
    state: State,
    revision: i64,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(truth: &'a Truth, range: KeyRange) -> Self {
        Self {
            truth,
            range,
            state: State::default(),
            revision: 1,
        }
    }

    /// Moves to `revision` and returns the state there. A cursor only moves
    /// forward: an earlier revision leaves it where it is.
    pub fn advance_to(&mut self, revision: i64) -> &State {
        if revision > self.revision {
            for (_, changes) in self.truth.revisions.range(self.revision + 1..=revision) {
                for c in changes.iter().filter(|c| self.range.contains(&c.key)) {
                    self.state.apply(c);
                }
            }
            self.revision = revision;
        }
        &self.state
    }

    /// The revision the cursor is at.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The state at the cursor's revision.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Gives up the state.
    pub fn into_state(self) -> State {
        self.state
    }
}
