//! `flowshard simulate` refuses what it cannot do before it runs a simulated week.

use std::process::Command;

#[test]
fn a_plot_without_a_font_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flowshard"))
        .args(["simulate", "--plot"])
        .arg(dir.path().join("week.png"))
        .env("FLOWSHARD_PLOT_FONT", dir.path().join("no-such.ttf"))
        .output()
        .expect("run flowshard");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("no-such.ttf") && err.contains("fonts-dejavu-core"),
        "{err}"
    );
    assert!(!dir.path().join("week.png").exists());
}
