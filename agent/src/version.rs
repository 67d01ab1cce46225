//! `kairos-agent version` (the version alone, as upstream) and `version --long` (with the
//! git commit, the build date and the compiler, set at build time by build.rs).

use std::io::Write;

use clap::Args;

use crate::{AgentError, Outcome};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `git rev-parse --short=12 HEAD` at build time, "unknown" outside a checkout.
pub const GIT_COMMIT: &str = env!("KAIROS_GIT_COMMIT");
/// SOURCE_DATE_EPOCH (or the build's time), RFC 3339 UTC.
pub const BUILD_DATE: &str = env!("KAIROS_BUILD_DATE");
/// `rustc -V` of the compiler that built this binary.
pub const RUSTC_VERSION: &str = env!("KAIROS_RUSTC_VERSION");

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Also the git commit, the build date and the Rust compiler, one `key: value` a line
    #[arg(long, short = 'l')]
    pub long: bool,
}

/// The text `version` prints.
pub fn text(long: bool) -> String {
    if !long {
        return format!("{VERSION}\n");
    }
    format!(
        "version: {VERSION}\ncommit: {GIT_COMMIT}\nbuild_date: {BUILD_DATE}\nrust: {RUSTC_VERSION}\n"
    )
}

pub fn version(args: &VersionArgs, out: &mut dyn Write) -> Result<Outcome, AgentError> {
    write!(out, "{}", text(args.long)).map_err(AgentError::Output)?;
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_dates_are_rfc3339_utc() {
        // build.rs formats the date with this function.
        use kairos_util::time::rfc3339_secs as rfc3339;
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // SOURCE_DATE_EPOCH of a reproducible build, and a leap day.
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn short_is_the_version_and_long_names_the_build() {
        assert_eq!(text(false), format!("{}\n", env!("CARGO_PKG_VERSION")));
        let long = text(true);
        let lines: Vec<&str> = long.lines().collect();
        assert_eq!(lines.len(), 4, "{long}");
        assert_eq!(lines[0], format!("version: {VERSION}"));
        let commit = lines[1].strip_prefix("commit: ").unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{commit}"
        );
        let date = lines[2].strip_prefix("build_date: ").unwrap();
        // YYYY-MM-DDTHH:MM:SSZ
        assert_eq!(date.len(), 20, "{date}");
        assert!(date.ends_with('Z') && date.as_bytes()[10] == b'T', "{date}");
        assert!(lines[3].starts_with("rust: rustc 1."), "{}", lines[3]);
    }
}
