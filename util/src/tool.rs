//! An external tool (mkfs, mksquashfs, xorriso, ...) that did not run or failed: the command
//! line, the exit status and the last lines it printed. install, upgrade, reset and
//! kairos-build hold it as `#[error(transparent)] Command(#[from] ToolError)`.

use std::process::{Command, Output};

/// How many of the tool's last non-empty lines the error keeps.
const TAIL_LINES: usize = 6;

#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed ({status}): {output}")]
pub struct ToolError {
    pub command: String,
    pub status: String,
    pub output: String,
}

/// The command line as the user would type it (lossy for non-UTF-8 arguments).
pub fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion with its output captured; a start failure or a non-zero exit
/// is a [`ToolError`].
pub fn run_tool(cmd: &mut Command) -> Result<Output, ToolError> {
    let command = shown(cmd);
    let out = cmd.output().map_err(|e| ToolError {
        command: command.clone(),
        status: "not run".into(),
        output: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    Err(ToolError {
        command,
        status: out.status.to_string(),
        output: lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n"),
    })
}
