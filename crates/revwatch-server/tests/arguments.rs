//! The `revwatch-server` binary refuses bad arguments with a message naming the flag and
//! exit status 2, before it touches a data directory.

use std::process::Command;

fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_revwatch-server"))
        .args(args)
        .output()
        .expect("run revwatch-server");
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}

#[test]
fn bad_arguments_are_refused_with_the_flag_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    for (args, says) in [
        (
            vec!["--checkpoint-interval-ms"],
            "a value is required for '--checkpoint-interval-ms",
        ),
        (
            vec!["--checkpoint-interval-ms", "-1"],
            "invalid value '-1' for '--checkpoint-interval-ms",
        ),
        (
            vec!["--auto-compaction-retention", "x"],
            "bad auto-compaction retention \"x\" for periodic mode",
        ),
        (
            vec![
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "1h",
            ],
            "bad auto-compaction retention \"1h\" for revision mode",
        ),
        (
            vec!["--auto-compaction-mode", "hourly"],
            "invalid value 'hourly' for '--auto-compaction-mode",
        ),
        (
            vec!["--auto-compaction-retention"],
            "a value is required for '--auto-compaction-retention",
        ),
        (
            vec!["--listen", "nowhere"],
            "invalid value 'nowhere' for '--listen",
        ),
        (vec!["--frobnicate"], "unexpected argument '--frobnicate'"),
    ] {
        let args: Vec<&str> = ["--data-dir", data].into_iter().chain(args).collect();
        let stderr = refused(&args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "a refused start created the data dir"
    );
    // Help is not a refusal: it goes to stdout with status 0.
    let help = Command::new(env!("CARGO_BIN_EXE_revwatch-server"))
        .arg("--help")
        .output()
        .expect("run revwatch-server --help");
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: revwatch-server"));
}
