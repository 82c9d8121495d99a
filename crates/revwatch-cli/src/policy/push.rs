//! `revwatch policy push`: check a directory tree, then publish it atomically.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use revwatch_policy::publish::{Expect, PublishError, publish, read_active_tree};

use super::{EtcdTarget, check::checked_tree};
use crate::serve::BackendArg;

/// Check a directory tree, then make it the active policy set in one etcd revision.
///
/// Refuses an invalid tree. Without --expect-revision, the push fails if another
/// publish (or an edit of the active tree) lands while it runs; with it, it fails
/// if the active tree changed at all after that revision (e.g. the one `policy
/// show` printed). Prints the new revision and generation.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The directory holding the policy files (hidden files are skipped).
    pub dir: PathBuf,
    #[command(flatten)]
    target: EtcdTarget,
    /// The policy engine that must accept the tree.
    #[arg(long, value_enum, default_value_t = BackendArg::Cedar)]
    pub backend: BackendArg,
    /// Publish only if the active tree is unchanged since this revision.
    #[arg(long, value_name = "R")]
    pub expect_revision: Option<i64>,
}

pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    let tree = checked_tree(&args.dir, args.backend).context("refusing to push")?;
    let client = args.target.connect().await?;
    let prefix = args.target.prefix.as_bytes();
    let expect = args
        .expect_revision
        .map_or(Expect::Current, Expect::Revision);
    match publish(&client, prefix, &tree, expect).await {
        Ok(published) => {
            println!(
                "published {} files under {} at revision {} (generation {})",
                tree.len(),
                args.target.prefix,
                published.revision,
                published.generation
            );
            Ok(())
        }
        Err(PublishError::Conflict {
            expected,
            actual,
            key,
        }) => {
            // Who won: the active tree as it is now.
            let now = match read_active_tree(&client, prefix).await {
                Ok(tree) => match &tree.generation {
                    Some(generation) => format!(
                        "the active tree is now generation {generation} (read at revision {})",
                        tree.revision
                    ),
                    None => format!(
                        "the active tree is now edited in place (read at revision {})",
                        tree.revision
                    ),
                },
                Err(e) => format!("reading the active tree failed: {e}"),
            };
            anyhow::bail!(
                "refused: someone else changed the policy set first: {key} was written at \
                 revision {actual}, after the expected revision {expected}; {now}. Nothing was \
                 published. Review with `revwatch policy diff`, then push again with \
                 --expect-revision {actual} or later"
            )
        }
        Err(e @ PublishError::ExpectCompacted { .. }) => Err(anyhow::Error::new(e).context(
            "refused: the expected revision is compacted; read the active revision with \
             `revwatch policy show` and push again with it",
        )),
        Err(e) => Err(anyhow::Error::new(e).context("publishing failed; nothing was published")),
    }
}
