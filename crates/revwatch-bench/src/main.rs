//! revwatch's bench binary. Every suite runs a baseline and revwatch side by side in one
//! run, on the same machine and the same etcd, and reports medians and ratios
//! (`ours / baseline`), because this machine is too noisy for absolute numbers.
//!
//! ```text
//! cargo run --release -p revwatch-bench -- <suite> [--quick] [--json PATH]
//! ```

mod report;
mod stats;
mod suites;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// The allocator of the `revwatch` binary, for the embedded server this binary runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Suite {
    /// Put/range latency of revwatch's client against the etcd-client crate.
    Client,
    /// The embedded server against etcd: put throughput, watch latency, memory.
    Server,
    /// The mirror against a raw watch, a naive snapshotting map and a raw list.
    Mirror,
    /// Indexed Cedar and casbin decisions against the plain engines, and the indexes'
    /// differential proof.
    Policy,
    /// `revwatch serve`'s HTTP decisions per second against a trivial axum handler and
    /// plain Cedar behind the same HTTP stack.
    Sidecar,
}

#[derive(Debug, Parser)]
#[command(
    name = "revwatch-bench",
    about = "Benchmarks with a baseline in the same run"
)]
struct Args {
    /// Which suite to run.
    suite: Suite,
    /// Keep the suite under about two minutes.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The `server` suite runs the embedded server as a child of this very binary.
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(suites::embedded::SERVE_ARG) {
        let (Some(dir), Some(addr)) = (raw.get(2), raw.get(3)) else {
            anyhow::bail!("usage: {} DATA_DIR ADDR", suites::embedded::SERVE_ARG);
        };
        return suites::embedded::serve(dir.into(), addr.parse()?).await;
    }
    // The `mirror` suite measures each relist in a child of this very binary.
    if raw.get(1).map(String::as_str) == Some(suites::mirror::CHILD_ARG) {
        return suites::mirror::child_main(&raw[2..]).await;
    }
    // The `sidecar` suite runs its baseline HTTP servers as children of this binary.
    if raw.get(1).map(String::as_str) == Some(suites::sidecar::CHILD_ARG) {
        return suites::sidecar::child_main(&raw[2..]).await;
    }

    let args = Args::parse();
    let report = match args.suite {
        Suite::Client => suites::client::run(args.quick).await?,
        Suite::Server => suites::server::run(args.quick).await?,
        Suite::Mirror => suites::mirror::run(args.quick).await?,
        Suite::Policy => suites::policy::run(args.quick).await?,
        Suite::Sidecar => suites::sidecar::run(args.quick).await?,
    };
    report.print();
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    Ok(())
}
