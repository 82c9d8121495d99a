//! A disk that loses what was not synced: the model behind the power-loss test.
//!
//! Files live in memory with two contents: what the page cache holds and what has reached
//! the disk, which `sync_data`/`sync_all` bring level. Directory entries are likewise live
//! or durable: creating, renaming or removing a file changes the live entries of its
//! directory, and only `sync_dir` of that directory makes them durable. A power loss at a
//! chosen operation leaves the disk as a reboot would find it:
//!
//! - the durable entries only (and none below a directory whose own entry is not durable);
//! - each file's synced content, plus, if the plan says so, a random prefix of its unsynced
//!   changes in the order they were issued (the last one possibly torn);
//! - the write in progress at the loss torn: a random part of it landed.
//!
//! This is the strictest POSIX reading: no ordering a particular file system adds (ext4's
//! `data=ordered`, for one) is assumed. After the loss the old disk fails every operation,
//! as a machine without power would, so nothing can be acknowledged after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::storage::{Storage, StorageFile};

/// When the power goes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum At {
    /// Before the n-th operation that changes something (1-based), of any kind.
    Op(u64),
    /// During the n-th write to a log segment (a `.wal` file).
    LogWrite(u64),
    /// Only when the test calls [`SimFs::power_loss_now`].
    Never,
}

/// How a power loss happens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub at: At,
    /// Whether unsynced changes may partly have reached the disk (else all are lost).
    pub keep_unsynced: bool,
    pub seed: u64,
}

/// What the disk went through before the power loss (or so far).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stats {
    /// Operations that changed something.
    pub ops: u64,
    /// Segments given their name (a rename to a `.wal` file).
    pub segments_named: u64,
    /// Segments deleted (after a checkpoint covered them).
    pub segments_removed: u64,
    /// Syncs of the database file.
    pub db_syncs: u64,
}

/// The disk found after a power loss.
pub(crate) struct Image {
    pub fs: SimFs,
    /// The disk's history up to the loss.
    pub before: Stats,
    /// The file whose write was torn by the loss, if it survived.
    pub torn: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File(u64),
}

#[derive(Debug, Clone)]
enum Change {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Node {
    data: Vec<u8>,
    synced: Vec<u8>,
    /// Changes to `data` since the last sync, in order.
    unsynced: Vec<Change>,
}

fn apply(content: &mut Vec<u8>, change: &Change) {
    match change {
        Change::Write(offset, bytes) => {
            let start = *offset as usize;
            let end = start + bytes.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[start..end].copy_from_slice(bytes);
        }
        Change::SetLen(len) => content.resize(*len as usize, 0),
    }
}

/// An operation about to happen, as far as a power loss cares.
enum Step<'a> {
    Write {
        id: u64,
        offset: u64,
        bytes: &'a [u8],
    },
    Other,
}

struct Sim {
    root: PathBuf,
    live: BTreeMap<PathBuf, Entry>,
    durable: BTreeMap<PathBuf, Entry>,
    nodes: HashMap<u64, Node>,
    next_id: u64,
    log_writes: u64,
    plan: Option<Plan>,
    image: Option<Image>,
    lost: bool,
    stats: Stats,
}

fn lost() -> io::Error {
    io::Error::other("the disk lost power")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn is_log(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "wal")
}

fn is_db(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "redb")
}

impl Sim {
    fn new(root: &Path) -> Self {
        let entries = BTreeMap::from([(root.to_path_buf(), Entry::Dir)]);
        Self {
            root: root.to_path_buf(),
            live: entries.clone(),
            durable: entries,
            nodes: HashMap::new(),
            next_id: 1,
            log_writes: 0,
            plan: None,
            image: None,
            lost: false,
            stats: Stats::default(),
        }
    }

    /// The live name of file `id`, if it has one.
    fn name_of(&self, id: u64) -> Option<&Path> {
        self.live
            .iter()
            .find(|(_, e)| **e == Entry::File(id))
            .map(|(p, _)| p.as_path())
    }

    fn node(&mut self, id: u64) -> io::Result<&mut Node> {
        self.nodes.get_mut(&id).ok_or_else(lost)
    }

    fn file(&self, path: &Path) -> io::Result<u64> {
        match self.live.get(path) {
            Some(Entry::File(id)) => Ok(*id),
            _ => Err(not_found(path)),
        }
    }

    fn parent_is_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent().map(|p| self.live.get(p)) {
            Some(Some(Entry::Dir)) => Ok(()),
            _ => Err(not_found(path)),
        }
    }

    /// Counts an operation that changes something, and loses power if the plan says so.
    fn step(&mut self, step: Step<'_>) -> io::Result<()> {
        if self.lost {
            return Err(lost());
        }
        self.stats.ops += 1;
        let mut torn = None;
        if let Step::Write { id, offset, bytes } = step {
            if self.name_of(id).is_some_and(is_log) {
                self.log_writes += 1;
                if matches!(self.plan, Some(Plan { at: At::LogWrite(n), .. }) if n == self.log_writes)
                {
                    torn = Some((id, offset, bytes));
                }
            }
            if matches!(self.plan, Some(Plan { at: At::Op(n), .. }) if n == self.stats.ops) {
                torn = Some((id, offset, bytes));
            }
        }
        let due = match self.plan.map(|p| p.at) {
            Some(At::Op(n)) => n == self.stats.ops,
            Some(At::LogWrite(_)) => torn.is_some(),
            Some(At::Never) | None => false,
        };
        if due {
            self.lose_power(torn);
            return Err(lost());
        }
        Ok(())
    }

    /// Builds what a reboot finds, with the write in progress (`torn`) partly landed.
    fn lose_power(&mut self, torn: Option<(u64, u64, &[u8])>) {
        let plan = self.plan.take().unwrap_or(Plan {
            at: At::Never,
            keep_unsynced: false,
            seed: 0,
        });
        let mut rng = StdRng::seed_from_u64(plan.seed);
        let entries: BTreeMap<PathBuf, Entry> = self
            .durable
            .iter()
            .filter(|(path, _)| self.reachable(path))
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        let mut nodes = HashMap::new();
        let mut torn_path = None;
        for (path, entry) in &entries {
            let Entry::File(id) = entry else { continue };
            if nodes.contains_key(id) {
                continue;
            }
            let Some(node) = self.nodes.get(id) else {
                continue;
            };
            let mut content = node.synced.clone();
            if plan.keep_unsynced {
                let kept = rng.random_range(0..=node.unsynced.len());
                for change in &node.unsynced[..kept] {
                    apply(&mut content, change);
                }
                // The next change may have been cut short.
                if let Some(Change::Write(offset, bytes)) = node.unsynced.get(kept)
                    && !bytes.is_empty()
                {
                    let cut = rng.random_range(0..bytes.len());
                    apply(&mut content, &Change::Write(*offset, bytes[..cut].to_vec()));
                }
            }
            if let Some((tid, offset, bytes)) = torn
                && tid == *id
                && !bytes.is_empty()
            {
                // Something landed, never all of it.
                let cut = rng.random_range(1..bytes.len().max(2));
                apply(&mut content, &Change::Write(offset, bytes[..cut].to_vec()));
                torn_path = Some(path.clone());
            }
            nodes.insert(
                *id,
                Node {
                    data: content.clone(),
                    synced: content,
                    unsynced: Vec::new(),
                },
            );
        }
        let mut after = Sim::new(&self.root);
        after.live = entries.clone();
        after.durable = entries;
        after.nodes = nodes;
        after.next_id = self.next_id;
        self.image = Some(Image {
            fs: SimFs {
                sim: Arc::new(Mutex::new(after)),
            },
            before: self.stats,
            torn: torn_path,
        });
        self.lost = true;
    }

    /// Whether every directory above `path` (up to the root) has a durable entry.
    fn reachable(&self, path: &Path) -> bool {
        if path == self.root {
            return true;
        }
        for dir in path.ancestors().skip(1) {
            if dir == self.root {
                return true;
            }
            if self.durable.get(dir) != Some(&Entry::Dir) {
                return false;
            }
        }
        false
    }
}

/// The simulated disk; clones share it.
#[derive(Clone)]
pub(crate) struct SimFs {
    sim: Arc<Mutex<Sim>>,
}

impl SimFs {
    /// An empty disk whose only (durable) directory is `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            sim: Arc::new(Mutex::new(Sim::new(root))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sim> {
        self.sim.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets when (and how) the power goes.
    pub fn plan(&self, plan: Plan) {
        self.lock().plan = Some(plan);
    }

    /// Loses power now, if it has not gone yet, following the plan's `keep_unsynced`.
    pub fn power_loss_now(&self) {
        let mut sim = self.lock();
        if !sim.lost {
            sim.lose_power(None);
        }
    }

    /// The disk after the power loss, once.
    pub fn take_image(&self) -> Option<Image> {
        self.lock().image.take()
    }

    fn with_node<T>(&self, id: u64, f: impl FnOnce(&mut Node) -> T) -> io::Result<T> {
        let mut sim = self.lock();
        if sim.lost {
            return Err(lost());
        }
        Ok(f(sim.node(id)?))
    }

    fn change(&self, id: u64, change: Change) -> io::Result<()> {
        let mut sim = self.lock();
        let step = match &change {
            Change::Write(offset, bytes) => Step::Write {
                id,
                offset: *offset,
                bytes,
            },
            Change::SetLen(_) => Step::Other,
        };
        sim.step(step)?;
        let node = sim.node(id)?;
        apply(&mut node.data, &change);
        node.unsynced.push(change);
        Ok(())
    }

    fn sync(&self, id: u64) -> io::Result<()> {
        let mut sim = self.lock();
        sim.step(Step::Other)?;
        if sim.name_of(id).is_some_and(is_db) {
            sim.stats.db_syncs += 1;
        }
        let node = sim.node(id)?;
        node.synced.clone_from(&node.data);
        node.unsynced.clear();
        Ok(())
    }

    fn open_or_create(&self, path: &Path, truncate: bool) -> io::Result<SimFile> {
        let mut sim = self.lock();
        sim.step(Step::Other)?;
        sim.parent_is_dir(path)?;
        let id = match sim.live.get(path) {
            Some(Entry::File(id)) => *id,
            Some(Entry::Dir) => return Err(io::Error::other("is a directory")),
            None => {
                let id = sim.next_id;
                sim.next_id += 1;
                sim.nodes.insert(id, Node::default());
                sim.live.insert(path.to_path_buf(), Entry::File(id));
                id
            }
        };
        if truncate {
            let node = sim.node(id)?;
            node.data.clear();
            node.unsynced.push(Change::SetLen(0));
        }
        Ok(SimFile {
            fs: self.clone(),
            id,
        })
    }
}

impl Storage for SimFs {
    type File = SimFile;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.step(Step::Other)?;
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| !sim.live.contains_key(*a))
            .map(Path::to_path_buf)
            .collect();
        // The first existing ancestor must be a directory inside the disk.
        let base = dir.ancestors().nth(missing.len());
        if base.is_none_or(|b| sim.live.get(b) != Some(&Entry::Dir)) {
            return Err(not_found(dir));
        }
        for path in missing {
            sim.live.insert(path, Entry::Dir);
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        let sim = self.lock();
        if sim.lost {
            return Err(lost());
        }
        if sim.live.get(dir) != Some(&Entry::Dir) {
            return Err(not_found(dir));
        }
        Ok(sim
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(ToOwned::to_owned))
            .collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut sim = self.lock();
        if sim.lost {
            return Err(lost());
        }
        let id = sim.file(path)?;
        Ok(sim.node(id)?.data.clone())
    }

    fn open(&self, path: &Path) -> io::Result<SimFile> {
        let id = self.lock().file(path)?;
        Ok(SimFile {
            fs: self.clone(),
            id,
        })
    }

    fn create(&self, path: &Path) -> io::Result<SimFile> {
        self.open_or_create(path, true)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.step(Step::Other)?;
        sim.parent_is_dir(to)?;
        let id = sim.file(from)?;
        sim.live.remove(from);
        sim.live.insert(to.to_path_buf(), Entry::File(id));
        if is_log(to) {
            sim.stats.segments_named += 1;
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.step(Step::Other)?;
        sim.file(path)?;
        sim.live.remove(path);
        if is_log(path) {
            sim.stats.segments_removed += 1;
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut sim = self.lock();
        sim.step(Step::Other)?;
        // The empty path is the disk's root, which always exists.
        if !dir.as_os_str().is_empty() && sim.live.get(dir) != Some(&Entry::Dir) {
            return Err(not_found(dir));
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        let now: Vec<(PathBuf, Entry)> = sim
            .live
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, e)| (p.clone(), *e))
            .collect();
        sim.durable.retain(|p, _| !in_dir(p));
        sim.durable.extend(now);
        Ok(())
    }

    fn database(
        &self,
        builder: &redb::Builder,
        path: &Path,
    ) -> Result<redb::Database, redb::DatabaseError> {
        let file = self
            .open_or_create(path, false)
            .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
        builder.create_with_backend(file)
    }
}

/// An open file of a [`SimFs`].
pub(crate) struct SimFile {
    fs: SimFs,
    id: u64,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimFile({})", self.id)
    }
}

impl StorageFile for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fs.change(self.id, Change::Write(offset, buf.to_vec()))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.sync(self.id)
    }

    fn sync_all(&self) -> io::Result<()> {
        self.fs.sync(self.id)
    }
}

impl redb::StorageBackend for SimFile {
    fn len(&self) -> io::Result<u64> {
        self.fs.with_node(self.id, |n| n.data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.fs.with_node(self.id, |n| {
            let start = offset as usize;
            let src = n
                .data
                .get(start..start + out.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        })?
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.fs.change(self.id, Change::SetLen(len))
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.sync(self.id)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.fs
            .change(self.id, Change::Write(offset, data.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from("disk")
    }

    fn image(fs: &SimFs) -> SimFs {
        fs.power_loss_now();
        fs.take_image().expect("image").fs
    }

    #[test]
    fn unsynced_writes_and_entries_are_lost() {
        let fs = SimFs::new(&root());
        let dir = root().join("d");
        fs.create_dir_all(&dir).expect("mkdir");
        fs.sync_dir(&root()).expect("sync root");
        let a = fs.create(&dir.join("a")).expect("a");
        a.write_all_at(b"synced", 0).expect("write");
        a.sync_data().expect("sync");
        a.write_all_at(b"SYNCED and more", 0).expect("write");
        fs.sync_dir(&dir).expect("sync dir");
        let b = fs.create(&dir.join("b")).expect("b");
        b.sync_all().expect("sync b");
        let after = image(&fs);
        assert_eq!(after.read(&dir.join("a")).expect("a"), b"synced");
        // b's content was synced, its directory entry was not.
        assert!(after.read(&dir.join("b")).is_err());
        // The old disk is dead.
        assert!(a.write_all_at(b"x", 0).is_err());
        assert!(fs.read(&dir.join("a")).is_err());
    }

    #[test]
    fn an_entry_below_an_unsynced_directory_is_lost() {
        let fs = SimFs::new(&root());
        let dir = root().join("d");
        fs.create_dir_all(&dir).expect("mkdir");
        let a = fs.create(&dir.join("a")).expect("a");
        a.sync_all().expect("sync");
        fs.sync_dir(&dir).expect("sync dir");
        let after = image(&fs);
        assert!(after.list(&dir).is_err());
    }

    #[test]
    fn renames_and_removals_need_the_directory_sync() {
        let fs = SimFs::new(&root());
        let a = fs.create(&root().join("a")).expect("a");
        a.write_all_at(b"one", 0).expect("write");
        a.sync_all().expect("sync");
        fs.sync_dir(&root()).expect("sync dir");
        fs.rename(&root().join("a"), &root().join("b"))
            .expect("rename");
        fs.remove_file(&root().join("b")).expect("remove");
        assert!(fs.read(&root().join("b")).is_err());
        let after = image(&fs);
        assert_eq!(after.read(&root().join("a")).expect("a"), b"one");
        assert!(after.read(&root().join("b")).is_err());
    }

    #[test]
    fn the_write_in_progress_is_torn() {
        for seed in 0..20 {
            let fs = SimFs::new(&root());
            let a = fs.create(&root().join("0000000000000001.wal")).expect("a");
            fs.sync_dir(&root()).expect("sync dir");
            a.write_all_at(&[1; 8], 0).expect("write");
            a.sync_data().expect("sync");
            fs.plan(Plan {
                at: At::LogWrite(2),
                keep_unsynced: false,
                seed,
            });
            assert!(a.write_all_at(&[2; 8], 8).is_err());
            let img = fs.take_image().expect("image");
            assert_eq!(img.torn, Some(root().join("0000000000000001.wal")));
            let bytes = img
                .fs
                .read(&root().join("0000000000000001.wal"))
                .expect("read");
            assert_eq!(&bytes[..8], &[1; 8]);
            let landed = bytes[8..].iter().take_while(|b| **b == 2).count();
            assert!((1..8).contains(&landed), "seed {seed}: {bytes:?}");
        }
    }

    #[test]
    fn kept_unsynced_changes_are_a_prefix_in_issue_order() {
        let mut seen = HashSet::new();
        for seed in 0..40 {
            let fs = SimFs::new(&root());
            let a = fs.create(&root().join("a")).expect("a");
            a.sync_all().expect("sync");
            fs.sync_dir(&root()).expect("sync dir");
            for i in 0..4u8 {
                a.write_all_at(&[i + 1; 4], u64::from(i) * 4)
                    .expect("write");
            }
            fs.plan(Plan {
                at: At::Never,
                keep_unsynced: true,
                seed,
            });
            let bytes = image(&fs).read(&root().join("a")).expect("read");
            let landed = bytes.iter().take_while(|b| **b != 0).count();
            assert!(bytes[landed..].iter().all(|b| *b == 0), "{bytes:?}");
            for (i, b) in bytes[..landed].iter().enumerate() {
                assert_eq!(usize::from(*b), i / 4 + 1, "{bytes:?}");
            }
            seen.insert(landed);
        }
        assert!(seen.len() > 3, "prefixes seen: {seen:?}");
    }
}
