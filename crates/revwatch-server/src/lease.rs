//! Leases: TTL bookkeeping and the keys attached to each lease.
//!
//! Grants and revokes are durable (the backend stores each lease's granted TTL); expiry
//! times are not, so after a restart every lease gets its full TTL again, as etcd does when
//! a member becomes leader.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::error::EtcdError;

/// etcd's largest accepted TTL, in seconds.
pub(crate) const MAX_LEASE_TTL: i64 = 9_000_000_000;

#[derive(Debug)]
struct Lease {
    /// Granted TTL after raising it to the minimum.
    ttl: i64,
    expiry: Instant,
    keys: BTreeSet<Vec<u8>>,
}

impl Lease {
    fn new(ttl: i64, now: Instant) -> Self {
        Self {
            ttl,
            expiry: now + Duration::from_secs(ttl.unsigned_abs()),
            keys: BTreeSet::new(),
        }
    }
}

/// What TimeToLive reports about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseInfo {
    pub remaining: i64,
    pub granted: i64,
    pub keys: Vec<Vec<u8>>,
}

/// All live leases.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    leases: HashMap<i64, Lease>,
}

impl LeaseTable {
    /// Restores durable leases, each with a full TTL from `now`.
    pub fn restore(leases: impl IntoIterator<Item = (i64, i64)>, now: Instant) -> Self {
        Self {
            leases: leases
                .into_iter()
                .map(|(id, ttl)| (id, Lease::new(ttl, now)))
                .collect(),
        }
    }

    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Grants lease `id` (0 = pick an unused positive id). Returns `(id, ttl)`.
    pub fn grant(
        &mut self,
        id: i64,
        ttl: i64,
        min_ttl: i64,
        now: Instant,
    ) -> Result<(i64, i64), EtcdError> {
        if ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge);
        }
        let id = if id == 0 { self.fresh_id() } else { id };
        if self.leases.contains_key(&id) {
            return Err(EtcdError::LeaseExists);
        }
        let ttl = ttl.max(min_ttl);
        self.leases.insert(id, Lease::new(ttl, now));
        Ok((id, ttl))
    }

    fn fresh_id(&self) -> i64 {
        loop {
            let id = rand::random::<i64>() & i64::MAX;
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Removes the lease, returning its attached keys in key order.
    pub fn revoke(&mut self, id: i64) -> Option<Vec<Vec<u8>>> {
        self.leases
            .remove(&id)
            .map(|l| l.keys.into_iter().collect())
    }

    /// Renews the lease; `None` when it is unknown or already expired.
    pub fn keep_alive(&mut self, id: i64, now: Instant) -> Option<i64> {
        let lease = self.leases.get_mut(&id)?;
        if lease.expiry <= now {
            return None;
        }
        lease.expiry = now + Duration::from_secs(lease.ttl.unsigned_abs());
        Some(lease.ttl)
    }

    pub fn info(&self, id: i64, now: Instant) -> Option<LeaseInfo> {
        self.leases.get(&id).map(|l| LeaseInfo {
            remaining: l.expiry.saturating_duration_since(now).as_secs() as i64,
            granted: l.ttl,
            keys: l.keys.iter().cloned().collect(),
        })
    }

    /// Every lease id, ascending.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases whose expiry has passed.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expiry <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub fn attach(&mut self, id: i64, key: Vec<u8>) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.insert(key);
        }
    }

    pub fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&id) {
            l.keys.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_rules() {
        let now = Instant::now();
        let mut t = LeaseTable::default();
        assert_eq!(t.grant(7, 1, 2, now), Ok((7, 2)));
        assert_eq!(t.grant(7, 5, 2, now), Err(EtcdError::LeaseExists));
        assert_eq!(
            t.grant(8, MAX_LEASE_TTL + 1, 2, now),
            Err(EtcdError::LeaseTtlTooLarge)
        );
        let (id, ttl) = t.grant(0, 10, 2, now).expect("auto id");
        assert!(id > 0 && ttl == 10);
        assert_eq!(t.keep_alive(99, now), None);
        assert_eq!(t.expired(now + Duration::from_secs(3)), vec![7]);
    }
}
