//! Installs the Debian packages the tool needs, idempotently: a package that `dpkg-query`
//! reports as installed is never passed to apt, so repeated runs cost one query each.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("cannot run `{command}`: {err}")]
    Spawn {
        command: String,
        err: std::io::Error,
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
    let out = install(&missing, &[])?;
    if out.status.success() {
        return Ok(());
    }
    // A newer sibling from another suite (this machine kind ships qemu-utils from
    // bookworm-backports with no backports source configured) makes apt refuse the missing
    // package ("held broken packages"): put the sibling at the version the package comes with.
    let pins = sibling_pins(&missing, &|p| installed_version(p), &|p| {
        candidate_version(p)
    });
    if pins.is_empty() {
        return Err(install_error(missing, &out));
    }
    eprintln!(
        "kairos-qemu: apt refused {missing:?} beside the installed {}; installing {} with it",
        pins.iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        pins.iter()
            .map(|(p, v)| format!("{p}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = install(&missing, &pins)?;
    if !out.status.success() {
        return Err(install_error(missing, &out));
    }
    Ok(())
}

/// Packages that must have the same version as the one named first: built from one source
/// package, they depend on each other at `=` versions.
const SIBLINGS: &[(&str, &[&str])] = &[
    ("qemu-system-x86", &["qemu-utils", "qemu-block-extra"]),
    ("qemu-utils", &["qemu-system-x86", "qemu-system-common"]),
];

/// For each missing package with siblings, the installed siblings whose version differs from
/// the missing package's candidate, paired with that version (pure: the lookups are passed in).
fn sibling_pins(
    missing: &[String],
    installed: &dyn Fn(&str) -> Option<String>,
    candidate: &dyn Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut pins: Vec<(String, String)> = Vec::new();
    for pkg in missing {
        let Some((_, siblings)) = SIBLINGS.iter().find(|(p, _)| p == pkg) else {
            continue;
        };
        let Some(want) = candidate(pkg) else {
            continue;
        };
        for sib in *siblings {
            if let Some(have) = installed(sib)
                && have != want
                && !pins.iter().any(|(p, _)| p == sib)
            {
                pins.push(((*sib).to_string(), want.clone()));
            }
        }
    }
    pins
}

fn install(packages: &[String], pins: &[(String, String)]) -> Result<Output, AptError> {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages);
    if !pins.is_empty() {
        cmd.arg("--allow-downgrades")
            .args(pins.iter().map(|(p, v)| format!("{p}={v}")));
    }
    run(&mut cmd)
}

fn install_error(packages: Vec<String>, out: &Output) -> AptError {
    AptError::Install {
        packages,
        code: out.status.code(),
        stderr_tail: tail(&out.stderr),
    }
}

fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status} ${Version}", package])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.strip_prefix("install ok installed ")
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn candidate_version(package: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .ok()?;
    parse_candidate(&String::from_utf8_lossy(&out.stdout))
}

/// The `Candidate:` line of `apt-cache policy PKG` (none when apt has no candidate).
fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
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
    cmd.output().map_err(|err| AptError::Spawn {
        command: describe(cmd),
        err,
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
    fn a_newer_sibling_is_pinned_to_the_missing_packages_version() {
        let installed = |p: &str| (p == "qemu-utils").then(|| "1:10.0.2+ds-2~bpo12+1".to_string());
        let candidate = |p: &str| (p == "qemu-system-x86").then(|| "1:7.2+dfsg-7".to_string());
        let missing = vec!["qemu-system-x86".to_string(), "gdisk".to_string()];
        assert_eq!(
            sibling_pins(&missing, &installed, &candidate),
            vec![("qemu-utils".to_string(), "1:7.2+dfsg-7".to_string())]
        );
        // Same version, or no sibling installed: nothing to pin.
        let same = |p: &str| (p == "qemu-utils").then(|| "1:7.2+dfsg-7".to_string());
        assert!(sibling_pins(&missing, &same, &candidate).is_empty());
        assert!(sibling_pins(&missing, &|_| None, &candidate).is_empty());
        assert!(sibling_pins(&["gdisk".to_string()], &installed, &candidate).is_empty());
    }

    #[test]
    fn candidate_line_of_apt_cache_policy() {
        let policy =
            "qemu-utils:\n  Installed: 1:10.0.2\n  Candidate: 1:7.2+dfsg-7\n  Version table:\n";
        assert_eq!(parse_candidate(policy).as_deref(), Some("1:7.2+dfsg-7"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        let t = tail(text.as_bytes());
        assert!(t.starts_with("line 12"));
        assert!(t.ends_with("line 19"));
    }
}
