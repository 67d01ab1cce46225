//! Build facts for `kairos-agent version --long`: the git commit, the build date and the
//! compiler. Outside a git checkout (a source tarball) the commit is "unknown"; the date is
//! SOURCE_DATE_EPOCH's when set (reproducible builds), else the time of the build.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // A new commit changes HEAD (detached) or the branch's ref file: rebuild the facts then.
    // Only files that exist: cargo reruns on every build for a missing one (a packed ref).
    let mut watch = vec!["HEAD".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for what in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &what])
            && std::path::Path::new(&p).is_file()
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(n) => n,
            Err(_) => panic!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"),
        },
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KAIROS_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=KAIROS_BUILD_DATE={}",
        kairos_util::time::rfc3339_secs(epoch)
    );
    println!("cargo:rustc-env=KAIROS_RUSTC_VERSION={rustc_version}");
}

/// `git ARGS` in the package directory, its trimmed output; None when git is missing, this
/// is not a checkout, or git refuses (a repository owned by another user).
fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    if !o.status.success() {
        return None;
    }
    let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}
