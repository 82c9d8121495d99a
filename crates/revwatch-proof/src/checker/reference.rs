//! The history a perfect subscriber would see.

use crate::history::{Batch, Delivery, History, Resync};
use crate::keys::KeyRange;
use crate::state::State;
use crate::truth::Truth;

/// The history a perfect subscriber of `range` joining at revision `start`
/// receives: one resync batch with the state at `start` (even when empty),
/// then one batch per later revision that touches the range, then a progress
/// mark at the truth's last revision; `expect_through` is that revision.
///
/// Tests derive broken histories from it; it must always pass the checker.
pub fn reference_history(truth: &Truth, range: &KeyRange, start: i64) -> History {
    let start = start.max(1);
    let initial = truth.state_at(start, range);
    let mut deliveries = vec![Delivery::Batch(Batch {
        revision: start,
        resync: Some(Resync::Subscribed),
        changes: State::default().diff(&initial),
    })];
    for (revision, _) in truth.revisions().filter(|(r, _)| *r > start) {
        let changes = truth.changes_in(revision, range);
        if !changes.is_empty() {
            deliveries.push(Delivery::Batch(Batch {
                revision,
                resync: None,
                changes,
            }));
        }
    }
    deliveries.push(Delivery::Progress {
        revision: truth.through(),
    });
    History {
        deliveries,
        expect_through: Some(truth.through()),
        ..History::default()
    }
}
