//! `serve`'s part of the fleet view (see [`crate::fleet`]): the instance's
//! registration, kept under a lease and rewritten when its policy revision or state
//! changes, and the fleet's counts as metrics.

use std::time::Duration;

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use revwatch::{
    client::{Client, ClientConfig, LeaseKeeper, LeaseState, PutRequest},
    mirror::{Mirror, Snapshot},
};
use revwatch_policy::{
    Policies, PolicyState, PolicyStatus,
    layout::{Layout, Tree, active_tree},
};
use sha3::{Digest, Sha3_256};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::fleet::{Fleet, READY, Registration, fleet_prefix, unix_now};

/// TTL of the registration's lease, in seconds: a killed instance leaves the fleet
/// view within it. The keeper renews at about a third of it.
pub const LEASE_TTL_SECS: i64 = 10;
/// Least time between two rewrites of the registration, so a flapping state costs
/// etcd (and every instance mirroring the prefix) at most one write a second.
const MIN_UPDATE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the registration is checked without a status change.
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Pause before registering again after a failure.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// How often the fleet metrics are recomputed from the mirror.
const METRICS_INTERVAL: Duration = Duration::from_secs(2);
/// How long stopping waits for the lease revocation that removes the key at once.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The instance id: host name and process id, unique among live instances.
pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The state as registered.
fn state_name(state: &PolicyState) -> &'static str {
    match state {
        PolicyState::Ready => READY,
        PolicyState::Degraded(_) => "degraded",
        PolicyState::NotReady => "not_ready",
    }
}

/// Turns the policy status into the registration to write.
struct Observer<T> {
    policies: Policies,
    mirror: Mirror<T>,
    layout: Layout,
    base: Registration,
    /// The activation count `base.active_revision` was computed at.
    activations: Option<u64>,
}

impl<T: Send + Sync + 'static> Observer<T> {
    /// The registration now. Its revision and digest are those of the active set's
    /// files (see [`policy_files`]), computed at each activation: instances serving
    /// the same files then register the same values whenever they loaded them, and
    /// registration writes (under the mirrored prefix) never move them, so instances
    /// do not rewrite each other's keys forever.
    fn current(&mut self) -> Registration {
        let status = self.policies.status();
        if self.activations != Some(status.activations) {
            self.activations = Some(status.activations);
            let files = match status.active_revision {
                0 => None,
                _ => policy_files(&self.mirror.snapshot(), &self.layout),
            };
            (self.base.active_revision, self.base.policy_digest) = match files {
                Some(files) => (files.revision, files.digest),
                None if status.active_revision == 0 => (0, String::new()),
                None => (status.compiled_revision, String::new()),
            };
            self.base.compiled_revision = status.compiled_revision;
        }
        Registration {
            state: state_name(&status.state).to_owned(),
            ..self.base.clone()
        }
    }
}

/// What identifies the active policy files of a snapshot.
#[derive(Debug, PartialEq, Eq)]
struct PolicyFiles {
    /// The newest `mod_revision` of the files and of the generation pointer.
    revision: i64,
    /// SHA3-256 (first 16 hex digits) of the generation pointer's `mod_revision` and
    /// each file's path and `mod_revision`, in path order: it changes with every
    /// put or delete of a file, even one that leaves `revision` as it was.
    digest: String,
}

/// The [`PolicyFiles`] of `snapshot`; `None` when the tree breaks the layout.
fn policy_files<T>(snapshot: &Snapshot<T>, layout: &Layout) -> Option<PolicyFiles> {
    let tree = active_tree(snapshot, layout.prefix()).ok()?;
    let pointer = snapshot.get(&layout.pointer()).map(|e| e.mod_revision);
    Some(files_of(&tree, pointer))
}

fn files_of(tree: &Tree, pointer: Option<i64>) -> PolicyFiles {
    let mut hash = Sha3_256::new();
    hash.update(pointer.unwrap_or(0).to_be_bytes());
    for (path, file) in &tree.files {
        // Length-prefixed, so no two trees hash the same bytes.
        hash.update((path.len() as u64).to_be_bytes());
        hash.update(path.as_bytes());
        hash.update(file.mod_revision.to_be_bytes());
    }
    let digest = hash.finalize();
    PolicyFiles {
        revision: tree
            .files
            .values()
            .map(|f| f.mod_revision)
            .chain(pointer)
            .max()
            .unwrap_or(0),
        digest: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// The running registration; [`stop`](Self::stop) removes it from the fleet.
pub struct Registrar {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Registrar {
    /// Registers this instance (serving at `url`) under the fleet prefix of `prefix`,
    /// in the background, retrying until it succeeds.
    pub fn start<T: Send + Sync + 'static>(
        config: ClientConfig,
        prefix: &str,
        url: &str,
        policies: Policies,
        mirror: Mirror<T>,
    ) -> Registrar {
        let instance = instance_id();
        let key = format!("{}{instance}", fleet_prefix(prefix)).into_bytes();
        let base = Registration {
            instance,
            active_revision: 0,
            compiled_revision: 0,
            policy_digest: String::new(),
            state: state_name(&PolicyState::NotReady).to_owned(),
            started: unix_now(),
            listen: url.to_owned(),
        };
        let observer = Observer {
            policies,
            mirror,
            layout: Layout::new(prefix),
            base,
            activations: None,
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(keep_registered(config, key, observer, stopped));
        Registrar { stop, task }
    }

    /// Stops renewing and revokes the lease, so the instance leaves the fleet now.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(REVOKE_TIMEOUT * 2, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            eprintln!("revwatch serve: the fleet registration did not stop in time");
        }
    }
}

async fn keep_registered<T: Send + Sync + 'static>(
    config: ClientConfig,
    key: Vec<u8>,
    mut observer: Observer<T>,
    mut stop: watch::Receiver<bool>,
) {
    let mut status = observer.policies.status_changes();
    let mut last_error = String::new();
    loop {
        status.borrow_and_update();
        let wanted = observer.current();
        let opened = tokio::select! {
            opened = register(&config, &key, &wanted) => opened,
            () = stopping(&mut stop) => return,
        };
        match opened {
            Ok((client, keeper)) => {
                last_error.clear();
                let revoke = follow(
                    &client,
                    &keeper,
                    &key,
                    wanted,
                    &mut observer,
                    &mut status,
                    &mut stop,
                );
                if revoke.await {
                    let _ = tokio::time::timeout(REVOKE_TIMEOUT, keeper.revoke()).await;
                    return;
                }
            }
            Err(e) => {
                let message = format!("{e:#}");
                if message != last_error {
                    eprintln!("revwatch serve: fleet registration failed (retrying): {message}");
                    last_error = message;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
            () = stopping(&mut stop) => return,
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone), holding no guard.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.is_ok();
}

/// Grants a lease and writes the registration under it.
async fn register(
    config: &ClientConfig,
    key: &[u8],
    registration: &Registration,
) -> anyhow::Result<(Client, LeaseKeeper)> {
    let client = Client::connect(config.clone()).await?;
    let keeper = LeaseKeeper::start(&client, LEASE_TTL_SECS).await?;
    put(&client, key, registration, keeper.id()).await?;
    Ok((client, keeper))
}

async fn put(
    client: &Client,
    key: &[u8],
    registration: &Registration,
    lease: i64,
) -> anyhow::Result<()> {
    client
        .put(PutRequest {
            key: key.to_vec(),
            value: serde_json::to_vec(registration)?,
            lease,
            ..PutRequest::default()
        })
        .await?;
    Ok(())
}

/// Rewrites the registration as the status changes until asked to stop (returns
/// true) or the lease is lost (returns false: register again).
async fn follow<T: Send + Sync + 'static>(
    client: &Client,
    keeper: &LeaseKeeper,
    key: &[u8],
    mut written: Registration,
    observer: &mut Observer<T>,
    status: &mut watch::Receiver<PolicyStatus>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut lease = keeper.subscribe();
    let mut last_write = Instant::now();
    let mut pending = false;
    let mut status_open = true;
    loop {
        let retry_at = last_write + MIN_UPDATE_INTERVAL;
        tokio::select! {
            () = stopping(stop) => return true,
            lost = async { lease.wait_for(|s| matches!(s, LeaseState::Lost(_))).await.map(|s| s.clone()) } => {
                if let Ok(state) = lost {
                    eprintln!("revwatch serve: fleet registration lease lost ({state:?}); registering again");
                }
                return false;
            }
            // Some states (failing closed after --max-staleness) come with time,
            // not with a status change.
            () = tokio::time::sleep(REFRESH_INTERVAL), if !pending => pending = true,
            changed = status.changed(), if !pending && status_open => {
                // A closed status means the policy service is gone: keep the
                // registration as it is until asked to stop.
                status_open = changed.is_ok();
                pending = status_open;
            }
            () = tokio::time::sleep_until(retry_at), if pending => {
                status.borrow_and_update();
                let wanted = observer.current();
                if wanted != written {
                    if let Err(e) = put(client, key, &wanted, keeper.id()).await {
                        eprintln!("revwatch serve: updating the fleet registration: {e:#}");
                        last_write = Instant::now();
                        continue;
                    }
                    written = wanted;
                }
                last_write = Instant::now();
                pending = false;
            }
        }
    }
}

/// The fleet's counts, read from the mirror (the fleet keys lie under the mirrored
/// prefix): `revwatch_fleet_instances`, `_behind`, `_degraded`.
pub fn register_metrics<T: Send + Sync + 'static>(
    registry: &mut Registry,
    mirror: Mirror<T>,
    prefix: &str,
) -> JoinHandle<()> {
    let (instances, behind, degraded): (Gauge, Gauge, Gauge) = Default::default();
    let r = registry.sub_registry_with_prefix("revwatch_fleet");
    r.register(
        "instances",
        "Live serve instances of this prefix",
        instances.clone(),
    );
    r.register(
        "behind",
        "Instances serving a policy revision below the fleet's newest",
        behind.clone(),
    );
    r.register(
        "degraded",
        "Instances that are not ready (degraded or without a policy set)",
        degraded.clone(),
    );
    let fleet_key = fleet_prefix(prefix).into_bytes();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(METRICS_INTERVAL);
        loop {
            tick.tick().await;
            let snapshot = mirror.snapshot();
            let (fleet, _) = Fleet::parse(
                snapshot
                    .with_prefix(&fleet_key)
                    .map(|(k, e)| (k.as_bytes(), &e.raw[..])),
            );
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            instances.set(count(fleet.members.len()));
            behind.set(count(fleet.behind()));
            degraded.set(count(fleet.degraded()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, i64)]) -> Tree {
        let mut tree = Tree::from_files(files.iter().map(|(p, _)| (*p, "x"))).unwrap();
        for (path, revision) in files {
            tree.files.get_mut(*path).unwrap().mod_revision = *revision;
        }
        tree
    }

    #[test]
    fn deleting_an_older_file_changes_the_digest_not_the_revision() {
        let before = files_of(&tree(&[("a.cedar", 3), ("b.cedar", 7)]), None);
        let after = files_of(&tree(&[("b.cedar", 7)]), None);
        assert_eq!((before.revision, after.revision), (7, 7));
        assert_ne!(before.digest, after.digest);
        assert_eq!(after.digest.len(), 16);
    }

    #[test]
    fn the_digest_follows_names_revisions_and_the_pointer_only() {
        let files = [("a.cedar", 3), ("b.cedar", 7)];
        assert_eq!(files_of(&tree(&files), None), files_of(&tree(&files), None));
        // A rewrite, even of the same bytes, is a new file version.
        assert_ne!(
            files_of(&tree(&files), None).digest,
            files_of(&tree(&[("a.cedar", 8), ("b.cedar", 7)]), None).digest
        );
        assert_ne!(
            files_of(&tree(&files), None).digest,
            files_of(&tree(&files), Some(9)).digest
        );
        // Path boundaries count: "ab" + "c" is not "a" + "bc".
        assert_ne!(
            files_of(&tree(&[("ab", 1), ("c", 1)]), None).digest,
            files_of(&tree(&[("a", 1), ("bc", 1)]), None).digest
        );
    }
}
