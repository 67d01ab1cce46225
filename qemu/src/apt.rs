//! Installs the Debian packages the tool needs, idempotently: a package that `dpkg-query`
//! reports as installed is never passed to apt, so repeated runs cost one query each.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`apt-get update` failed (exit {code:?}): {stderr_tail}")]
    Update {
        code: Option<i32>,
        stderr_tail: String,
    },
    #[error("`apt-get install` of {packages:?} failed (exit {code:?}): {stderr_tail}")]
    Install {
        packages: Vec<String>,
        code: Option<i32>,
        stderr_tail: String,
    },
    #[error("package {package} installed, but `{binary}` is still not on PATH")]
    ToolMissing { binary: String, package: String },
}

/// Whether `apt-get update` already ran in this process; held across the install so two
/// threads wanting packages do not run apt concurrently (apt's own lock would fail one of them).
static APT: Mutex<bool> = Mutex::new(false);

/// Makes sure every package in `pkgs` is installed, installing the missing ones in one apt call.
pub fn ensure_packages(pkgs: &[&str]) -> Result<(), AptError> {
    let missing: Vec<String> = pkgs
        .iter()
        .filter(|p| !is_installed(p))
        .map(|p| p.to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut updated = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // Another thread may have installed them while we waited for the lock.
    let missing: Vec<String> = missing.into_iter().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !*updated {
        apt_update()?;
        *updated = true;
    }
    let out = run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))?;
    if !out.status.success() {
        return Err(AptError::Install {
            packages: missing,
            code: out.status.code(),
            stderr_tail: tail(&out.stderr),
        });
    }
    Ok(())
}

/// Makes sure `binary` is on PATH, installing `package` when it is not.
pub fn ensure_tool(binary: &str, package: &str) -> Result<(), AptError> {
    if on_path(binary) {
        return Ok(());
    }
    ensure_packages(&[package])?;
    if on_path(binary) {
        Ok(())
    } else {
        Err(AptError::ToolMissing {
            binary: binary.to_string(),
            package: package.to_string(),
        })
    }
}

/// Runs `apt-get update` once per process (the kernel fetch needs it too, without installing).
pub fn update_once() -> Result<(), AptError> {
    let mut updated = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*updated {
        apt_update()?;
        *updated = true;
    }
    Ok(())
}

/// `dpkg-query` reports "install ok installed" only for fully configured packages; removed
/// packages with leftover config files ("deinstall ok config-files") count as missing.
pub fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| o.status.success() && o.stdout == b"install ok installed")
        .unwrap_or(false)
}

fn apt_update() -> Result<(), AptError> {
    let out = run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["update", "-q"]))?;
    if !out.status.success() {
        return Err(AptError::Update {
            code: out.status.code(),
            stderr_tail: tail(&out.stderr),
        });
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<Output, AptError> {
    cmd.output().map_err(|source| AptError::Spawn {
        command: describe(cmd),
        source,
    })
}

/// The command as a readable string, for error messages only.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last few lines of a command's stderr: enough to see why apt failed without its
/// whole progress output.
pub(crate) fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(8);
    lines[start..].join("\n")
}

fn on_path(binary: &str) -> bool {
    if binary.contains('/') {
        return Path::new(binary).is_file();
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(binary).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_package_is_detected() {
        // dpkg itself is always installed on Debian; a nonsense name never is.
        assert!(
            on_path("dpkg-query"),
            "needs a Debian system (no dpkg-query): kairos-qemu installs with apt"
        );
        assert!(is_installed("dpkg"));
        assert!(!is_installed("kairos-no-such-package-xyz"));
    }

    #[test]
    fn ensure_packages_is_a_no_op_when_installed() {
        assert!(
            on_path("dpkg-query"),
            "needs a Debian system (no dpkg-query): kairos-qemu installs with apt"
        );
        ensure_packages(&["dpkg"]).expect("dpkg is installed");
        ensure_tool("sh", "dash").expect("sh exists");
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let t = tail(text.as_bytes());
        assert!(t.starts_with("line 12"));
        assert!(t.ends_with("line 19"));
    }
}
