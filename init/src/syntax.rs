//! The path and overlay syntax the kernel command line and the layout files share: pure
//! leaf of the boot model (it imports nothing from the crate), so `cmdline`, `layout`, `plan`
//! and `sys` can all use it without importing each other.

/// What a path is inside the mounted image (lstat: symlinks are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Missing,
    Dir,
    File,
    Symlink,
}

/// Backing store for the overlay upper dirs (`rd.cos.overlay=`, layout `OVERLAY=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// `size` is kept as given ("25%", "512m") because it goes straight into the tmpfs options.
    Tmpfs { size: String },
    /// `spec` is "LABEL=x" or "UUID=x".
    Device { spec: String },
}

/// The accepted overlay forms, for warnings.
pub const OVERLAY_FORMS: &str = "tmpfs:<N>%, tmpfs:<N>[kmg], LABEL=... or UUID=...";

/// `tmpfs:<N>%`, `tmpfs:<N>[kmgKMG]`, `LABEL=x` or `UUID=x`; shared with the layout file.
pub fn parse_overlay(s: &str) -> Option<Overlay> {
    if let Some(size) = s.strip_prefix("tmpfs:") {
        let (num, pct) = match size.strip_suffix('%') {
            Some(n) => (n, true),
            None => match size.strip_suffix(['k', 'm', 'g', 'K', 'M', 'G']) {
                Some(n) => (n, false),
                None => (size, false),
            },
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = num.parse().ok()?;
        // tmpfs reads size=0 as "unlimited", which would let the overlay eat all RAM.
        if n == 0 || (pct && n > 100) {
            return None;
        }
        return Some(Overlay::Tmpfs {
            size: size.to_owned(),
        });
    }
    let is_dev = ["LABEL=", "UUID="]
        .iter()
        .any(|p| s.strip_prefix(p).is_some_and(|v| !v.is_empty()));
    is_dev.then(|| Overlay::Device { spec: s.to_owned() })
}

/// Split `SPEC:MOUNTPOINT` at the last ':' whose right side starts with '/', so a SPEC may
/// itself contain ':'. Shared with the layout file's VOLUMES.
pub fn split_volume(s: &str) -> Option<(&str, &str)> {
    let (i, _) = s
        .rmatch_indices(':')
        .find(|(i, _)| s.as_bytes().get(i + 1) == Some(&b'/'))?;
    let (spec, mnt) = (s.get(..i)?, s.get(i + 1..)?);
    (!spec.is_empty()).then_some((spec, mnt))
}

/// Normalise one layout path: absolute, no `..`, no NUL, not "/" itself; duplicate slashes,
/// `.` components and a trailing slash are dropped.
pub fn clean_path(p: &str) -> Result<String, String> {
    if p.contains('\0') {
        return Err(format!("{p:?} contains a NUL byte"));
    }
    if !p.starts_with('/') {
        return Err(format!("{p:?} is not an absolute path"));
    }
    let mut out = String::with_capacity(p.len());
    for c in p.split('/') {
        match c {
            "" | "." => {}
            // Refused rather than resolved: a layout path must not climb out of the root.
            ".." => return Err(format!("{p:?} contains `..`")),
            c => {
                out.push('/');
                out.push_str(c);
            }
        }
    }
    if out.is_empty() {
        return Err(format!("{p:?} is the root directory itself"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_forms() {
        for ok_form in [
            "tmpfs:25%",
            "tmpfs:100%",
            "tmpfs:512m",
            "tmpfs:2G",
            "tmpfs:1048576",
            "LABEL=x",
            "UUID=y",
        ] {
            assert!(parse_overlay(ok_form).is_some(), "{ok_form}");
        }
        for bad in [
            "tmpfs",
            "tmpfs:",
            "tmpfs:%",
            "tmpfs:0",
            "tmpfs:0%",
            "tmpfs:101%",
            "tmpfs:25t",
            "tmpfs:-1",
            "tmpfs:+5",
            "tmpfs:1.5g",
            "tmpfs:99999999999999999999",
            "LABEL=",
            "UUID=",
            "PARTLABEL=x",
            "/dev/sda",
        ] {
            assert!(parse_overlay(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn split_volume_rule() {
        assert_eq!(
            split_volume("LABEL=COS_PERSISTENT:/usr/local"),
            Some(("LABEL=COS_PERSISTENT", "/usr/local"))
        );
        assert_eq!(split_volume("LABEL=a:b:/m"), Some(("LABEL=a:b", "/m")));
        assert_eq!(split_volume("/dev/sda1:/m:x"), Some(("/dev/sda1", "/m:x")));
        assert_eq!(split_volume("LABEL=a"), None);
        assert_eq!(split_volume(":/m"), None);
        assert_eq!(split_volume("a:"), None);
    }
    #[test]
    fn clean_path_rules() {
        assert_eq!(clean_path("/var//lib/"), Ok("/var/lib".into()));
        assert_eq!(clean_path("//etc/./ssh//"), Ok("/etc/ssh".into()));
        for bad in [
            "", "var", "./var", "/", "//", "/./", "/var/..", "/../etc", "/a\0b", "~/x",
        ] {
            assert!(clean_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(clean_path("/a/..b/c.."), Ok("/a/..b/c..".into()));
    }
}
