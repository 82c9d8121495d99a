//! `revwatch verify`: compares a mirror's state of a prefix (a fresh mirror, or a
//! persisted snapshot file) with etcd's own range of the prefix at the same
//! revision, and prints match or drift.
//!
//! The comparison is pure ([`compare`]) and unit-tested; the rest reads the two
//! states: the mirror's from a [`Mirror`] or a [`SnapshotFile`], etcd's page by page
//! at the mirror's revision.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use etcd_proto::{key_range::KeyRange, mvccpb::KeyValue};
use revwatch::{
    client::{Client, RangeRequest},
    mirror::{ClientSource, Digest, DigestBuilder, Mirror, MirrorConfig, snapshot::SnapshotFile},
};
use serde_json::{Value, json};

use crate::{
    connect::{EtcdAccessArgs, compacted_at},
    render,
};

/// Check a mirror of a prefix against etcd: compare the mirror's state with etcd's
/// range of the prefix at the same revision (keys, values, create and mod
/// revisions, versions, leases), and print match or drift.
///
/// Without --snapshot-file, starts a mirror of the prefix, waits until it is
/// ready and compares its snapshot. With --snapshot-file, compares a snapshot file
/// written by `tail` or `serve` at the file's revision (which etcd must not have
/// compacted yet).
///
/// Exits 0 on a match, 1 on drift, 2 when the check could not be made.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// etcd endpoints, comma-separated (default: the embedded server of `serve`).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// The key prefix mirrored ("" for every key).
    #[arg(long)]
    pub prefix: String,
    /// Verify this snapshot file (as written with `tail` or `serve`
    /// --snapshot-file) instead of a fresh mirror.
    #[arg(long)]
    pub snapshot_file: Option<PathBuf>,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// How many differing keys to list; the rest are counted.
    #[arg(long, default_value_t = 20)]
    pub max_differences: usize,
    /// Keys per range request, for the mirror's list and etcd's range.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
    pub page_size: i64,
    /// Give up (exit 2) when there is no verdict within this time.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub access: EtcdAccessArgs,
}

/// Exit statuses: the two verdicts, and "no verdict".
const EXIT_MATCH: i32 = 0;
const EXIT_DRIFT: i32 = 1;
const EXIT_ERROR: i32 = 2;

/// Runs the check and prints its outcome; returns the exit status.
pub async fn run(args: VerifyArgs) -> i32 {
    let verdict = match tokio::time::timeout(args.timeout, verify(&args)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(anyhow::anyhow!(
            "no verdict within {} (--timeout)",
            humantime::format_duration(args.timeout)
        )),
    };
    match verdict {
        Ok(verdict) => {
            if args.json {
                println!("{}", verdict.to_json(args.max_differences));
            } else {
                print!("{}", verdict.to_text(args.max_differences));
            }
            if verdict.is_match() {
                EXIT_MATCH
            } else {
                EXIT_DRIFT
            }
        }
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    json!({ "result": "error", "error": format!("{e:#}") })
                );
            }
            eprintln!("revwatch verify: {e:#}");
            EXIT_ERROR
        }
    }
}

/// What is compared with etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A mirror started by `verify`.
    Mirror,
    /// A persisted snapshot file.
    SnapshotFile,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Mirror => "the mirror",
            Origin::SnapshotFile => "the snapshot file",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Origin::Mirror => "mirror",
            Origin::SnapshotFile => "snapshot_file",
        }
    }
}

/// One side's state of the prefix at the compared revision, with its digest.
#[derive(Debug, Clone)]
pub struct Side {
    /// In ascending key order.
    pub kvs: Vec<KeyValue>,
    pub digest: Digest,
}

impl Side {
    /// The state `kvs`, which must be in ascending key order.
    fn of(kvs: Vec<KeyValue>) -> anyhow::Result<Side> {
        let mut digest = DigestBuilder::new();
        for kv in &kvs {
            digest.push_kv(kv)?;
        }
        Ok(Side {
            digest: digest.finish(),
            kvs,
        })
    }
}

/// A field of a key that differs between the two sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    /// `value`, `create_revision`, `mod_revision`, `version` or `lease`.
    pub field: &'static str,
    /// The compared side's number (for `value`, its length in bytes).
    pub ours: i64,
    /// etcd's.
    pub etcd: i64,
}

/// How one key differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// In etcd, not on the compared side.
    Missing(Vec<u8>),
    /// On the compared side, not in etcd.
    Extra(Vec<u8>),
    /// On both, with these fields differing.
    Different {
        key: Vec<u8>,
        fields: Vec<FieldDiff>,
    },
}

/// The outcome of a check.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Both sides hold the same state at `revision`.
    Match {
        origin: Origin,
        revision: i64,
        keys: usize,
        digest: Digest,
    },
    /// They differ at `revision`.
    Drift {
        origin: Origin,
        revision: i64,
        /// Key count and digest of the compared side, then of etcd.
        ours: (usize, Digest),
        etcd: (usize, Digest),
        /// Every differing key, in key order.
        differences: Vec<Difference>,
    },
    /// etcd has not reached the compared revision: it lost history the mirror saw
    /// (restored from an older backup), or the state comes from another cluster.
    EtcdBehind {
        origin: Origin,
        revision: i64,
        etcd_revision: i64,
    },
}

/// The fields of two versions of one key that differ.
fn field_diffs(ours: &KeyValue, etcd: &KeyValue) -> Vec<FieldDiff> {
    let mut diffs = Vec::new();
    // Values are not shown (they may be secrets), only their sizes.
    if ours.value != etcd.value {
        diffs.push(FieldDiff {
            field: "value",
            ours: ours.value.len() as i64,
            etcd: etcd.value.len() as i64,
        });
    }
    let numbers = [
        (
            "create_revision",
            ours.create_revision,
            etcd.create_revision,
        ),
        ("mod_revision", ours.mod_revision, etcd.mod_revision),
        ("version", ours.version, etcd.version),
        ("lease", ours.lease, etcd.lease),
    ];
    for (field, o, e) in numbers {
        if o != e {
            diffs.push(FieldDiff {
                field,
                ours: o,
                etcd: e,
            });
        }
    }
    diffs
}

/// Compares the two states of the prefix at `revision`, key by key (both are in
/// ascending key order).
pub fn compare(origin: Origin, revision: i64, ours: &Side, etcd: &Side) -> Verdict {
    let mut differences = Vec::new();
    let (mut o, mut e) = (ours.kvs.iter().peekable(), etcd.kvs.iter().peekable());
    loop {
        match (o.peek(), e.peek()) {
            (None, None) => break,
            (Some(x), None) => {
                differences.push(Difference::Extra(x.key.clone()));
                o.next();
            }
            (None, Some(y)) => {
                differences.push(Difference::Missing(y.key.clone()));
                e.next();
            }
            (Some(x), Some(y)) => match x.key.cmp(&y.key) {
                std::cmp::Ordering::Less => {
                    differences.push(Difference::Extra(x.key.clone()));
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    differences.push(Difference::Missing(y.key.clone()));
                    e.next();
                }
                std::cmp::Ordering::Equal => {
                    let fields = field_diffs(x, y);
                    if !fields.is_empty() {
                        differences.push(Difference::Different {
                            key: x.key.clone(),
                            fields,
                        });
                    }
                    o.next();
                    e.next();
                }
            },
        }
    }
    // Equal digests with differences (or the reverse) cannot happen; if they did,
    // the digests would disagree with the key by key comparison: call it drift.
    if differences.is_empty() && ours.digest == etcd.digest {
        Verdict::Match {
            origin,
            revision,
            keys: ours.kvs.len(),
            digest: ours.digest,
        }
    } else {
        Verdict::Drift {
            origin,
            revision,
            ours: (ours.kvs.len(), ours.digest),
            etcd: (etcd.kvs.len(), etcd.digest),
            differences,
        }
    }
}

/// Longest key shown in text output, in characters.
const MAX_KEY_CHARS: usize = 200;

impl Verdict {
    /// Whether both sides hold the same state.
    pub fn is_match(&self) -> bool {
        matches!(self, Verdict::Match { .. })
    }

    /// Text for people: one line on a match; on drift, a summary and at most
    /// `limit` differing keys, with a count of the rest.
    pub fn to_text(&self, limit: usize) -> String {
        match self {
            Verdict::Match {
                revision,
                keys,
                digest,
                ..
            } => format!("match at revision {revision}: {keys} keys, digest {digest}\n"),
            Verdict::EtcdBehind {
                origin,
                revision,
                etcd_revision,
            } => format!(
                "drift at revision {revision}: etcd is only at revision {etcd_revision}, so it \
                 lost history {} saw (restored from an older backup?), or {} comes from \
                 another etcd cluster\n",
                origin.name(),
                origin.name()
            ),
            Verdict::Drift {
                origin,
                revision,
                ours,
                etcd,
                differences,
            } => {
                let who = origin.name();
                let mut out = format!(
                    "drift at revision {revision}: {} keys differ\n  {who}: {} keys, digest {}\n  \
                     etcd: {} keys, digest {}\n",
                    differences.len(),
                    ours.0,
                    ours.1,
                    etcd.0,
                    etcd.1
                );
                for d in differences.iter().take(limit) {
                    let line = match d {
                        Difference::Missing(key) => format!(
                            "missing {}: in etcd, not in {who}",
                            render::bytes_human(key, MAX_KEY_CHARS)
                        ),
                        Difference::Extra(key) => format!(
                            "extra {}: in {who}, not in etcd",
                            render::bytes_human(key, MAX_KEY_CHARS)
                        ),
                        Difference::Different { key, fields } => {
                            let fields: Vec<String> = fields
                                .iter()
                                .map(|f| {
                                    let unit = if f.field == "value" { " bytes" } else { "" };
                                    format!(
                                        "{} ({who} {}{unit}, etcd {}{unit})",
                                        f.field, f.ours, f.etcd
                                    )
                                })
                                .collect();
                            format!(
                                "different {}: {}",
                                render::bytes_human(key, MAX_KEY_CHARS),
                                fields.join(", ")
                            )
                        }
                    };
                    out.push_str(&format!("  {line}\n"));
                }
                if differences.len() > limit {
                    out.push_str(&format!("  and {} more\n", differences.len() - limit));
                }
                out
            }
        }
    }

    /// One JSON document for machines, listing at most `limit` differences
    /// (`omitted` counts the rest).
    pub fn to_json(&self, limit: usize) -> Value {
        match self {
            Verdict::Match {
                origin,
                revision,
                keys,
                digest,
            } => json!({
                "result": "match", "source": origin.json_name(), "revision": revision,
                "keys": keys, "digest": digest.to_string(),
            }),
            Verdict::EtcdBehind {
                origin,
                revision,
                etcd_revision,
            } => json!({
                "result": "drift", "source": origin.json_name(), "revision": revision,
                "reason": "etcd_behind", "etcd_revision": etcd_revision,
            }),
            Verdict::Drift {
                origin,
                revision,
                ours,
                etcd,
                differences,
            } => {
                let listed: Vec<Value> = differences
                    .iter()
                    .take(limit)
                    .map(|d| match d {
                        Difference::Missing(key) => {
                            json!({ "key": render::bytes_json(key), "kind": "missing" })
                        }
                        Difference::Extra(key) => {
                            json!({ "key": render::bytes_json(key), "kind": "extra" })
                        }
                        Difference::Different { key, fields } => json!({
                            "key": render::bytes_json(key),
                            "kind": "different",
                            "fields": fields.iter().map(|f| json!({
                                "field": f.field, "source": f.ours, "etcd": f.etcd,
                            })).collect::<Vec<_>>(),
                        }),
                    })
                    .collect();
                json!({
                    "result": "drift", "source": origin.json_name(), "revision": revision,
                    "reason": "content",
                    "source_keys": ours.0, "source_digest": ours.1.to_string(),
                    "etcd_keys": etcd.0, "etcd_digest": etcd.1.to_string(),
                    "differences": listed,
                    "omitted": differences.len().saturating_sub(limit),
                })
            }
        }
    }
}

/// Reads both states and compares them.
async fn verify(args: &VerifyArgs) -> anyhow::Result<Verdict> {
    let prefix = args.prefix.as_bytes();
    // Before connecting: a bad file needs no etcd to be reported.
    let file = match &args.snapshot_file {
        Some(path) => {
            let (path, owned) = (path.clone(), prefix.to_vec());
            let read = tokio::task::spawn_blocking(move || SnapshotFile::read(&path, &owned))
                .await
                .context("reading the snapshot file")?;
            // Its message already names the cause; its source would repeat it.
            Some(read.map_err(|e| {
                anyhow::anyhow!(
                    "cannot verify the snapshot file of prefix {:?}: {e}",
                    args.prefix
                )
            })?)
        }
        None => None,
    };
    let config = args.access.client_config(args.endpoints.clone())?;
    let client = Client::connect(config)
        .await
        .with_context(|| format!("connecting to etcd at {}", args.endpoints.join(",")))?;

    let (origin, revision, ours) = match file {
        Some(file) => (Origin::SnapshotFile, file.revision, Side::of(file.kvs)?),
        None => {
            let (revision, side) = mirror_state(&client, args).await?;
            (Origin::Mirror, revision, side)
        }
    };
    let range = KeyRange::prefix(prefix);
    let etcd = match range_at(&client, &range, revision, args.page_size).await {
        Ok(kvs) => Side::of(kvs).context("etcd's range is not in key order")?,
        Err(e) if e.is_compacted() => {
            let at = match compacted_at(&client, &range, revision).await {
                Some(c) => format!("etcd compacted its history up to revision {c}"),
                None => "etcd compacted its history past it".to_owned(),
            };
            let advice = match origin {
                Origin::SnapshotFile => {
                    "verify a newer snapshot file, or run verify without --snapshot-file"
                }
                Origin::Mirror => "run verify again",
            };
            anyhow::bail!(
                "cannot read etcd at revision {revision}, the revision of {}: {at}; {advice}",
                origin.name()
            );
        }
        Err(e) if e.is_future_revision() => {
            let etcd_revision = current_revision(&client, &range)
                .await
                .context("reading etcd's current revision")?;
            return Ok(Verdict::EtcdBehind {
                origin,
                revision,
                etcd_revision,
            });
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading prefix {:?} from etcd at revision {revision}",
                args.prefix
            )));
        }
    };
    Ok(compare(origin, revision, &ours, &etcd))
}

/// Starts a mirror of the prefix, waits until it is ready and has etcd's current
/// revision, and returns its state then.
async fn mirror_state(client: &Client, args: &VerifyArgs) -> anyhow::Result<(i64, Side)> {
    let config = MirrorConfig::default().with_page_size(args.page_size);
    let mirror = Mirror::builder(args.prefix.as_bytes())
        .config(config)
        .start(ClientSource::new(client.clone()))
        .await
        .context("starting the mirror")?;
    mirror
        .wait_ready()
        .await
        .with_context(|| format!("mirroring prefix {:?}", args.prefix))?;
    let snapshot = mirror
        .consistent_snapshot(args.timeout)
        .await
        .context("waiting for the mirror to reach etcd's current revision")?;
    // Without a snapshot file there is nothing to write: the outcome is moot.
    let _ = mirror.shutdown().await;
    let kvs: Vec<KeyValue> = snapshot
        .iter()
        .map(|(key, e)| KeyValue {
            key: key.to_vec(),
            value: e.raw.to_vec(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            lease: e.lease,
        })
        .collect();
    // The library's own digest of the snapshot, not one recomputed from the copy.
    let side = Side {
        kvs,
        digest: snapshot.digest(),
    };
    Ok((snapshot.revision(), side))
}

/// etcd's state of `range` at `revision`, read page by page, every page at that
/// revision.
async fn range_at(
    client: &Client,
    range: &KeyRange,
    revision: i64,
    page_size: i64,
) -> Result<Vec<KeyValue>, revwatch::client::Error> {
    let mut kvs = Vec::new();
    let mut from = range.key().to_vec();
    loop {
        let page = client
            .range(RangeRequest {
                key: from.clone(),
                range_end: range.range_end().to_vec(),
                revision,
                limit: page_size,
                ..RangeRequest::default()
            })
            .await?;
        let more = page.more && !page.kvs.is_empty();
        if let Some(last) = page.kvs.last() {
            // The next page starts right after the last key of this one.
            from = last.key.clone();
            from.push(0);
        }
        kvs.extend(page.kvs);
        if !more {
            return Ok(kvs);
        }
    }
}

/// etcd's current revision, from a count-only range.
async fn current_revision(
    client: &Client,
    range: &KeyRange,
) -> Result<i64, revwatch::client::Error> {
    let resp = client
        .range(RangeRequest {
            key: range.key().to_vec(),
            range_end: range.range_end().to_vec(),
            count_only: true,
            ..RangeRequest::default()
        })
        .await?;
    Ok(resp.header.map_or(0, |h| h.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, modr: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 2,
            mod_revision: modr,
            version: 1,
            lease: 0,
        }
    }

    fn side(kvs: &[KeyValue]) -> Side {
        Side::of(kvs.to_vec()).unwrap()
    }

    #[test]
    fn equal_states_match_with_their_digest() {
        let state = [kv("p/a", "1", 2), kv("p/b", "2", 3)];
        let verdict = compare(Origin::Mirror, 9, &side(&state), &side(&state));
        let digest = side(&state).digest;
        assert!(verdict.is_match());
        assert_eq!(
            verdict.to_text(20),
            format!("match at revision 9: 2 keys, digest {digest}\n")
        );
        assert_eq!(
            verdict.to_json(20),
            json!({"result": "match", "source": "mirror", "revision": 9, "keys": 2,
                   "digest": digest.to_string()})
        );
    }

    #[test]
    fn missing_extra_and_different_keys_are_listed_in_key_order() {
        let ours = [
            kv("p/a", "1", 2),
            kv("p/b", "2", 3),
            kv("p/c", "3", 4),
            kv("p/e", "5", 6),
        ];
        let mut changed = kv("p/c", "three", 5);
        changed.lease = 7;
        let etcd = [
            kv("p/a", "1", 2),
            changed,
            kv("p/d", "4", 6),
            kv("p/e", "5", 6),
        ];
        let verdict = compare(Origin::SnapshotFile, 6, &side(&ours), &side(&etcd));
        let Verdict::Drift { differences, .. } = &verdict else {
            panic!("{verdict:?}")
        };
        assert_eq!(
            differences,
            &[
                Difference::Extra(b"p/b".to_vec()),
                Difference::Different {
                    key: b"p/c".to_vec(),
                    fields: vec![
                        FieldDiff {
                            field: "value",
                            ours: 1,
                            etcd: 5
                        },
                        FieldDiff {
                            field: "mod_revision",
                            ours: 4,
                            etcd: 5
                        },
                        FieldDiff {
                            field: "lease",
                            ours: 0,
                            etcd: 7
                        },
                    ],
                },
                Difference::Missing(b"p/d".to_vec()),
            ]
        );
        let text = verdict.to_text(20);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "drift at revision 6: 3 keys differ");
        assert_eq!(
            &lines[3..],
            [
                "  extra \"p/b\": in the snapshot file, not in etcd",
                "  different \"p/c\": value (the snapshot file 1 bytes, etcd 5 bytes), \
                 mod_revision (the snapshot file 4, etcd 5), lease (the snapshot file 0, etcd 7)",
                "  missing \"p/d\": in etcd, not in the snapshot file",
            ]
        );
    }

    #[test]
    fn the_listing_is_bounded_and_counts_the_rest() {
        let ours: Vec<KeyValue> = (0..5).map(|i| kv(&format!("p/{i}"), "x", 2)).collect();
        let verdict = compare(Origin::Mirror, 3, &side(&ours), &side(&[]));
        let text = verdict.to_text(2);
        assert_eq!(text.lines().filter(|l| l.contains("extra")).count(), 2);
        assert!(text.ends_with("  and 3 more\n"), "{text}");
        let doc = verdict.to_json(2);
        assert_eq!(doc["differences"].as_array().map(Vec::len), Some(2));
        assert_eq!(doc["omitted"], 3);
        assert_eq!(
            (doc["source_keys"].as_u64(), doc["etcd_keys"].as_u64()),
            (Some(5), Some(0))
        );
        assert_ne!(doc["source_digest"], doc["etcd_digest"]);
    }

    #[test]
    fn a_state_out_of_key_order_is_refused() {
        assert!(Side::of(vec![kv("p/b", "", 2), kv("p/a", "", 3)]).is_err());
    }
}
