//! What writers record about each write they issued.

use std::fmt;

use crate::keys::show;
use crate::ops::{TxnStep, WriteOp};

/// How a write ended, as far as its writer knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// etcd acknowledged it.
    Acked {
        /// `header.revision` of the response.
        revision: i64,
        /// For a txn, whether its compares held; true otherwise.
        succeeded: bool,
        /// Keys deleted (a DeleteRange's `deleted`, summed over a txn's
        /// delete steps); 0 for puts and revokes.
        deleted: i64,
    },
    /// etcd refused it: it certainly did not happen.
    Failed(String),
    /// No answer (timeout, connection lost): it may or may not have happened.
    Unknown(String),
}

/// One write and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// Which writer issued it.
    pub writer: usize,
    /// Its position in that writer's sequence.
    pub seq: u64,
    /// The write.
    pub op: WriteOp,
    /// How it ended.
    pub outcome: Outcome,
}

impl fmt::Display for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn step(f: &mut fmt::Formatter<'_>, s: &TxnStep) -> fmt::Result {
            match s {
                TxnStep::Put(p) => write!(
                    f,
                    "put {}={} lease={}",
                    show(&p.key, 48),
                    show(&p.value, 24),
                    p.lease
                ),
                TxnStep::DeleteRange(r) => write!(f, "delete {r:?}"),
            }
        }
        match self {
            WriteOp::Put(p) => step(f, &TxnStep::Put(p.clone())),
            WriteOp::DeleteRange(r) => step(f, &TxnStep::DeleteRange(r.clone())),
            WriteOp::LeaseRevoke { lease } => write!(f, "revoke lease {lease}"),
            WriteOp::Txn(t) => {
                write!(f, "txn if {} compares then {{", t.compares.len())?;
                for (i, s) in t.success.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    step(f, s)?;
                }
                f.write_str("} else {")?;
                for (i, s) in t.failure.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    step(f, s)?;
                }
                f.write_str("}")
            }
        }
    }
}

impl fmt::Display for WriteRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "writer {} #{}: {} -> ", self.writer, self.seq, self.op)?;
        match &self.outcome {
            Outcome::Acked {
                revision,
                succeeded,
                deleted,
            } => write!(
                f,
                "acked at {revision} (succeeded={succeeded}, deleted={deleted})"
            ),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
            Outcome::Unknown(e) => write!(f, "unknown: {e}"),
        }
    }
}
