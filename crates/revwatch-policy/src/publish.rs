//! Atomic publishing of a policy tree of any size.
//!
//! [`publish`] makes a whole [`Tree`] the active tree (see [`layout`](crate::layout))
//! in one etcd revision, however many files it has, although etcd allows at most
//! 128 operations per txn. It writes a new *generation* beside the active one and
//! then moves the pointer `P.revwatch/active` to it with compare-and-swap.
//!
//! # Protocol
//!
//! 1. **Read** the pointer and `P.revwatch/previous` in one txn (revision `S`) and
//!    check the caller's [`Expect`]ation.
//! 2. **Lock.** Grant a lease, kept alive while publishing, and create
//!    `P.revwatch/gen/G/.lock` bound to it, for a fresh generation id `G`
//!    (creation time and lease id), in a txn requiring `gen/G/` to be empty.
//! 3. **Write** the files under `P.revwatch/gen/G/` in txns of at most 100 puts
//!    (and about 1 MiB), each conditional on the lock still being the one created
//!    in step 2: a publisher that lost its lease cannot write into a generation
//!    that garbage collection may be deleting.
//! 4. **Commit** in one txn: if the pointer's `mod_revision` is still the one
//!    read in step 1 (0 when absent), the lock is still ours, and no key of the
//!    active tree was modified after `S`, then put the pointer (= `G`), put
//!    `previous` (= the old pointer; deleted in direct mode) and delete the lock.
//!    Otherwise nothing changes and the publish fails with
//!    [`PublishError::Conflict`] naming the key and the revision that won, or
//!    [`PublishError::LockLost`]; the failed publisher deletes its generation.
//! 5. **Clean up:** revoke the lease, then collect garbage.
//!
//! Readers never see part of a generation: `G` is invisible until the pointer
//! names it, and the pointer moves in one revision. A publisher that dies before
//! step 4 leaves only an unreferenced generation; its lock vanishes with its lease
//! (after the TTL) and a later publish deletes it.
//!
//! # Expectations
//!
//! * [`Expect::Current`]: whatever is active when the publish starts; fails if
//!   another publish (or an edit of the active tree) lands before the commit.
//! * [`Expect::Revision(R)`](Expect::Revision): the active tree the caller saw at
//!   revision `R` (`--expect-revision`): fails if the pointer or any key of the
//!   active tree was put or deleted after `R`. Deletions between `R` and `S` are
//!   found by counting the active keys at `R` (which must not be compacted, else
//!   [`PublishError::ExpectCompacted`]); modifications up to the commit by the
//!   commit's compares.
//! * [`Expect::Any`]: no check; the last publish wins (the pointer is still
//!   swapped with compare-and-swap, retried while other publishes land).
//!
//! The commit compares the active tree as key ranges (`Compare.range_end`, which
//! etcd 3.4 and the embedded server both evaluate over every key in the range). A
//! compare cannot see a key *deleted* between `S` and the commit; that window is
//! one round trip per batch long.
//!
//! # Garbage collection
//!
//! After each publish (and on [`Publisher::collect_garbage`]) every generation
//! that is neither active nor previous and has no lock is deleted, each in one txn
//! `if version(gen/X/.lock) == 0 && pointer and previous unchanged then
//! DeleteRange gen/X/`. The previous generation is kept for a rollback (see the
//! layout docs); a generation being written keeps its lock and is left alone.

mod gc;
mod ops;
mod read;
mod state;

use std::time::{SystemTime, UNIX_EPOCH};

use revwatch::client::{Client, LeaseKeeper, LeaseState, RequestOp, TxnRequest};

use crate::layout::{Layout, LayoutError, Tree, check_path, escape};
use etcd_proto::key_range::KeyRange;
use state::{Guard, Pointers, check_expect, read_pointers};

pub use read::{read_active_tree, read_tree_at};

/// Most puts per file txn, below etcd's default limit of 128 operations.
pub const MAX_TXN_OPS: usize = 100;

/// Most key and value bytes per file txn (a single larger file gets a txn of its
/// own), below etcd's default request limit of 1.5 MiB.
pub const MAX_TXN_BYTES: usize = 1 << 20;

/// Default TTL of the publisher's lease: how long an abandoned generation stays
/// locked before garbage collection may take it.
pub const DEFAULT_LEASE_TTL_SECS: i64 = 10;

/// How often an [`Expect::Any`] commit is retried when other publishes land first.
const ANY_ATTEMPTS: usize = 5;

/// Which active tree a publish may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The one active when the publish starts.
    Current,
    /// The one the caller saw at this revision: nothing of it changed since.
    Revision(i64),
    /// Any: the last publish wins.
    Any,
}

/// A successful publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The revision at which the tree became active.
    pub revision: i64,
    /// The new generation id.
    pub generation: String,
    /// Generations deleted by the garbage collection that followed.
    pub collected: Vec<String>,
}

/// Why a publish failed. Nothing became visible.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The tree holds no file; an empty generation cannot be told from a missing one.
    #[error("nothing to publish: the tree is empty")]
    EmptyTree,
    /// A path of the tree is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The active tree changed after the expected revision.
    #[error(
        "conflict: expected the active tree as of revision {expected}, but {key} changed at revision {actual}"
    )]
    Conflict {
        /// The revision the caller expected the active tree at.
        expected: i64,
        /// The revision of the change that won (for a deletion found by counting,
        /// the revision it was found at).
        actual: i64,
        /// The key that changed (for a deletion, the start of the key range).
        key: String,
    },
    /// The expected revision is compacted, so deletions since cannot be checked.
    #[error("cannot check the active tree as of revision {expected}: compacted")]
    ExpectCompacted {
        /// The expected revision.
        expected: i64,
        /// etcd's reply.
        #[source]
        source: revwatch::client::Error,
    },
    /// The generation's lock vanished (lease expired or revoked) before the commit.
    #[error("lock {key} of generation {generation} was lost while publishing")]
    LockLost {
        /// The generation being written.
        generation: String,
        /// Its lock key.
        key: String,
    },
    /// The fresh generation already holds keys (an id collision).
    #[error("generation {generation} already exists")]
    GenerationExists {
        /// The generation id.
        generation: String,
    },
    /// An etcd request failed.
    #[error("etcd request failed: {0}")]
    Etcd(#[from] revwatch::client::Error),
}

/// Publishes `tree` under `prefix` with the default settings: see [`Publisher`].
pub async fn publish(
    client: &Client,
    prefix: &[u8],
    tree: &Tree,
    expect: Expect,
) -> Result<Published, PublishError> {
    Publisher::new(client, prefix).publish(tree, expect).await
}

/// Publishes trees under one prefix (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct Publisher {
    client: Client,
    layout: Layout,
    lease_ttl: i64,
    max_ops: usize,
}

/// The generation being written: its id, lock and lease.
struct Staging {
    generation: String,
    lock: Vec<u8>,
    /// The lock's `create_revision`.
    locked_at: i64,
    keeper: LeaseKeeper,
}

impl Publisher {
    /// A publisher for the tree under `prefix`.
    pub fn new(client: &Client, prefix: impl Into<Vec<u8>>) -> Self {
        Publisher {
            client: client.clone(),
            layout: Layout::new(prefix),
            lease_ttl: DEFAULT_LEASE_TTL_SECS,
            max_ops: MAX_TXN_OPS,
        }
    }

    /// The lease TTL in seconds (default [`DEFAULT_LEASE_TTL_SECS`]; etcd raises
    /// it to its minimum, 2 s by default).
    pub fn lease_ttl(mut self, secs: i64) -> Self {
        self.lease_ttl = secs.max(1);
        self
    }

    /// Most puts per file txn, 1 to [`MAX_TXN_OPS`] (the default).
    pub fn max_txn_ops(mut self, ops: usize) -> Self {
        self.max_ops = ops.clamp(1, MAX_TXN_OPS);
        self
    }

    /// Makes `tree` the active tree, if `expect` holds (see the [module docs](self)).
    /// Then collects garbage; a failure there is logged, not returned.
    pub async fn publish(&self, tree: &Tree, expect: Expect) -> Result<Published, PublishError> {
        check_tree(tree)?;
        let start = read_pointers(&self.client, &self.layout).await?;
        let guard = check_expect(&self.client, &self.layout, &start, expect).await?;
        let staging = self.lock().await?;
        let written = self.write_files(&staging, tree).await;
        let committed = match written {
            Ok(()) => self.commit(&staging, start, &guard, expect).await,
            Err(e) => Err(e),
        };
        let revision = match committed {
            Ok(revision) => revision,
            Err(e) => {
                self.abandon(staging).await;
                return Err(e);
            }
        };
        let Staging {
            generation, keeper, ..
        } = staging;
        // The lease's only key, the lock, is gone; revoking spares the server the
        // expiry. A failure changes nothing: the lease expires on its own.
        if let Err(e) = keeper.revoke().await {
            tracing::debug!(error = %e, "revoking the publish lease failed");
        }
        let collected = match self.collect_garbage().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection after publish failed");
                Vec::new()
            }
        };
        Ok(Published {
            revision,
            generation,
            collected,
        })
    }

    /// Deletes generations that are neither active nor previous and not locked;
    /// returns their ids.
    pub async fn collect_garbage(&self) -> Result<Vec<String>, PublishError> {
        gc::collect(&self.client, &self.layout).await
    }

    /// After a failed publish: deletes the generation (if the lock is still ours)
    /// and revokes the lease. Best effort: garbage collection takes what is left.
    async fn abandon(&self, staging: Staging) {
        let generation = KeyRange::prefix(&self.layout.generation(&staging.generation));
        let deleted = self
            .client
            .txn(TxnRequest {
                compare: vec![ops::created_at(&staging.lock, staging.locked_at)],
                success: vec![ops::delete(&generation)],
                ..Default::default()
            })
            .await;
        if let Err(e) = deleted {
            tracing::debug!(error = %e, generation = %staging.generation, "deleting an abandoned generation failed");
        }
        if let Err(e) = staging.keeper.revoke().await {
            tracing::debug!(error = %e, "revoking the publish lease failed");
        }
    }

    /// Step 2: a lease, a fresh generation id, and its lock.
    async fn lock(&self) -> Result<Staging, PublishError> {
        let keeper = LeaseKeeper::start(&self.client, self.lease_ttl).await?;
        let generation = generation_id(keeper.id());
        let lock = self.layout.lock(&generation);
        let resp = self
            .client
            .txn(TxnRequest {
                compare: vec![ops::span_mod_below(
                    &KeyRange::prefix(&self.layout.generation(&generation)),
                    1,
                )],
                success: vec![ops::put(
                    lock.clone(),
                    keeper.id().to_string().into_bytes(),
                    keeper.id(),
                )],
                ..Default::default()
            })
            .await?;
        if !resp.succeeded {
            return Err(PublishError::GenerationExists { generation });
        }
        Ok(Staging {
            generation,
            lock,
            locked_at: resp.header.map_or(0, |h| h.revision),
            keeper,
        })
    }

    /// Step 3: the files, in batches conditional on the lock.
    async fn write_files(&self, staging: &Staging, tree: &Tree) -> Result<(), PublishError> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (path, file) in &tree.files {
            let key = self.layout.file(Some(&staging.generation), path);
            let size = key.len() + file.value.len();
            if !batch.is_empty() && (batch.len() >= self.max_ops || bytes + size > MAX_TXN_BYTES) {
                self.write_batch(staging, std::mem::take(&mut batch))
                    .await?;
                bytes = 0;
            }
            batch.push(ops::put(key, file.value.to_vec(), 0));
            bytes += size;
        }
        self.write_batch(staging, batch).await
    }

    async fn write_batch(
        &self,
        staging: &Staging,
        puts: Vec<RequestOp>,
    ) -> Result<(), PublishError> {
        if puts.is_empty() {
            return Ok(());
        }
        if let LeaseState::Lost(_) = staging.keeper.state() {
            return Err(lock_lost(staging));
        }
        let resp = self
            .client
            .txn(TxnRequest {
                compare: vec![ops::created_at(&staging.lock, staging.locked_at)],
                success: puts,
                ..Default::default()
            })
            .await?;
        if resp.succeeded {
            Ok(())
        } else {
            Err(lock_lost(staging))
        }
    }

    /// Step 4: the compare-and-swap of the pointer. Returns the commit revision.
    async fn commit(
        &self,
        staging: &Staging,
        mut start: Pointers,
        guard: &Guard,
        expect: Expect,
    ) -> Result<i64, PublishError> {
        for _ in 0..ANY_ATTEMPTS {
            match self.try_commit(staging, &start, guard).await? {
                Commit::Done(revision) => return Ok(revision),
                Commit::PointerMoved { actual } if expect == Expect::Any => {
                    tracing::debug!(actual, "pointer moved before the commit; retrying");
                    start = read_pointers(&self.client, &self.layout).await?;
                }
                Commit::PointerMoved { actual } => {
                    return Err(PublishError::Conflict {
                        expected: guard.expected,
                        actual,
                        key: escape(&self.layout.pointer()),
                    });
                }
                Commit::Failed(e) => return Err(e),
            }
        }
        Err(PublishError::Conflict {
            expected: guard.expected,
            actual: start.active_mod(),
            key: escape(&self.layout.pointer()),
        })
    }

    async fn try_commit(
        &self,
        staging: &Staging,
        start: &Pointers,
        guard: &Guard,
    ) -> Result<Commit, PublishError> {
        let pointer = self.layout.pointer();
        let previous = self.layout.previous();
        let mut compare = vec![
            ops::mod_equals(&pointer, start.active_mod()),
            ops::created_at(&staging.lock, staging.locked_at),
        ];
        compare.extend(
            guard
                .spans
                .iter()
                .map(|span| ops::span_mod_below(span, start.revision + 1)),
        );
        let keep_previous = match &start.active {
            Some(old) => ops::put(previous, old.value.clone(), 0),
            None => ops::delete(&KeyRange::single(&previous)),
        };
        let success = vec![
            ops::put(pointer.clone(), staging.generation.clone().into_bytes(), 0),
            keep_previous,
            ops::delete(&KeyRange::single(&staging.lock)),
        ];
        let mut failure = vec![ops::get(&pointer), ops::get(&staging.lock)];
        failure.extend(
            guard
                .spans
                .iter()
                .map(|span| ops::range_op(ops::newest_in(span))),
        );
        let request = TxnRequest {
            compare,
            success,
            failure,
        };
        let resp = match self.client.txn(request).await {
            Ok(resp) => resp,
            // The outcome is unknown (the txn may have been applied): the pointer
            // tells.
            Err(e) => return self.commit_outcome(staging, e).await,
        };
        if resp.succeeded {
            return Ok(Commit::Done(resp.header.map_or(0, |h| h.revision)));
        }
        let actual = ops::range_kvs(&resp, 0)
            .first()
            .map_or(0, |kv| kv.mod_revision);
        if actual != start.active_mod() {
            // A deleted pointer has no revision; the reply's is the closest bound.
            let actual = if actual == 0 {
                resp.header.map_or(0, |h| h.revision)
            } else {
                actual
            };
            return Ok(Commit::PointerMoved { actual });
        }
        let lock_held = ops::range_kvs(&resp, 1)
            .first()
            .is_some_and(|kv| kv.create_revision == staging.locked_at);
        if !lock_held {
            return Ok(Commit::Failed(lock_lost(staging)));
        }
        let changed = (0..guard.spans.len())
            .filter_map(|i| ops::range_kvs(&resp, 2 + i).first())
            .find(|kv| kv.mod_revision > start.revision);
        Ok(Commit::Failed(PublishError::Conflict {
            expected: guard.expected,
            actual: changed.map_or(start.revision, |kv| kv.mod_revision),
            key: changed.map_or_else(|| escape(&pointer), |kv| escape(&kv.key)),
        }))
    }

    /// After a commit whose reply was lost: done if the pointer names our generation.
    async fn commit_outcome(
        &self,
        staging: &Staging,
        error: revwatch::client::Error,
    ) -> Result<Commit, PublishError> {
        let now = read_pointers(&self.client, &self.layout).await?;
        match now.active {
            Some(read) if read.value == staging.generation.as_bytes() => {
                Ok(Commit::Done(read.mod_revision))
            }
            _ => Err(PublishError::Etcd(error)),
        }
    }
}

/// The outcome of one commit attempt.
enum Commit {
    Done(i64),
    PointerMoved { actual: i64 },
    Failed(PublishError),
}

fn lock_lost(staging: &Staging) -> PublishError {
    PublishError::LockLost {
        generation: staging.generation.clone(),
        key: escape(&staging.lock),
    }
}

/// Refuses an empty tree and invalid paths (a tree built by hand may hold any).
fn check_tree(tree: &Tree) -> Result<(), PublishError> {
    if tree.is_empty() {
        return Err(PublishError::EmptyTree);
    }
    for path in tree.files.keys() {
        check_path(path).map_err(|reason| LayoutError::InvalidPath {
            key: path.clone(),
            mod_revision: 0,
            reason,
        })?;
    }
    Ok(())
}

/// A fresh generation id: milliseconds since the epoch (so ids sort by age) and
/// the lease id (unique in the cluster while the lease lives), in hex.
fn generation_id(lease: i64) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{millis:012x}-{:x}", lease as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_ids_are_valid_and_sort_by_time() {
        let id = generation_id(0x694d_8c1f_2e3a_4b5c);
        assert!(crate::layout::check_generation(&id).is_ok(), "{id}");
        assert!(id.ends_with("-694d8c1f2e3a4b5c"), "{id}");
        assert_eq!(id.find('-'), Some(12), "{id}");
        assert!(crate::layout::check_generation(&generation_id(-1)).is_ok());
    }

    #[test]
    fn empty_trees_and_invalid_paths_are_refused() {
        assert!(matches!(
            check_tree(&Tree::default()),
            Err(PublishError::EmptyTree)
        ));
        let mut tree = Tree::from_files([("a", "x")]).unwrap();
        assert!(check_tree(&tree).is_ok());
        tree.files.insert("../a".into(), tree.files["a"].clone());
        assert!(matches!(
            check_tree(&tree),
            Err(PublishError::Layout(LayoutError::InvalidPath { .. }))
        ));
    }
}
