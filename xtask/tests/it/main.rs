//! The task runner's command line: a mistake in it is a message and exit code 2.

use std::process::Command;

#[test]
fn a_usage_error_is_a_message_and_exit_2_even_with_backtraces_on() {
    for (args, says) in [
        (&["bench-nonsense"][..], "usage: xtask bench-bundle"),
        (&["bench-fleet", "--devices", "x"][..], "--devices \"x\""),
        (&["bench-delta", "--bad"][..], "usage: xtask bench-delta"),
        (&["bench-bundle", "--size"][..], "--size needs a value"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("xtask: ") && stderr.contains(says),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("backtrace"), "{args:?}: {stderr}");
    }
}
