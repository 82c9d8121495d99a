//! `revwatch policy explain`: replays a decision against the policy set as it was
//! at an etcd revision (the revision every decision and decision-log line carries).

use std::io::Read;

use anyhow::Context;
use clap::Args;
use etcd_proto::key_range::KeyRange;
use revwatch_policy::{
    Backend, Limits,
    engine::decide_contained,
    publish::{PublishError, read_tree_at},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{EtcdTarget, backend_name};
use crate::connect::compacted_at;
use crate::serve::{
    BackendArg,
    api::{AuthorizeRequest, Question, effect_name},
};

/// Decide REQUEST with the policy set as it was at revision R.
///
/// REQUEST is the JSON body of POST /v1/authorize, or a line of the decision
/// log (its `input`, and its `revision` unless --revision is given); `-` reads it
/// from stdin. etcd keeps old revisions until compaction: a compacted revision
/// is an error naming the oldest one left.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The revision to decide at (default: the decision-log line's).
    #[arg(long, value_name = "R")]
    pub revision: Option<i64>,
    #[command(flatten)]
    target: EtcdTarget,
    /// The policy engine.
    #[arg(long, value_enum, default_value_t = BackendArg::Cedar)]
    pub backend: BackendArg,
    /// The request as JSON, or `-` for stdin.
    #[arg(value_name = "REQUEST_JSON")]
    pub request: String,
}

pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let text = if args.request == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the request from stdin")?;
        text
    } else {
        args.request.clone()
    };
    let (question, logged_revision) = parse_request(&text)?;
    let revision = args.revision.or(logged_revision).context(
        "--revision is required (the request is not a decision-log line with a revision)",
    )?;
    anyhow::ensure!(revision > 0, "--revision must be positive, got {revision}");
    let request = question
        .to_request()
        .map_err(|e| anyhow::anyhow!("invalid request: {}", e.detail))?;

    let client = args.target.connect().await?;
    let prefix = args.target.prefix.as_bytes();
    let tree = match read_tree_at(&client, prefix, revision).await {
        Ok(tree) => tree,
        Err(PublishError::Etcd(e)) if e.is_compacted() => {
            let oldest = match compacted_at(&client, &KeyRange::prefix(prefix), revision).await {
                Some(c) => format!("the oldest available is {c}"),
                None => "etcd did not say which is the oldest available".to_owned(),
            };
            anyhow::bail!("revision {revision} has been compacted; {oldest}");
        }
        Err(PublishError::Etcd(e)) if e.is_future_revision() => {
            anyhow::bail!("revision {revision} is in the future: etcd has not reached it yet")
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading the policy set under {} at revision {revision}",
                args.target.prefix
            )));
        }
    };
    anyhow::ensure!(
        !tree.is_empty(),
        "there was no policy set under {} at revision {revision}",
        args.target.prefix
    );
    let engine = Backend::from(args.backend)
        .compiler(Limits::default())
        .compile(&tree, &args.target.prefix)
        .map_err(|rejection| {
            anyhow::anyhow!(
                "the {} policy set at revision {revision} does not compile, so the sidecar \
                 kept an older set: {rejection}",
                backend_name(args.backend)
            )
        })?;
    let verdict = decide_contained(&*engine, &request)
        .map_err(|e| anyhow::anyhow!("the request cannot be decided: {e}"))?;
    let effect = if verdict.allowed {
        revwatch_policy::Effect::Allow
    } else {
        revwatch_policy::Effect::Deny
    };
    let mut out = json!({
        "decision": effect_name(effect),
        "policy_ids": verdict.policy_ids,
        "revision": revision,
        "backend": backend_name(args.backend),
        "input": question,
    });
    if !verdict.errors.is_empty() {
        out["errors"] = json!(verdict.errors);
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The question, and the revision when `text` is a decision-log line.
fn parse_request(text: &str) -> anyhow::Result<(Question, Option<i64>)> {
    let value: Value = serde_json::from_str(text).context("REQUEST_JSON is not valid JSON")?;
    if let Some(input) = value.get("input") {
        let question = Question::deserialize(input)
            .context("the decision-log line's `input` is not a request")?;
        return Ok((question, value.get("revision").and_then(Value::as_i64)));
    }
    let request = AuthorizeRequest::deserialize(&value)
        .context("REQUEST_JSON is neither a /v1/authorize body nor a decision-log line")?;
    // Consistency asks for a fresh set; a replay names its revision instead.
    let (question, _consistency) = request.split();
    Ok((question, None))
}
