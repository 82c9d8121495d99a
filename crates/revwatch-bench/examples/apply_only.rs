// TEMPORARY: measure the apply suite alone. Not to be kept.
#[path = "../src/suites/mirror/apply.rs"]
#[allow(dead_code)]
mod apply;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// CPU ns of the last thread named mirror-apply seen, sampled every 0.5 ms.
fn monitor(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::spawn(move || {
        let mut done = Vec::new();
        let mut cur: Option<(String, u64)> = None;
        while !stop.load(Ordering::Relaxed) {
            let mut found = None;
            for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
                let p = t.path();
                if std::fs::read_to_string(p.join("comm"))
                    .map(|c| c.trim() == "mirror-apply")
                    .unwrap_or(false)
                {
                    if let Ok(s) = std::fs::read_to_string(p.join("schedstat")) {
                        let ns: u64 = s.split_whitespace().next().unwrap().parse().unwrap();
                        found = Some((p.display().to_string(), ns));
                    }
                }
            }
            match (&cur, found) {
                (Some((pc, _)), Some((pf, ns))) if *pc == pf => cur = Some((pf, ns)),
                (Some((_, ns)), f) => {
                    done.push(*ns);
                    cur = f;
                }
                (None, f) => cur = f,
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        if let Some((_, ns)) = cur {
            done.push(ns);
        }
        done
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let events: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |s| s.parse().unwrap());
    let rounds: usize = std::env::args().nth(2).map_or(5, |s| s.parse().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let m = monitor(stop.clone());
    let mut v = Vec::new();
    for _ in 0..rounds {
        let r = apply::mirror_events_per_s(events).await?;
        v.push(r);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let cpu = m.join().unwrap();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "wall median {:.0} all {:?}",
        v[v.len() / 2],
        v.iter().map(|x| *x as u64).collect::<Vec<_>>()
    );
    println!(
        "thread cpu ms {:?}",
        cpu.iter().map(|ns| ns / 1_000_000).collect::<Vec<_>>()
    );
    Ok(())
}
