//! Shared by the binary's end-to-end tests: run `popen` and check how it ended.

use std::process::Command;

pub fn popen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_popen")).args(args).output().expect("popen runs")
}

/// Runs `popen args`, asserting success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = popen(args);
    assert!(
        o.status.success(),
        "popen {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `popen args`, asserting failure; returns stderr.
pub fn err(args: &[&str]) -> String {
    let o = popen(args);
    assert!(!o.status.success(), "popen {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}
