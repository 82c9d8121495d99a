//! Spawning children that die with the test process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and
//! tokio's worker threads come and go. So every child is forked from one
//! dedicated thread that lives as long as the process. If the test process is
//! killed outright (no destructors run), the kernel then kills its etcd
//! children too; normal cleanup is still the cluster's `Drop`.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::sync::mpsc;

use nix::sys::signal::Signal;

struct SpawnRequest {
    command: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// `None` if the spawner thread could not be started; we then spawn directly,
/// without the death signal.
static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();

fn spawner() -> Option<&'static mpsc::Sender<SpawnRequest>> {
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("testkit-spawner".into())
                .spawn(move || {
                    // Runs until the process exits: the sender lives in a static.
                    for mut req in rx {
                        tie_to_parent(&mut req.command);
                        let _ = req.reply.send(req.command.spawn());
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

fn tie_to_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing
    // on the success path.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before prctl took effect.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
}

/// Spawns `command` so that the child is SIGKILLed when this process dies.
pub(crate) fn spawn_tied(command: Command) -> io::Result<Child> {
    let Some(tx) = spawner() else {
        let mut command = command;
        return command.spawn();
    };
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    tx.send(SpawnRequest {
        command,
        reply: reply_tx,
    })
    .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("spawner thread is gone"))?
}
