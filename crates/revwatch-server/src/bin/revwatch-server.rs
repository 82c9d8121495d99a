//! Standalone embedded server: `revwatch-server [--data-dir DIR] [--listen ADDR]
//! [--checkpoint-interval-ms N] [--auto-compaction-mode periodic|revision]
//! [--auto-compaction-retention VALUE]`, the flags of `revwatch etcd` (see
//! [`revwatch_server::standalone`]).
//!
//! Prints `listening on ADDR` once it accepts connections, and stops on Ctrl-C or SIGTERM.

use std::process::ExitCode;

/// The allocator `revwatch etcd` uses (see the README's Benchmarks).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    revwatch_server::standalone::main(std::env::args().skip(1)).await
}
