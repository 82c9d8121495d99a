//! `revwatch policy show`: the active tree in etcd and its revision.

use clap::Args;
use revwatch_policy::publish::read_active_tree;

use super::EtcdTarget;

/// Print the active policy set's files and the revision it was read at.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    target: EtcdTarget,
}

pub async fn run(args: ShowArgs) -> anyhow::Result<()> {
    let client = args.target.connect().await?;
    let tree = read_active_tree(&client, args.target.prefix.as_bytes()).await?;
    let mode = match &tree.generation {
        Some(generation) => format!("generation {generation}"),
        None => "direct mode".to_owned(),
    };
    println!(
        "{}: {} files at revision {} ({mode})",
        args.target.prefix,
        tree.len(),
        tree.revision
    );
    for (path, file) in &tree.files {
        println!(
            "  {path}  {} bytes, written at revision {}",
            file.value.len(),
            file.mod_revision
        );
    }
    for stray in &tree.stray {
        eprintln!(
            "warning: {}{stray} is ignored (not in the active generation)",
            args.target.prefix
        );
    }
    Ok(())
}
