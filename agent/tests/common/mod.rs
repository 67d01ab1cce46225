//! What the binary-driving test files share: run the built agent on a root, read its output.

use std::path::Path;
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_kairos-agent");

/// `kairos-agent --root ROOT ARGS…`, waited for.
pub fn agent(root: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .expect("running the built kairos-agent")
}

/// (exit code, stdout, stderr); -1 when a signal ended it.
pub fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
