use std::fs;
use std::sync::Arc;

use super::*;
use crate::mvcc::{Record, Revision};

fn batch(n: i64) -> Batch {
    Batch {
        records: vec![Arc::new(Record {
            key: format!("k{n}").into_bytes().into(),
            rev: Revision {
                main: n + 1,
                sub: 0,
            },
            create_revision: n + 1,
            version: 1,
            lease: 0,
            value: vec![b'v'; n as usize],
            tombstone: false,
        })],
        current: n + 1,
        ..Batch::default()
    }
}

/// Batches compare by their debug form: `Batch` has no `PartialEq`.
fn same(a: &Batch, b: &Batch) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

fn open(dir: &Path, checkpointed: u64) -> (Wal, Vec<(u64, Batch)>) {
    Wal::open(dir, checkpointed, 1 << 16).expect("open")
}

fn append_all(wal: &mut Wal, ns: std::ops::Range<i64>) -> Vec<u64> {
    ns.map(|n| wal.append(&batch(n)).expect("append").0)
        .collect()
}

fn seqs(replay: &[(u64, Batch)]) -> Vec<u64> {
    replay.iter().map(|(s, _)| *s).collect()
}

/// The only segment in `dir`.
fn only_segment(dir: &Path) -> PathBuf {
    let segs = segment::list(&Disk, dir).expect("list");
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].1.clone()
}

/// Appends records 1 to 3 to a new log in `dir`, then changes its segment's bytes with
/// `damage`, given where record `seq` starts. Returns the segment and that offset.
fn three_records_then(
    dir: &Path,
    seq: u64,
    damage: impl FnOnce(&mut Vec<u8>, usize),
) -> (PathBuf, usize) {
    let (mut wal, _) = open(dir, 0);
    append_all(&mut wal, 0..3);
    drop(wal);
    let path = only_segment(dir);
    let mut bytes = fs::read(&path).expect("read");
    let at = record_offset(&bytes, 1, seq);
    damage(&mut bytes, at);
    fs::write(&path, &bytes).expect("write");
    (path, at)
}

/// Where record `seq` starts in a segment.
fn record_offset(bytes: &[u8], first: u64, seq: u64) -> usize {
    let scan = segment::scan(bytes, first).expect("scan");
    scan.records[(seq - first) as usize].1.start - segment::HEADER
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, replay) = open(dir.path(), 0);
    assert!(replay.is_empty());
    assert_eq!(append_all(&mut wal, 0..3), vec![1, 2, 3]);
    drop(wal);
    let (mut wal, replay) = open(dir.path(), 0);
    assert_eq!(seqs(&replay), vec![1, 2, 3]);
    for (i, (_, b)) in replay.iter().enumerate() {
        assert!(same(b, &batch(i as i64)), "record {i}: {b:?}");
    }
    // Appends continue the sequence.
    assert_eq!(append_all(&mut wal, 3..4), vec![4]);
    drop(wal);
    assert_eq!(seqs(&open(dir.path(), 0).1), vec![1, 2, 3, 4]);
}

#[test]
fn torn_tail_is_cut_and_appends_follow_intact_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A crash in the middle of writing record 3: only its first part reached the disk.
    let (path, at) = three_records_then(dir.path(), 3, |bytes, at| {
        bytes[at + segment::HEADER + 1..].fill(0);
    });

    let (mut wal, replay) = open(dir.path(), 0);
    assert_eq!(seqs(&replay), vec![1, 2]);
    // The garbage is gone from the file, not just skipped.
    let after = fs::read(&path).expect("read");
    assert!(
        after[at..].iter().all(|b| *b == 0),
        "torn record left behind"
    );
    assert_eq!(append_all(&mut wal, 7..8), vec![3]);
    drop(wal);

    let (_, replay) = open(dir.path(), 0);
    assert_eq!(seqs(&replay), vec![1, 2, 3]);
    assert!(same(&replay[2].1, &batch(7)));
}

#[test]
fn damaged_record_before_intact_ones_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, at) = three_records_then(dir.path(), 2, |bytes, at| {
        bytes[at + segment::HEADER + 2] ^= 0x40;
    });
    match Wal::open(dir.path(), 0, 1 << 16) {
        Err(ServerError::WalCorrupt { offset, .. }) => assert_eq!(offset, at as u64),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged record in the middle was accepted"),
    }
    // Even when the damaged record is already checkpointed: the log is not trustworthy.
    assert!(Wal::open(dir.path(), 2, 1 << 16).is_err());
}

#[test]
fn damage_in_an_earlier_segment_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), 0, 512).expect("open");
    append_all(&mut wal, 0..40);
    drop(wal);
    let segs = segment::list(&Disk, dir.path()).expect("list");
    assert!(segs.len() > 2, "{segs:?}");
    let (first, path) = &segs[0];
    let mut bytes = fs::read(path).expect("read");
    let scan = segment::scan(&bytes, *first).expect("scan");
    // Cut the segment's last record: a torn tail anywhere but the last segment.
    let last = scan.records.last().expect("records").1.start;
    bytes[last + 4..].fill(0);
    fs::write(path, &bytes).expect("write");
    assert!(matches!(
        Wal::open(dir.path(), 0, 512),
        Err(ServerError::WalCorrupt { .. })
    ));
}

#[test]
fn replay_skips_checkpointed_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = open(dir.path(), 0);
    append_all(&mut wal, 0..5);
    drop(wal);
    let (mut wal, replay) = open(dir.path(), 3);
    assert_eq!(seqs(&replay), vec![4, 5]);
    assert!(same(&replay[0].1, &batch(3)));
    assert_eq!(append_all(&mut wal, 5..6), vec![6]);
    drop(wal);
    assert!(open(dir.path(), 6).1.is_empty());
}

#[test]
fn covered_segments_are_deleted_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut wal, _) = Wal::open(dir.path(), 0, 512).expect("open");
    let written = append_all(&mut wal, 0..40);
    let last = *written.last().expect("written");
    let segs = segment::list(&Disk, dir.path()).expect("list");
    assert!(segs.len() > 3, "{segs:?}");

    // A checkpoint in the middle of the second segment keeps it and what follows.
    let mid = (segs[1].0 + segs[2].0) / 2;
    assert_eq!(remove_covered(&Disk, dir.path(), mid).expect("remove"), 1);
    let left = segment::list(&Disk, dir.path()).expect("list");
    assert_eq!(left[0].0, segs[1].0);

    // A checkpoint of everything keeps only the last segment.
    assert_eq!(
        remove_covered(&Disk, dir.path(), last).expect("remove"),
        segs.len() - 2
    );
    assert_eq!(
        segment::list(&Disk, dir.path()).expect("list"),
        vec![segs[segs.len() - 1].clone()]
    );
    assert_eq!(append_all(&mut wal, 40..41), vec![last + 1]);
    drop(wal);
    let (_, replay) = Wal::open(dir.path(), last, 512).expect("open");
    assert_eq!(seqs(&replay), vec![last + 1]);
    // Records the remaining segments no longer hold cannot be replayed.
    assert!(matches!(
        Wal::open(dir.path(), mid, 512),
        Err(ServerError::WalCorrupt { .. })
    ));
}

#[test]
fn a_missing_log_behind_a_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        Wal::open(dir.path(), 5, 512),
        Err(ServerError::WalCorrupt { .. })
    ));
}

mod store {
    //! Recovery through the store: a checkpoint in redb plus a log tail.

    use std::time::Duration;

    use etcd_proto::etcdserverpb::{DeleteRangeRequest, LeaseGrantRequest, PutRequest};

    use crate::backend::Backend;
    use crate::checkpoint::Policy;
    use crate::faults::Faults;
    use crate::store::{Layout, Store, StoreOptions};

    use super::*;

    fn store(dir: &Path) -> Store {
        let opts = StoreOptions {
            min_lease_ttl: 2,
            lease_check_interval: Duration::from_secs(3600),
            checkpoint_interval: Duration::from_secs(3600),
            auto_compaction: None,
        };
        // No checkpoint while the test runs: only the one on close.
        let policy = Policy {
            interval: Duration::from_secs(3600),
            max_bytes: usize::MAX,
        };
        let layout = Layout {
            storage: Disk,
            segment_bytes: SEGMENT_BYTES,
            checkpoints: policy,
            mutation: None,
        };
        Store::open_with(dir, opts, Arc::new(Faults::default()), layout).expect("open store")
    }

    async fn put(s: &Store, key: &str, value: &str, lease: i64) -> i64 {
        let req = PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        };
        let resp = s.put(req).await.expect("put");
        resp.header.expect("header").revision
    }

    fn value(s: &Store, key: &str) -> Option<(Vec<u8>, i64, i64)> {
        let st = s.state();
        st.get_at(key.as_bytes(), s.committed())
            .map(|r| (r.value.clone(), r.rev.main, r.lease))
    }

    #[tokio::test]
    async fn recovers_checkpoint_plus_log_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("a");
        {
            let s = store(&data);
            assert_eq!(put(&s, "k1", "one", 0).await, 2);
            assert_eq!(put(&s, "k2", "two", 0).await, 3);
            // Closing checkpoints everything.
        }
        let crashed = dir.path().join("b");
        let commits;
        {
            let s = store(&data);
            let lease = s
                .lease_grant(LeaseGrantRequest { ttl: 600, id: 42 })
                .await
                .expect("grant");
            assert_eq!(lease.id, 42);
            assert_eq!(put(&s, "k3", "three", 42).await, 4);
            let del = s
                .delete_range(DeleteRangeRequest {
                    key: b"k1".to_vec(),
                    ..Default::default()
                })
                .await
                .expect("delete");
            assert_eq!(del.deleted, 1);
            assert_eq!(put(&s, "k2", "two again", 0).await, 6);
            s.compact(4).await.expect("compact");
            commits = s.commits();
            // What a crash leaves: the log, and the database as of the last checkpoint.
            copy_dir(&data, &crashed);
        }
        assert_eq!(commits, 5);
        {
            // The copy has records after the checkpoint, so this really replays.
            let (backend, _) = Backend::open(&Disk, &crashed).expect("backend");
            let checkpointed = backend.checkpointed().expect("checkpointed");
            drop(backend);
            let (_, replay) = Wal::open(&crashed.join("wal"), checkpointed, 512).expect("wal");
            assert_eq!(replay.len(), 5, "records after the checkpoint");
        }
        let s = store(&crashed);
        assert_eq!(s.committed(), 6);
        assert_eq!(s.state().compacted(), 4);
        assert_eq!(value(&s, "k1"), None);
        assert_eq!(value(&s, "k2"), Some((b"two again".to_vec(), 6, 0)));
        assert_eq!(value(&s, "k3"), Some((b"three".to_vec(), 4, 42)));
        assert_eq!(s.lease_ids(), vec![42]);
        let info = s.lease_info(42).expect("lease");
        assert_eq!(info.keys, vec![b"k3".to_vec()]);
        // Revisions continue, and a second restart replays nothing twice.
        assert_eq!(put(&s, "k4", "four", 0).await, 7);
        drop(s);
        let s = store(&crashed);
        assert_eq!(s.committed(), 7);
        assert_eq!(value(&s, "k4"), Some((b"four".to_vec(), 7, 0)));
        assert_eq!(s.lease_ids(), vec![42]);
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).expect("mkdir");
        for entry in fs::read_dir(from).expect("read_dir") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), target).expect("copy");
            }
        }
    }
}
