//! The fleet view: every `serve` instance registers itself under
//! `PREFIX.revwatch/fleet/INSTANCE` (a key bound to a lease, so a killed instance
//! disappears within the lease TTL), and `revwatch fleet` lists them, marking the
//! ones behind the newest policy revision or not ready.
//!
//! The keys sit in the policy layout's reserved subtree (`PREFIX.revwatch/`), which
//! is never read as policy files.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use etcd_proto::key_range::prefix_end;
use revwatch::client::{Client, RangeRequest};
use revwatch_policy::layout::Layout;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::connect::EtcdAccessArgs;

/// What an instance says about itself, as the JSON value of its fleet key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The instance id (the last component of its key).
    pub instance: String,
    /// The newest `mod_revision` among the files of the policy set it serves (0:
    /// none yet). Equal sets have equal revisions, but a file deleted in direct mode
    /// leaves no key to date it: [`policy_digest`](Self::policy_digest) tells such
    /// sets apart.
    pub active_revision: i64,
    /// The mirror revision at which it compiled that set: the instance with the
    /// highest one has the freshest view of the policy files.
    #[serde(default)]
    pub compiled_revision: i64,
    /// A digest of the set's file names and `mod_revision`s (and the generation
    /// pointer's): equal exactly when two instances serve the same files. Empty
    /// when unknown (no set yet, or a registration from an older version).
    #[serde(default)]
    pub policy_digest: String,
    /// `ready`, `degraded` or `not_ready`.
    pub state: String,
    /// When it started, in seconds since the Unix epoch.
    pub started: u64,
    /// The URL of its HTTP API.
    pub listen: String,
}

/// The state a healthy instance reports.
pub const READY: &str = "ready";

/// The key prefix under which instances of the policy prefix `prefix` register.
pub fn fleet_prefix(prefix: &str) -> String {
    let reserved = Layout::new(prefix).reserved();
    format!("{}fleet/", String::from_utf8_lossy(&reserved))
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One instance as listed, with how it compares to the rest of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub registration: Registration,
    /// It serves other files than the instance with the freshest view (see
    /// [`Fleet::of`]).
    pub behind: bool,
    /// It is not ready (degraded or without a policy set).
    pub degraded: bool,
}

/// The fleet at one moment: its members, and the policy revision of the instance
/// with the freshest view (the newest among them when digests are unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fleet {
    pub members: Vec<Member>,
    pub newest_revision: i64,
}

impl Fleet {
    /// The fleet of these registrations (in the order given).
    ///
    /// The reference is the instance that compiled its set at the highest mirror
    /// revision: every change to the policy files up to that revision is in its set.
    /// A member is behind when its digest differs from the reference's, which also
    /// catches a missed deletion that leaves `active_revision` unchanged; members
    /// without a digest (older versions) are compared by `active_revision`.
    pub fn of(registrations: impl IntoIterator<Item = Registration>) -> Fleet {
        let registrations: Vec<Registration> = registrations.into_iter().collect();
        let reference = registrations
            .iter()
            .filter(|r| r.active_revision > 0 && !r.policy_digest.is_empty())
            .max_by_key(|r| r.compiled_revision);
        let newest_revision = match reference {
            Some(r) => r.active_revision,
            None => registrations
                .iter()
                .map(|r| r.active_revision)
                .max()
                .unwrap_or(0),
        };
        let reference = reference.map(|r| r.policy_digest.clone());
        let members = registrations
            .into_iter()
            .map(|registration| Member {
                behind: behind(&registration, reference.as_deref(), newest_revision),
                degraded: registration.state != READY,
                registration,
            })
            .collect();
        Fleet {
            members,
            newest_revision,
        }
    }

    /// Parses fleet key values, skipping (and returning the keys of) unreadable ones.
    pub fn parse<'a>(
        values: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> (Fleet, Vec<String>) {
        let mut unreadable = Vec::new();
        let registrations: Vec<Registration> = values
            .into_iter()
            .filter_map(|(key, value)| match serde_json::from_slice(value) {
                Ok(r) => Some(r),
                Err(_) => {
                    unreadable.push(String::from_utf8_lossy(key).into_owned());
                    None
                }
            })
            .collect();
        (Fleet::of(registrations), unreadable)
    }

    pub fn behind(&self) -> usize {
        self.members.iter().filter(|m| m.behind).count()
    }

    pub fn degraded(&self) -> usize {
        self.members.iter().filter(|m| m.degraded).count()
    }

    /// One JSON document for machines.
    pub fn to_json(&self) -> serde_json::Value {
        let instances: Vec<_> = self
            .members
            .iter()
            .map(|m| {
                let r = &m.registration;
                json!({
                    "instance": r.instance, "active_revision": r.active_revision,
                    "compiled_revision": r.compiled_revision, "policy_digest": r.policy_digest,
                    "state": r.state, "started": r.started, "listen": r.listen,
                    "behind": m.behind, "degraded": m.degraded,
                })
            })
            .collect();
        json!({
            "newest_revision": self.newest_revision,
            "instances": instances,
            "behind": self.behind(),
            "degraded": self.degraded(),
        })
    }

    /// A table for people, with a summary line.
    pub fn to_text(&self) -> String {
        let width = self
            .members
            .iter()
            .map(|m| m.registration.instance.len())
            .chain([8])
            .max()
            .unwrap_or(8);
        let mut out = format!(
            "{:<width$}  {:>9}  {:<10}  {:<24}  MARKS\n",
            "INSTANCE", "REVISION", "STATE", "LISTEN"
        );
        for m in &self.members {
            let r = &m.registration;
            let marks: Vec<&str> = [(m.behind, "behind"), (m.degraded, "degraded")]
                .into_iter()
                .filter_map(|(on, mark)| on.then_some(mark))
                .collect();
            out.push_str(&format!(
                "{:<width$}  {:>9}  {:<10}  {:<24}  {}\n",
                r.instance,
                r.active_revision,
                r.state,
                r.listen,
                marks.join(",")
            ));
        }
        out.push_str(&format!(
            "{} instances, newest policy revision {}, {} behind, {} degraded\n",
            self.members.len(),
            self.newest_revision,
            self.behind(),
            self.degraded()
        ));
        out
    }
}

/// Whether `r` serves other files than the reference digest, or (without digests)
/// an older revision.
fn behind(r: &Registration, reference: Option<&str>, newest_revision: i64) -> bool {
    match reference {
        Some(digest) if !r.policy_digest.is_empty() => r.policy_digest != digest,
        _ => r.active_revision < newest_revision,
    }
}

/// List the live `revwatch serve` instances of a prefix, with the policy revision
/// each serves and its state; marks those serving other files than the freshest
/// instance (behind) or not ready (degraded).
///
/// Instances register under PREFIX.revwatch/fleet/ with a 10 s lease: a killed
/// instance disappears within about 10 s. Exits 0 whatever the fleet's state.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// etcd endpoints, comma-separated (default: the embedded server of `serve`).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// The policy prefix the instances serve (as given to `serve --prefix`).
    #[arg(long, default_value = "/revwatch/policies/")]
    pub prefix: String,
    /// One JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub access: EtcdAccessArgs,
}

pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let config = args.access.client_config(args.endpoints.clone())?;
    let client = Client::connect(config)
        .await
        .with_context(|| format!("connecting to {}", args.endpoints.join(",")))?;
    let key = fleet_prefix(&args.prefix).into_bytes();
    let listing = client
        .range(RangeRequest {
            range_end: prefix_end(&key),
            key,
            ..RangeRequest::default()
        })
        .await
        .context("listing the fleet")?;
    let (fleet, unreadable) = Fleet::parse(
        listing
            .kvs
            .iter()
            .map(|kv| (kv.key.as_slice(), kv.value.as_slice())),
    );
    for key in unreadable {
        eprintln!("revwatch fleet: ignored {key}: not a registration");
    }
    if args.json {
        println!("{}", fleet.to_json());
    } else {
        print!("{}", fleet.to_text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(instance: &str, revision: i64, state: &str) -> Registration {
        Registration {
            instance: instance.into(),
            active_revision: revision,
            compiled_revision: revision,
            policy_digest: String::new(),
            state: state.into(),
            started: 1,
            listen: "http://127.0.0.1:8181".into(),
        }
    }

    #[test]
    fn members_below_the_newest_revision_or_not_ready_are_marked() {
        let fleet = Fleet::of([
            registration("a", 7, READY),
            registration("b", 5, READY),
            registration("c", 7, "degraded"),
        ]);
        assert_eq!(fleet.newest_revision, 7);
        let marks: Vec<_> = fleet
            .members
            .iter()
            .map(|m| (m.behind, m.degraded))
            .collect();
        assert_eq!(marks, [(false, false), (true, false), (false, true)]);
        assert_eq!((fleet.behind(), fleet.degraded()), (1, 1));
    }

    fn with_digest(mut r: Registration, compiled: i64, digest: &str) -> Registration {
        r.compiled_revision = compiled;
        r.policy_digest = digest.into();
        r
    }

    #[test]
    fn a_missed_deletion_is_behind_though_its_revision_is_the_newest() {
        // b compiled before a file (last written at 7) was deleted at 9: its newest
        // file revision is still 7, like a's, but its files differ.
        let fleet = Fleet::of([
            with_digest(registration("a", 7, READY), 9, "after-delete"),
            with_digest(registration("b", 7, READY), 8, "before-delete"),
            // Listed later, same files as a: not behind.
            with_digest(registration("c", 7, READY), 12, "after-delete"),
        ]);
        let behind: Vec<_> = fleet.members.iter().map(|m| m.behind).collect();
        assert_eq!(behind, [false, true, false]);
    }

    #[test]
    fn the_freshest_compile_is_the_reference_even_with_an_older_file_revision() {
        // A newer file at 20 was deleted again at 25: a serves 10 again, b still
        // serves the file of 20.
        let fleet = Fleet::of([
            with_digest(registration("a", 10, READY), 25, "x"),
            with_digest(registration("b", 20, READY), 21, "y"),
        ]);
        let behind: Vec<_> = fleet.members.iter().map(|m| m.behind).collect();
        assert_eq!(behind, [false, true]);
        assert_eq!(fleet.newest_revision, 10);
    }

    #[test]
    fn registrations_without_digests_compare_revisions() {
        let old = serde_json::json!({
            "instance": "old", "active_revision": 5, "state": "ready",
            "started": 1, "listen": "http://127.0.0.1:1"
        });
        let old: Registration = serde_json::from_value(old).unwrap();
        let fleet = Fleet::of([old, with_digest(registration("new", 6, READY), 6, "d")]);
        let behind: Vec<_> = fleet.members.iter().map(|m| m.behind).collect();
        assert_eq!(behind, [true, false]);
    }

    #[test]
    fn unreadable_values_are_skipped_and_named() {
        let good = serde_json::to_vec(&registration("a", 3, READY)).unwrap();
        let (fleet, unreadable) = Fleet::parse([
            (&b"p/.revwatch/fleet/a"[..], &good[..]),
            (&b"p/.revwatch/fleet/x"[..], &b"junk"[..]),
        ]);
        assert_eq!(fleet.members.len(), 1);
        assert_eq!(unreadable, ["p/.revwatch/fleet/x"]);
    }
}
