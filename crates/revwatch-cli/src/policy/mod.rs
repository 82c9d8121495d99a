//! `revwatch policy`: check, publish, inspect and replay the policy trees kept in
//! etcd (see the layout and publish docs of the policy crate).

mod check;
mod diff;
mod explain;
mod push;
mod show;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use revwatch::client::Client;

use crate::{connect::EtcdAccessArgs, serve::BackendArg};

/// Check, publish, show, diff and replay policy trees.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    Check(check::CheckArgs),
    Push(push::PushArgs),
    Show(show::ShowArgs),
    Diff(diff::DiffArgs),
    Explain(explain::ExplainArgs),
}

pub async fn run(args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Check(args) => check::run(args),
        PolicyCommand::Push(args) => push::run(args).await,
        PolicyCommand::Show(args) => show::run(args).await,
        PolicyCommand::Diff(args) => diff::run(args).await,
        PolicyCommand::Explain(args) => explain::run(args).await,
    }
}

/// Where the policy tree lives: etcd endpoints, access flags and the prefix.
#[derive(Debug, Args)]
struct EtcdTarget {
    /// etcd endpoints, comma-separated. The default is where `revwatch serve`
    /// starts the embedded server.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    endpoints: Vec<String>,
    /// The key prefix holding the policy files (as given to `revwatch serve`).
    #[arg(long, default_value = "/revwatch/policies/")]
    prefix: String,
    #[command(flatten)]
    access: EtcdAccessArgs,
}

impl EtcdTarget {
    async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.access.client_config(self.endpoints.clone())?;
        Client::connect(config)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoints.join(",")))
    }
}

/// The flag's name of a backend (`cedar`, `casbin`).
fn backend_name(backend: BackendArg) -> String {
    backend
        .to_possible_value()
        .map_or_else(|| format!("{backend:?}"), |v| v.get_name().to_owned())
}
