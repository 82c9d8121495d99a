//! `revwatch policy diff`: a directory tree against the active tree in etcd.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use revwatch_policy::{
    layout::{Tree, diff},
    publish::read_active_tree,
};

use super::EtcdTarget;

/// List the files a push of DIR would add (+), change (~) and remove (-).
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The directory holding the policy files (hidden files are skipped).
    pub dir: PathBuf,
    #[command(flatten)]
    target: EtcdTarget,
}

pub async fn run(args: DiffArgs) -> anyhow::Result<()> {
    let local =
        Tree::from_dir(&args.dir).with_context(|| format!("reading {}", args.dir.display()))?;
    let client = args.target.connect().await?;
    let active = read_active_tree(&client, args.target.prefix.as_bytes()).await?;
    let changes = diff(&active, &local);
    let (added, changed, removed) = (changes.added, changes.changed, changes.removed);
    for (mark, paths) in [("+", &added), ("~", &changed), ("-", &removed)] {
        for path in paths {
            println!("{mark} {path}");
        }
    }
    println!(
        "{} added, {} changed, {} removed against {} at revision {}",
        added.len(),
        changed.len(),
        removed.len(),
        args.target.prefix,
        active.revision
    );
    Ok(())
}
