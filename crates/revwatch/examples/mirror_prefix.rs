//! The README's library example: mirrors an etcd key prefix, prints its size, then
//! every batch of changes until Ctrl-C.
//!
//! `cargo run -p revwatch --example mirror_prefix -- [ENDPOINT] [PREFIX]`
//! (by default `http://127.0.0.1:2379` and `config/`).

use revwatch::client::ClientConfig;
use revwatch::mirror::{ClientSource, Mirror, Update};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or("http://127.0.0.1:2379".into());
    let prefix = args.next().unwrap_or("config/".into());

    let source = ClientSource::lazy(ClientConfig::new([endpoint]))?;
    let mirror = Mirror::builder(prefix).start(source).await?;
    mirror.wait_ready().await?;
    // Lock-free reads of etcd's exact state at one revision.
    let snap = mirror.snapshot();
    println!("{} keys at revision {}", snap.len(), snap.revision());
    // The current snapshot first, then every batch: ordered, atomic, gap-free.
    let mut sub = mirror.subscribe();
    let follow = async {
        while let Some(update) = sub.recv().await {
            if let Update::Batch(b) = update {
                println!("revision {}: {} changes", b.revision, b.changes.len());
            }
        }
    };
    tokio::select! {
        () = follow => {}
        stop = tokio::signal::ctrl_c() => stop?,
    }
    mirror.shutdown().await?;
    Ok(())
}
