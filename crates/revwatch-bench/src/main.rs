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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Suite {
    /// Put/range latency of revwatch's client against the etcd-client crate.
    Client,
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
    let args = Args::parse();
    let report = match args.suite {
        Suite::Client => suites::client::run(args.quick).await?,
    };
    report.print();
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    Ok(())
}
