//! The proof's entry points: `soak` repeats seeded runs under faults for a
//! while and sums them up; `replay` reruns one seed alone. Runs that test
//! the embedded server start this same program as `embedded-server`, a child
//! process they can kill, freeze and restart.
//!
//! ```text
//! cargo run --release -p revwatch-proof -- soak --minutes 20 --seed 1 --json soak.json
//! cargo run --release -p revwatch-proof -- replay --seed 17
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use revwatch_proof::run::{self, RunConfig, RunReport, SoakSummary};
use revwatch_testkit::etcd::EmbeddedServer;
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "Fault-injection soak and replay for the revwatch mirror")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs seeds S, S+1, ... until the time is up, then prints the summary.
    Soak {
        /// Minutes to run (a run in progress is finished).
        #[arg(long, default_value_t = 20)]
        minutes: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds of faults and writes per run.
        #[arg(long, default_value_t = 45)]
        run_secs: u64,
        /// Also write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Reruns one soak seed alone.
    Replay {
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Seconds of faults and writes (as in the soak that failed).
        #[arg(long, default_value_t = 45)]
        run_secs: u64,
    },
    /// Runs the embedded server, as `revwatch-server` does (the server under
    /// test of the runs that draw it).
    #[command(hide = true)]
    EmbeddedServer {
        /// `revwatch-server`'s arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// How runs start the embedded server: this program, as `embedded-server`.
fn embedded_server() -> Result<EmbeddedServer, String> {
    let program = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    Ok(EmbeddedServer {
        program,
        args: vec!["embedded-server".into()],
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let embedded = || embedded_server().inspect_err(|e| eprintln!("{e}")).ok();
    match cli.command {
        Command::EmbeddedServer { args } => {
            runtime.block_on(revwatch_server::standalone::main(args))
        }
        Command::Soak {
            minutes,
            seed,
            run_secs,
            json,
        } => {
            let Some(embedded) = embedded() else {
                return ExitCode::FAILURE;
            };
            let run_length = Duration::from_secs(run_secs);
            runtime.block_on(soak(minutes, seed, run_length, json, &embedded))
        }
        Command::Replay { seed, run_secs } => {
            let Some(embedded) = embedded() else {
                return ExitCode::FAILURE;
            };
            let run_length = Duration::from_secs(run_secs);
            runtime.block_on(replay(RunConfig::for_soak(seed, run_length, &embedded)))
        }
    }
}

async fn soak(
    minutes: u64,
    first: u64,
    run_length: Duration,
    json: Option<PathBuf>,
    embedded: &EmbeddedServer,
) -> ExitCode {
    // `None`: longer than the clock can count, so until interrupted.
    let deadline = Instant::now().checked_add(Duration::from_secs(minutes.saturating_mul(60)));
    let mut summary = SoakSummary::default();
    let mut seed = first;
    while deadline.is_none_or(|d| Instant::now() < d) {
        let config = RunConfig::for_soak(seed, run_length, embedded);
        match run::run(&config).await {
            Ok(report) => {
                println!("{}", run_line(&report));
                summary.add(&report);
            }
            Err(failure) => {
                println!("seed {seed}: FAILED\n{failure}");
                summary.add_failure(&failure);
            }
        }
        seed += 1;
    }
    println!("\nsoak: {minutes} min from seed {first}\n{summary}");
    if let Some(path) = json {
        let written = serde_json::to_string_pretty(&summary)
            .map_err(|e| e.to_string())
            .and_then(|s| std::fs::write(&path, s).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if summary.violations == 0 && summary.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn replay(config: RunConfig) -> ExitCode {
    println!("{}", config.schedule());
    match run::run(&config).await {
        Ok(report) => {
            println!("{}", run_line(&report));
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("{failure}");
            ExitCode::FAILURE
        }
    }
}

fn run_line(r: &RunReport) -> String {
    let c = &r.config;
    format!(
        "seed {}: ok · {} · {} faults · {} writes ({} acknowledged) · last revision {} · {} revisions checked · relists {:?} ({} compactions in truth) · {:.1}s",
        c.seed,
        c.topology(),
        r.faults.len(),
        r.writes,
        r.acked_writes,
        r.last_revision,
        r.checks.first().map_or(0, |s| s.revisions_checked),
        r.relists,
        r.compactions,
        r.elapsed.as_secs_f64()
    )
}
