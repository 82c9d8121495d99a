//! What a writer does, drawn from its seed alone.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::keys::KeyRange;
use crate::ops::{Compare, CompareResult, CompareTarget, Put, Txn, TxnStep, WriteOp};

use super::WorkloadConfig;

/// One planned step. Lease steps refer to the writer's current lease, whose
/// id only etcd knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Issue this write.
    Write(WriteOp),
    /// Grant a new lease (forgetting the current one, which then expires).
    Grant,
    /// Put with the current lease attached (skipped without one).
    LeasedPut {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Revoke the current lease (skipped without one).
    Revoke,
}

/// Draws one writer's steps. Every value it puts is unique across writers.
#[derive(Debug)]
pub struct Planner {
    rng: StdRng,
    writer: usize,
    seq: u64,
    prefix: Vec<u8>,
    outside: Vec<u8>,
    keys: usize,
}

impl Planner {
    /// The planner of writer `writer` for `config`.
    pub fn new(config: &WorkloadConfig, writer: usize) -> Self {
        // Distinct, well-mixed streams per writer from one seed.
        let seed = config.seed ^ (writer as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self {
            rng: StdRng::seed_from_u64(seed),
            writer,
            seq: 0,
            prefix: config.prefix.clone(),
            outside: config.outside.clone(),
            keys: config.keys.max(3),
        }
    }

    fn key_in(&self, space: &[u8], i: usize) -> Vec<u8> {
        let mut k = space.to_vec();
        k.extend_from_slice(format!("k{i:04}").as_bytes());
        k
    }

    /// A random key, under the prefix with probability `p_inside`.
    fn key(&mut self, p_inside: f64) -> Vec<u8> {
        let i = self.rng.random_range(0..self.keys);
        let space = if self.rng.random_bool(p_inside) {
            self.prefix.clone()
        } else {
            self.outside.clone()
        };
        self.key_in(&space, i)
    }

    /// `n` distinct random keys (n <= keys).
    fn distinct_keys(&mut self, n: usize, p_inside: f64) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
        while out.len() < n {
            let k = self.key(p_inside);
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }

    fn value(&mut self, part: usize) -> Vec<u8> {
        format!("w{}-{}-{part}", self.writer, self.seq).into_bytes()
    }

    fn put(&mut self, key: Vec<u8>, part: usize) -> Put {
        Put {
            value: self.value(part),
            key,
            lease: 0,
        }
    }

    /// The next step.
    pub fn next_step(&mut self) -> Planned {
        self.seq += 1;
        let roll = self.rng.random_range(0..100);
        match roll {
            0..40 => {
                let key = self.key(0.8);
                Planned::Write(WriteOp::Put(self.put(key, 0)))
            }
            40..50 => Planned::Write(WriteOp::DeleteRange(KeyRange::single(&self.key(0.8)))),
            50..55 => {
                let a = self.rng.random_range(0..self.keys);
                let b = (a + self.rng.random_range(1..=4)).min(self.keys);
                let space = self.prefix.clone();
                Planned::Write(WriteOp::DeleteRange(KeyRange::new(
                    &self.key_in(&space, a),
                    &self.key_in(&space, b),
                )))
            }
            55..78 => Planned::Write(WriteOp::Txn(self.txn())),
            78..84 => Planned::Grant,
            84..95 => {
                let key = self.key(0.9);
                Planned::LeasedPut {
                    key,
                    value: self.value(0),
                }
            }
            _ => Planned::Revoke,
        }
    }

    /// A multi-key txn whose compare holds sometimes; some touch keys on
    /// both sides of the prefix boundary.
    fn txn(&mut self) -> Txn {
        let ks = self.distinct_keys(3, 0.75);
        let (a, b, c) = (ks[0].clone(), ks[1].clone(), ks[2].clone());
        match self.rng.random_range(0..3) {
            // Compare-and-swap on a version that is often right for young keys.
            0 => Txn {
                compares: vec![Compare {
                    key: a.clone(),
                    result: CompareResult::Equal,
                    target: CompareTarget::Version(self.rng.random_range(0..3)),
                }],
                success: vec![TxnStep::Put(self.put(a, 0)), TxnStep::Put(self.put(b, 1))],
                failure: if self.rng.random_bool(0.5) {
                    vec![TxnStep::Put(self.put(c, 2))]
                } else {
                    Vec::new()
                },
            },
            // A value compare that rarely holds; failure writes nothing.
            1 => Txn {
                compares: vec![Compare {
                    key: a.clone(),
                    result: CompareResult::Equal,
                    target: CompareTarget::Value(self.value(9)),
                }],
                success: vec![TxnStep::Put(self.put(a, 0))],
                failure: Vec::new(),
            },
            // If the key exists: delete it and put two others.
            _ => Txn {
                compares: vec![Compare {
                    key: a.clone(),
                    result: CompareResult::Greater,
                    target: CompareTarget::ModRevision(0),
                }],
                success: vec![
                    TxnStep::DeleteRange(KeyRange::single(&a)),
                    TxnStep::Put(self.put(b, 1)),
                    TxnStep::Put(self.put(c, 2)),
                ],
                failure: vec![TxnStep::Put(self.put(a, 0))],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_plan_and_writers_differ() {
        let config = WorkloadConfig::default();
        let plan = |w| {
            let mut p = Planner::new(&config, w);
            (0..200).map(|_| p.next_step()).collect::<Vec<_>>()
        };
        assert_eq!(plan(0), plan(0));
        assert_ne!(plan(0), plan(1));
    }

    #[test]
    fn plans_cover_every_kind_of_write() {
        let config = WorkloadConfig::default();
        let mut p = Planner::new(&config, 0);
        let steps: Vec<Planned> = (0..500).map(|_| p.next_step()).collect();
        let has = |f: &dyn Fn(&Planned) -> bool| steps.iter().any(f);
        assert!(has(&|s| matches!(s, Planned::Write(WriteOp::Put(_)))));
        assert!(has(
            &|s| matches!(s, Planned::Write(WriteOp::DeleteRange(r)) if r.range_end().is_empty())
        ));
        assert!(has(
            &|s| matches!(s, Planned::Write(WriteOp::DeleteRange(r)) if !r.range_end().is_empty())
        ));
        assert!(has(
            &|s| matches!(s, Planned::Write(WriteOp::Txn(t)) if t.failure.is_empty())
        ));
        assert!(has(&|s| matches!(s, Planned::Grant)));
        assert!(has(&|s| matches!(s, Planned::LeasedPut { .. })));
        assert!(has(&|s| matches!(s, Planned::Revoke)));
        let outside = |k: &[u8]| k.starts_with(&config.outside);
        assert!(has(
            &|s| matches!(s, Planned::Write(WriteOp::Put(p)) if outside(&p.key))
        ));
    }
}
