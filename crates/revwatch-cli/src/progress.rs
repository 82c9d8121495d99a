//! A progress bar on stderr for long lists of the prefix (the first one, or a
//! relist after compaction), drawn from the mirror's status while it reports a
//! list in progress.
//!
//! Drawn only when stderr is a terminal that can take one (not `TERM=dumb`), and
//! only once the list has run for [`DELAY`]: short lists draw nothing. Without
//! colour under `NO_COLOR`. Anything else printed on stderr while a bar is drawn
//! goes through [`suspend`] (the log writer [`StderrWriter`] does), which hides
//! the bar for the time of the write, so no line is overdrawn.

use std::convert::Infallible;
use std::ffi::OsString;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use revwatch::mirror::{ListProgress, Status};
use tokio::sync::watch;

/// How long a list runs before its bar is drawn.
pub const DELAY: Duration = Duration::from_secs(1);

/// The bar on screen, if any: one per process, shared with [`suspend`].
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn bar_slot() -> MutexGuard<'static, Option<ProgressBar>> {
    // A panic while drawing leaves nothing half-done that matters here.
    BAR.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` (which prints on stderr) with the bar, if one is drawn, hidden.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let slot = bar_slot();
    match slot.as_ref() {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}

/// Log output on stderr that hides the bar while it writes: for
/// `tracing_subscriber`'s `with_writer(|| StderrWriter)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A whole event is written at once: one suspension per log line.
        suspend(|| std::io::stderr().lock().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// How the bar looks, if it may be drawn at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    Colour,
    Plain,
}

/// Whether and how to draw: only on a terminal, not on a dumb one; without
/// colour when `NO_COLOR` is set to anything but the empty string (no-color.org).
fn look(terminal: bool, term: Option<OsString>, no_color: Option<OsString>) -> Option<Look> {
    if !terminal || term.is_some_and(|t| t == "dumb") {
        return None;
    }
    Some(match no_color {
        Some(v) if !v.is_empty() => Look::Plain,
        _ => Look::Colour,
    })
}

/// What to do about the bar given the list in progress (if any), the list the
/// drawn bar shows (if any) and the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Remove the bar (no list, or another one).
    Clear,
    /// Draw nothing yet: look again after this long (or at the next page).
    Wait(Duration),
    /// Draw a bar for the list.
    Draw,
    /// Update the drawn bar.
    Update,
}

/// A list is known by when it began and the revision it reads at.
type ListId = (SystemTime, i64);

fn id(l: &ListProgress) -> ListId {
    (l.started_at, l.revision)
}

fn step(listing: Option<&ListProgress>, drawn: Option<ListId>, now: SystemTime) -> Step {
    match (listing, drawn) {
        (None, None) => Step::Wait(Duration::MAX),
        (None, Some(_)) => Step::Clear,
        (Some(l), Some(d)) if id(l) == d => Step::Update,
        (Some(_), Some(_)) => Step::Clear,
        (Some(l), None) => {
            let ran = now.duration_since(l.started_at).unwrap_or_default();
            match DELAY.checked_sub(ran) {
                Some(left) if !left.is_zero() => Step::Wait(left),
                _ => Step::Draw,
            }
        }
    }
}

/// Keys per second since the list began, and the time left at that rate.
fn rate_and_eta(l: &ListProgress, now: SystemTime) -> (f64, Option<Duration>) {
    let ran = now
        .duration_since(l.started_at)
        .unwrap_or_default()
        .as_secs_f64();
    if ran <= 0.0 || l.keys_listed == 0 {
        return (0.0, None);
    }
    let rate = l.keys_listed as f64 / ran;
    let left = l.total.saturating_sub(l.keys_listed) as f64;
    (rate, Some(Duration::from_secs_f64(left / rate)))
}

/// The text after the bar: the rate and the time left.
fn message(l: &ListProgress, now: SystemTime) -> String {
    match rate_and_eta(l, now) {
        (rate, Some(eta)) => format!("{rate:.0}/s, ETA {}s", eta.as_secs()),
        _ => "starting".to_owned(),
    }
}

/// The text before the bar: what is listed, at which revision.
fn prefix(l: &ListProgress) -> String {
    let why = match l.reason.as_str() {
        "initial_list" => String::new(),
        other => format!(" ({other})"),
    };
    format!("revwatch: listing{why} at revision {}", l.revision)
}

fn new_bar(l: &ListProgress, look: Look, now: SystemTime) -> ProgressBar {
    let template = match look {
        // The bar takes what the text leaves of the line: an 80-column terminal
        // still shows it all.
        Look::Colour => "{prefix} [{wide_bar:.cyan/blue}] {human_pos}/{human_len} keys, {msg}",
        Look::Plain => "{prefix} [{wide_bar}] {human_pos}/{human_len} keys, {msg}",
    };
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    // Never fewer than listed: a total that ran short still draws a full bar.
    let bar = ProgressBar::with_draw_target(
        Some(l.total.max(l.keys_listed)),
        ProgressDrawTarget::stderr(),
    )
    .with_style(style)
    .with_prefix(prefix(l))
    .with_position(l.keys_listed)
    .with_message(message(l, now));
    bar.tick();
    bar
}

fn update(bar: &ProgressBar, l: &ListProgress, now: SystemTime) {
    if l.keys_listed > l.total {
        bar.set_length(l.keys_listed);
    }
    bar.set_position(l.keys_listed);
    bar.set_message(message(l, now));
}

/// The drawn bar: cleared when dropped, so a bar never outlives what it shows.
struct Drawn {
    list: Option<ListId>,
}

impl Drawn {
    fn clear(&mut self) {
        if self.list.take().is_some()
            && let Some(bar) = bar_slot().take()
        {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Drawn {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Draws the bar of each long list `status` reports; never returns (it waits
/// forever once the mirror is gone).
async fn follow(mut status: watch::Receiver<Status>, look: Look) -> Infallible {
    let mut drawn = Drawn { list: None };
    let mut open = true;
    loop {
        let listing = status.borrow_and_update().listing;
        let now = SystemTime::now();
        let mut wait = Duration::MAX;
        match step(listing.as_ref(), drawn.list, now) {
            Step::Clear => {
                drawn.clear();
                // Another list may already be running: look again at once.
                continue;
            }
            Step::Wait(left) => wait = left,
            Step::Draw => {
                if let Some(l) = &listing {
                    // Drawn under the lock, so `suspend` never misses it.
                    let mut slot = bar_slot();
                    *slot = Some(new_bar(l, look, now));
                    drawn.list = Some(id(l));
                }
            }
            Step::Update => {
                if let (Some(l), Some(bar)) = (&listing, bar_slot().as_ref()) {
                    update(bar, l, now);
                }
            }
        }
        let timer = (wait != Duration::MAX).then(|| Instant::now() + wait);
        tokio::select! {
            changed = status.changed(), if open => {
                if changed.is_err() {
                    open = false;
                    drawn.clear();
                }
            }
            () = sleep_until_some(timer) => {}
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs `work`, showing on stderr the progress of the long lists that `status`
/// (a mirror's [`status_changes`](revwatch::mirror::Mirror::status_changes))
/// reports meanwhile; the bar is gone when this returns or is dropped.
pub async fn while_running<F: Future>(status: watch::Receiver<Status>, work: F) -> F::Output {
    let terminal = std::io::stderr().is_terminal();
    let Some(look) = look(
        terminal,
        std::env::var_os("TERM"),
        std::env::var_os("NO_COLOR"),
    ) else {
        return work.await;
    };
    tokio::select! {
        out = work => out,
        never = follow(status, look) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use revwatch::mirror::ResyncReason;

    fn list(started_at: SystemTime, keys_listed: u64, total: u64) -> ListProgress {
        let mut l = ListProgress::new(ResyncReason::Compacted, 7, total, started_at);
        l.keys_listed = keys_listed;
        l
    }

    #[test]
    fn only_a_terminal_that_is_not_dumb_gets_a_bar_and_no_color_drops_the_colour() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(look(false, os("xterm"), None), None);
        assert_eq!(look(true, os("dumb"), None), None);
        assert_eq!(look(true, os("xterm"), None), Some(Look::Colour));
        assert_eq!(look(true, None, os("")), Some(Look::Colour));
        assert_eq!(look(true, os("xterm"), os("1")), Some(Look::Plain));
    }

    #[test]
    fn a_list_gets_its_bar_after_the_delay_and_loses_it_when_it_ends() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let l = list(t0, 10, 100);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(step(None, None, at(0)), Step::Wait(Duration::MAX));
        assert_eq!(
            step(Some(&l), None, at(300)),
            Step::Wait(Duration::from_millis(700))
        );
        assert_eq!(step(Some(&l), None, at(1000)), Step::Draw);
        assert_eq!(step(Some(&l), Some(id(&l)), at(1500)), Step::Update);
        assert_eq!(step(None, Some(id(&l)), at(1600)), Step::Clear);
        // Another list (a relist right after): the old bar goes, the new one waits.
        let next = list(at(1700), 0, 100);
        assert_eq!(step(Some(&next), Some(id(&l)), at(1700)), Step::Clear);
        assert_eq!(
            step(Some(&next), None, at(1700)),
            Step::Wait(Duration::from_secs(1))
        );
        // A clock set back does not draw early.
        assert_eq!(step(Some(&l), None, at(0) - DELAY), Step::Wait(DELAY));
    }

    #[test]
    fn rate_and_eta_follow_the_average_since_the_list_began() {
        let t0 = SystemTime::UNIX_EPOCH;
        let l = list(t0, 2_000, 10_000);
        let (rate, eta) = rate_and_eta(&l, t0 + Duration::from_secs(2));
        assert_eq!(rate, 1_000.0);
        assert_eq!(eta, Some(Duration::from_secs(8)));
        assert_eq!(message(&l, t0 + Duration::from_secs(2)), "1000/s, ETA 8s");
        assert_eq!(rate_and_eta(&list(t0, 0, 10), t0 + DELAY), (0.0, None));
        // More keys than counted: nothing left.
        let over = list(t0, 12, 10);
        assert_eq!(rate_and_eta(&over, t0 + DELAY).1, Some(Duration::ZERO));
        assert_eq!(prefix(&l), "revwatch: listing (compacted) at revision 7");
    }
}
