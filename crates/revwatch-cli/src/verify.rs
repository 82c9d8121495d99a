//! `revwatch verify`: compares a mirror's state of a prefix (a fresh mirror, a
//! persisted snapshot file, or the mirror of a running `serve`) with etcd's own
//! range of the prefix at the same revision, and prints match or drift.
//!
//! The comparison is pure ([`compare`]) and unit-tested; the rest reads the two
//! states: the mirror's from a [`Mirror`], a [`SnapshotFile`] or serve's
//! `GET /v1/mirror/digest` (which sends no values: a key's value is compared by its
//! size and the key's digest), etcd's page by page at the mirror's revision.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use axum::body::Bytes;
use clap::Args;
use etcd_proto::{key_range::KeyRange, mvccpb::KeyValue};
use http_body_util::{BodyExt, Empty};
use hyper::{StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use revwatch::{
    client::{Client, RangeRequest},
    mirror::{
        ClientSource, DigestBuilder, DigestEntry, DigestError, Mirror, MirrorConfig,
        snapshot::SnapshotFile,
    },
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    connect::{EtcdAccessArgs, compacted_at},
    render,
    serve::{
        mirror_digest::{KeyDigest, MirrorDigest, is_digest},
        read_token,
    },
};

/// Check a mirror of a prefix against etcd: compare the mirror's state with etcd's
/// range of the prefix at the same revision (keys, values, create and mod
/// revisions, versions, leases), and print match or drift.
///
/// Without --snapshot-file or --url, starts a mirror of the prefix, waits until it
/// is ready and compares its snapshot. With --snapshot-file, compares a snapshot
/// file written by `tail` or `serve` at the file's revision (which etcd must not
/// have compacted yet). With --url, compares the mirror of a running `revwatch
/// serve` at its revision, as serve reports it (GET /v1/mirror/digest).
///
/// Exits 0 on a match, 1 on drift, 2 when the check could not be made.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// etcd endpoints, comma-separated (default: the embedded server of `serve`).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub endpoints: Vec<String>,
    /// The key prefix mirrored ("" for every key). With --url, serve's own prefix
    /// (checked when given).
    #[arg(long, required_unless_present = "url")]
    pub prefix: Option<String>,
    /// Verify this snapshot file (as written with `tail` or `serve`
    /// --snapshot-file) instead of a fresh mirror.
    #[arg(long, conflicts_with = "url")]
    pub snapshot_file: Option<PathBuf>,
    /// Verify the mirror of the `revwatch serve` answering at this URL (e.g.
    /// http://127.0.0.1:8181) instead of a fresh mirror. Sends serve's bearer
    /// token, read from --token-file, else REVWATCH_TOKEN.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// With --url: the file holding serve's bearer token.
    #[arg(long, requires = "url")]
    pub token_file: Option<PathBuf>,
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
    /// The mirror of a running `serve`.
    Serve,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Mirror => "the mirror",
            Origin::SnapshotFile => "the snapshot file",
            Origin::Serve => "serve's mirror",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Origin::Mirror => "mirror",
            Origin::SnapshotFile => "snapshot_file",
            Origin::Serve => "serve",
        }
    }
}

/// The compared side's state of the prefix at the compared revision, with its
/// digest.
#[derive(Debug, Clone)]
pub struct Side {
    /// In ascending key order.
    pub keys: Vec<KeyDigest>,
    pub digest: String,
}

impl Side {
    /// The state `kvs`, which must be in ascending key order.
    fn of(kvs: &[KeyValue]) -> anyhow::Result<Side> {
        Ok(Side {
            digest: digest_of(kvs)?,
            keys: kvs.iter().map(|kv| KeyDigest::of(kv.into())).collect(),
        })
    }

    /// The state serve describes, checked: well-formed digests, keys in ascending
    /// order, as many as it counts.
    fn served(body: MirrorDigest) -> anyhow::Result<Side> {
        let entries = body.entries.context("the answer lists no keys")?;
        anyhow::ensure!(
            is_digest(&body.digest) && entries.len() == body.keys,
            "the answer's digest or key count is malformed"
        );
        for pair in entries.windows(2) {
            anyhow::ensure!(
                pair[0].key < pair[1].key,
                "the answer's keys are not in ascending order"
            );
        }
        if let Some(e) = entries.iter().find(|e| !is_digest(&e.digest)) {
            anyhow::bail!(
                "the answer has a malformed digest for key {}",
                render::bytes_human(&e.key, MAX_KEY_CHARS)
            );
        }
        Ok(Side {
            keys: entries,
            digest: body.digest,
        })
    }
}

/// etcd's state of the prefix at the compared revision, with its digest.
#[derive(Debug, Clone)]
pub struct EtcdSide {
    /// In ascending key order.
    pub kvs: Vec<KeyValue>,
    pub digest: String,
}

impl EtcdSide {
    /// The state `kvs`, which must be in ascending key order.
    fn of(kvs: Vec<KeyValue>) -> Result<EtcdSide, DigestError> {
        Ok(EtcdSide {
            digest: digest_of(&kvs)?,
            kvs,
        })
    }
}

/// The digest of `kvs`, refused unless they are in ascending key order.
fn digest_of(kvs: &[KeyValue]) -> Result<String, DigestError> {
    let mut digest = DigestBuilder::new();
    for kv in kvs {
        digest.push_kv(kv)?;
    }
    Ok(digest.finish().to_string())
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
        digest: String,
    },
    /// They differ at `revision`.
    Drift {
        origin: Origin,
        revision: i64,
        /// Key count and digest of the compared side, then of etcd.
        ours: (usize, String),
        etcd: (usize, String),
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
fn field_diffs(ours: &KeyDigest, etcd: &KeyValue) -> Vec<FieldDiff> {
    let mut diffs = Vec::new();
    // Values are not shown (they may be secrets), only their sizes.
    if !ours.has_value(&etcd.value) {
        diffs.push(FieldDiff {
            field: "value",
            ours: ours.value_bytes as i64,
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
pub fn compare(origin: Origin, revision: i64, ours: &Side, etcd: &EtcdSide) -> Verdict {
    let mut differences = Vec::new();
    let (mut o, mut e) = (ours.keys.iter().peekable(), etcd.kvs.iter().peekable());
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
            keys: ours.keys.len(),
            digest: ours.digest.clone(),
        }
    } else {
        Verdict::Drift {
            origin,
            revision,
            ours: (ours.keys.len(), ours.digest.clone()),
            etcd: (etcd.kvs.len(), etcd.digest.clone()),
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
                "keys": keys, "digest": digest,
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
                    "source_keys": ours.0, "source_digest": ours.1,
                    "etcd_keys": etcd.0, "etcd_digest": etcd.1,
                    "differences": listed,
                    "omitted": differences.len().saturating_sub(limit),
                })
            }
        }
    }
}

/// Reads both states and compares them.
async fn verify(args: &VerifyArgs) -> anyhow::Result<Verdict> {
    // Before connecting to etcd: a bad file, or serve's refusal, needs no etcd to
    // be reported.
    let (prefix, compared) = match (&args.url, &args.snapshot_file) {
        (Some(url), _) => {
            let (prefix, revision, side) = serve_state(url, args).await?;
            (prefix, Some((Origin::Serve, revision, side)))
        }
        (None, file) => {
            // Required by the flags without --url.
            let prefix = args.prefix.clone().context("--prefix is required")?;
            let compared = match file {
                Some(path) => Some(file_state(path, &prefix).await?),
                None => None,
            };
            (prefix, compared)
        }
    };
    let config = args.access.client_config(args.endpoints.clone())?;
    let client = Client::connect(config)
        .await
        .with_context(|| format!("connecting to etcd at {}", args.endpoints.join(",")))?;

    let (origin, revision, ours) = match compared {
        Some(compared) => compared,
        None => {
            let (revision, side) = mirror_state(&client, &prefix, args).await?;
            (Origin::Mirror, revision, side)
        }
    };
    let range = KeyRange::prefix(prefix.as_bytes());
    let etcd = match range_at(&client, &range, revision, args.page_size).await {
        Ok(kvs) => EtcdSide::of(kvs).context("etcd's range is not in key order")?,
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
                Origin::Serve => {
                    "serve's mirror is that far behind: check that serve follows this etcd \
                     (GET /v1/status), then run verify again"
                }
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
                "reading prefix {prefix:?} from etcd at revision {revision}"
            )));
        }
    };
    Ok(compare(origin, revision, &ours, &etcd))
}

/// The snapshot file's state of `prefix`, at its revision.
async fn file_state(path: &Path, prefix: &str) -> anyhow::Result<(Origin, i64, Side)> {
    let (path, owned) = (path.to_owned(), prefix.as_bytes().to_vec());
    let read = tokio::task::spawn_blocking(move || SnapshotFile::read(&path, &owned))
        .await
        .context("reading the snapshot file")?;
    // Its message already names the cause; its source would repeat it.
    let file = read.map_err(|e| {
        anyhow::anyhow!("cannot verify the snapshot file of prefix {prefix:?}: {e}")
    })?;
    Ok((Origin::SnapshotFile, file.revision, Side::of(&file.kvs)?))
}

/// Starts a mirror of the prefix, waits until it is ready and has etcd's current
/// revision, and returns its state then.
async fn mirror_state(
    client: &Client,
    prefix: &str,
    args: &VerifyArgs,
) -> anyhow::Result<(i64, Side)> {
    let config = MirrorConfig::default().with_page_size(args.page_size);
    let mirror = Mirror::builder(prefix.as_bytes())
        .config(config)
        .start(ClientSource::new(client.clone()))
        .await
        .context("starting the mirror")?;
    mirror
        .wait_ready()
        .await
        .with_context(|| format!("mirroring prefix {prefix:?}"))?;
    let snapshot = mirror
        .consistent_snapshot(args.timeout)
        .await
        .context("waiting for the mirror to reach etcd's current revision")?;
    // Without a snapshot file there is nothing to write: the outcome is moot.
    let _ = mirror.shutdown().await;
    let keys = snapshot
        .iter()
        .map(|(key, e)| KeyDigest::of(DigestEntry::of_snapshot_entry(key, e)))
        .collect();
    // The library's own digest of the snapshot, not one recomputed from the copy.
    let side = Side {
        keys,
        digest: snapshot.digest().to_string(),
    };
    Ok((snapshot.revision(), side))
}

/// The state of serve's mirror: its prefix, revision and keys.
async fn serve_state(url: &str, args: &VerifyArgs) -> anyhow::Result<(String, i64, Side)> {
    let token = read_token(args.token_file.as_deref())?;
    let body = fetch_mirror_digest(url, token.as_deref()).await?;
    if let Some(prefix) = &args.prefix {
        anyhow::ensure!(
            *prefix == body.prefix,
            "serve at {url} mirrors prefix {:?}, not {prefix:?} (--prefix)",
            body.prefix
        );
    }
    let (prefix, revision) = (body.prefix.clone(), body.revision);
    let side = Side::served(body).with_context(|| format!("serve at {url}"))?;
    Ok((prefix, revision, side))
}

/// An error answer of serve.
#[derive(Deserialize)]
struct ServeError {
    error: String,
    detail: String,
}

/// `GET URL/v1/mirror/digest?keys=true`, with `token` as the bearer token.
async fn fetch_mirror_digest(url: &str, token: Option<&str>) -> anyhow::Result<MirrorDigest> {
    let base: Uri = url
        .parse()
        .with_context(|| format!("--url {url:?} is not a URL"))?;
    anyhow::ensure!(
        base.scheme_str() == Some("http"),
        "--url {url:?}: serve answers plain HTTP, give an http:// URL"
    );
    let authority = base
        .authority()
        .with_context(|| format!("--url {url:?} has no host"))?;
    let path = format!(
        "{}/v1/mirror/digest?keys=true",
        base.path().trim_end_matches('/')
    );
    let address = (authority.host(), authority.port_u16().unwrap_or(80));
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to serve at {url}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("connecting to serve at {url}"))?;
    // Drives the connection; it ends when the answer is read and `sender` dropped.
    let connection = tokio::spawn(connection);
    let mut request = hyper::Request::get(path).header(header::HOST, authority.as_str());
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let asked = async {
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new())?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    let answer = asked.await;
    drop(sender);
    connection.abort();
    let (status, body) = answer.with_context(|| format!("asking serve at {url}"))?;
    if status != StatusCode::OK {
        let why = match serde_json::from_slice::<ServeError>(&body) {
            Ok(e) => format!("{}: {}", e.error, e.detail),
            Err(_) => String::from_utf8_lossy(&body).into_owned(),
        };
        let hint = if status == StatusCode::UNAUTHORIZED {
            " (give serve's token with --token-file or REVWATCH_TOKEN)"
        } else {
            ""
        };
        anyhow::bail!("serve at {url} answered {status}: {why}{hint}");
    }
    serde_json::from_slice(&body).with_context(|| {
        format!("serve at {url} did not answer with its mirror's digest (GET /v1/mirror/digest)")
    })
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
        Side::of(kvs).unwrap()
    }

    fn etcd(kvs: &[KeyValue]) -> EtcdSide {
        EtcdSide::of(kvs.to_vec()).unwrap()
    }

    #[test]
    fn equal_states_match_with_their_digest() {
        let state = [kv("p/a", "1", 2), kv("p/b", "2", 3)];
        let verdict = compare(Origin::Mirror, 9, &side(&state), &etcd(&state));
        let digest = side(&state).digest;
        assert!(verdict.is_match());
        assert_eq!(
            verdict.to_text(20),
            format!("match at revision 9: 2 keys, digest {digest}\n")
        );
        assert_eq!(
            verdict.to_json(20),
            json!({"result": "match", "source": "mirror", "revision": 9, "keys": 2,
                   "digest": digest})
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
        let theirs = [
            kv("p/a", "1", 2),
            changed,
            kv("p/d", "4", 6),
            kv("p/e", "5", 6),
        ];
        let verdict = compare(Origin::SnapshotFile, 6, &side(&ours), &etcd(&theirs));
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
        let verdict = compare(Origin::Mirror, 3, &side(&ours), &etcd(&[]));
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
        let unordered = [kv("p/b", "", 2), kv("p/a", "", 3)];
        assert!(Side::of(&unordered).is_err());
        assert!(EtcdSide::of(unordered.to_vec()).is_err());
    }

    #[test]
    fn a_value_is_compared_by_its_size_and_the_keys_digest() {
        let ours = KeyDigest::of((&kv("p/a", "one", 4)).into());
        assert!(ours.has_value(b"one"));
        // The same size, another value; and a value of another size.
        assert!(!ours.has_value(b"two"));
        assert!(!ours.has_value(b"on"));
        // With other revisions in etcd, the value alone is still told apart.
        let (same, other) = (kv("p/a", "one", 9), kv("p/a", "uno", 9));
        let fields =
            |e: &KeyValue| -> Vec<&str> { field_diffs(&ours, e).iter().map(|d| d.field).collect() };
        assert_eq!(fields(&same), ["mod_revision"]);
        assert_eq!(fields(&other), ["value", "mod_revision"]);
    }

    #[test]
    fn serves_description_is_checked() {
        let kvs = [kv("p/a", "1", 2), kv("p/b", "2", 3)];
        let good = || -> MirrorDigest {
            let entries = kvs.iter().map(|kv| KeyDigest::of(kv.into())).collect();
            MirrorDigest {
                prefix: "p/".into(),
                revision: 3,
                state: "ready".into(),
                keys: 2,
                digest: digest_of(&kvs).unwrap(),
                entries: Some(entries),
            }
        };
        let served = Side::served(good()).unwrap();
        assert!(compare(Origin::Serve, 3, &served, &etcd(&kvs)).is_match());

        let mut reversed = good();
        if let Some(e) = reversed.entries.as_mut() {
            e.reverse();
        }
        let mut miscounted = good();
        miscounted.keys = 3;
        let mut bad_digest = good();
        if let Some(e) = bad_digest.entries.as_mut() {
            e[0].digest = "00".into();
        }
        let mut no_keys = good();
        no_keys.entries = None;
        for bad in [reversed, miscounted, bad_digest, no_keys] {
            assert!(Side::served(bad).is_err());
        }
    }
}
