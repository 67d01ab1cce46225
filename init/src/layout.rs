//! The cos-layout.env files (SPEC.md §3): dotenv parsing and the resulting [`Layout`].
//!
//! Pure apart from [`read_env`]. Bad entries are skipped with a warning rather than failing
//! the boot, and every list is capped so a hostile file cannot stall PID 1.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

use crate::labels;
pub use crate::syntax::clean_path;
use crate::syntax::{OVERLAY_FORMS, Overlay, parse_overlay, split_volume};

/// At most this many entries per key; a layout file with 10 000 paths must not stall the boot.
pub const MAX_PATHS: usize = 1024;
/// A real layout file is a few KiB; anything this big is corrupt or hostile.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

pub const DEFAULT_PERSISTENT_STATE_TARGET: &str = "/usr/local/.state";
pub const DEFAULT_OVERLAY_SIZE: &str = "25%";
/// What Kairos images set; immucore's own default (/etc /root /home /opt /srv /usr/local /var)
/// is in [`IMMUCORE_RW_PATHS`].
pub const KAIROS_RW_PATHS: &[&str] = &["/var", "/etc", "/srv"];
pub const IMMUCORE_RW_PATHS: &[&str] = &[
    "/etc",
    "/root",
    "/home",
    "/opt",
    "/srv",
    "/usr/local",
    "/var",
];
/// Upstream Kairos's PERSISTENT_STATE_PATHS (its list names /var/lib/osd twice; once here).
pub const KAIROS_PERSISTENT_STATE_PATHS: &[&str] = &[
    "/etc/cni",
    "/etc/init.d",
    "/etc/iscsi",
    "/etc/k0s",
    "/etc/kubernetes",
    "/etc/modprobe.d",
    "/etc/pwx",
    "/etc/rancher",
    "/etc/runlevels",
    "/etc/ssh",
    "/etc/ssl/certs",
    "/etc/sysconfig",
    "/etc/systemd",
    "/etc/zfs",
    "/home",
    "/opt",
    "/root",
    "/usr/libexec",
    "/var/cores",
    "/var/lib/ca-certificates",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/var/lib/calico",
    "/var/lib/dbus",
    "/var/lib/etcd",
    "/var/lib/extensions",
    "/var/lib/k0s",
    "/var/lib/kubelet",
    "/var/lib/longhorn",
    "/var/lib/osd",
    "/var/lib/rancher",
    "/var/lib/rook",
    "/var/lib/tailscale",
    "/var/lib/wicked",
    "/var/lib/kairos",
    "/var/log",
    "/var/snap",
    "/var/lib/snapd",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// "LABEL=COS_PERSISTENT"
    pub spec: String,
    /// "/usr/local"
    pub mountpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub volumes: Vec<Volume>,
    pub overlay: Overlay,
    pub rw_paths: Vec<String>,
    pub persistent_state_paths: Vec<String>,
    pub persistent_state_target: String,
    pub custom_bind_mounts: Vec<String>,
    pub custom_ephemeral_mounts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: larger than {max} bytes", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{}: {what}; not read", path.display())]
    NotAFile { path: PathBuf, what: String },
}

/// Read and parse one layout file, refusing files over [`MAX_FILE_BYTES`], anything but a
/// regular file (a FIFO would block PID 1, a device never ends) and any path with a symlink in
/// it: the image's symlink would be resolved in the initramfs, not in the image.
pub fn read_env(path: &Path) -> Result<Vec<(String, String)>, LayoutError> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_a_file = |what: String| LayoutError::NotAFile {
        path: path.to_owned(),
        what,
    };
    if let Some((link, to)) = crate::sys::fsutil::symlink_below(Path::new("/"), path) {
        return Err(not_a_file(format!(
            "{} is a symlink (to {})",
            link.display(),
            to.display()
        )));
    }
    // O_NOFOLLOW covers a symlink put in place after the check; O_NONBLOCK keeps a FIFO's open
    // from waiting for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .at(path, "opening")?;
    let meta = file.metadata().at(path, "stat")?;
    if !meta.is_file() {
        return Err(not_a_file(format!(
            "not a regular file ({:?})",
            meta.file_type()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .at(path, "reading")?;
    let text = String::from_utf8_lossy(&bytes);
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LayoutError::TooLarge {
            path: path.to_owned(),
            max: MAX_FILE_BYTES,
        });
    }
    parse_env(&text, path)
}

fn valid_key(k: &str) -> bool {
    let mut b = k.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
}

/// Parse dotenv text: `KEY=VALUE` lines, optional `export `, `#` comments, blank lines,
/// single-quoted (literal) or double-quoted (`\"`, `\\`, `\n` escapes) values that may span
/// lines. No variable expansion: layout values are plain paths. Later duplicates are kept in
/// order; [`Layout::apply`] lets the last one win.
pub fn parse_env(text: &str, path: &Path) -> Result<Vec<(String, String)>, LayoutError> {
    let err = |line: usize, message: String| LayoutError::Syntax {
        path: path.to_owned(),
        line,
        message,
    };
    let mut out = Vec::new();
    let mut pos = 0; // byte offset of the current line in `text`
    let mut line = 0;
    while pos < text.len() {
        line += 1;
        let rest = text.get(pos..).unwrap_or_default();
        let line_end = rest.find('\n').map_or(text.len(), |i| pos + i);
        let raw = text.get(pos..line_end).unwrap_or_default();
        pos = line_end + 1;

        let l = raw.trim_start();
        if l.trim_end().is_empty() || l.starts_with('#') {
            continue;
        }
        let l = match l.strip_prefix("export") {
            Some(r) if r.starts_with([' ', '\t']) => r.trim_start(),
            _ => l,
        };
        let Some((key, after)) = l.split_once('=') else {
            return Err(err(
                line,
                format!("expected KEY=VALUE, found {:?}", raw.trim_end()),
            ));
        };
        let key = key.trim_end();
        if !valid_key(key) {
            return Err(err(line, format!("invalid key {key:?}")));
        }
        let v = after.trim_start();
        // `v` is a suffix of `raw`, so this is its offset in `text` (quoted values run on).
        let vstart = line_end - v.len();
        let start_line = line;

        let (value, close) = match v.chars().next() {
            Some('"') => {
                let mut val = String::new();
                let mut chars = text.get(vstart + 1..).unwrap_or_default().char_indices();
                let mut close = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '"' => {
                            close = Some(vstart + 1 + i);
                            break;
                        }
                        '\\' => match chars.next() {
                            Some((_, 'n')) => val.push('\n'),
                            Some((_, e @ ('"' | '\\'))) => val.push(e),
                            // Unknown escapes stay as written rather than failing the boot.
                            Some((_, e)) => {
                                line += usize::from(e == '\n');
                                val.push('\\');
                                val.push(e);
                            }
                            None => break,
                        },
                        c => {
                            line += usize::from(c == '\n');
                            val.push(c);
                        }
                    }
                }
                let Some(close) = close else {
                    return Err(err(
                        start_line,
                        format!("unterminated double quote in {key}"),
                    ));
                };
                (val, close)
            }
            Some('\'') => {
                let body = text.get(vstart + 1..).unwrap_or_default();
                let Some(i) = body.find('\'') else {
                    return Err(err(
                        start_line,
                        format!("unterminated single quote in {key}"),
                    ));
                };
                let val = body.get(..i).unwrap_or_default();
                line += val.matches('\n').count();
                (val.to_owned(), vstart + 1 + i)
            }
            _ => {
                // Unquoted: a '#' after whitespace starts a comment.
                let cut = v
                    .char_indices()
                    .find(|&(i, c)| {
                        c == '#' && v.get(..i).is_some_and(|b| b.ends_with([' ', '\t']))
                    })
                    .map_or(v, |(i, _)| v.get(..i).unwrap_or_default());
                out.push((key.to_owned(), cut.trim_end().to_owned()));
                continue;
            }
        };
        // After a closing quote only blanks or a comment may follow on that line.
        let tail = text.get(close + 1..).unwrap_or_default();
        let tail_end = tail.find('\n').unwrap_or(tail.len());
        let trailing = tail.get(..tail_end).unwrap_or_default().trim();
        if !trailing.is_empty() && !trailing.starts_with('#') {
            return Err(err(
                line,
                format!("unexpected {trailing:?} after the quoted value of {key}"),
            ));
        }
        pos = close + 1 + tail_end + 1;
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn tmpfs_25() -> Overlay {
    Overlay::Tmpfs {
        size: DEFAULT_OVERLAY_SIZE.to_owned(),
    }
}

impl Layout {
    /// What Kairos images ship (SPEC §3), used when the image has no layout file at all.
    pub fn kairos_default() -> Layout {
        Layout {
            volumes: vec![Volume {
                spec: format!("LABEL={}", labels::PERSISTENT),
                mountpoint: "/usr/local".to_owned(),
            }],
            overlay: tmpfs_25(),
            rw_paths: owned(KAIROS_RW_PATHS),
            persistent_state_paths: owned(KAIROS_PERSISTENT_STATE_PATHS),
            persistent_state_target: DEFAULT_PERSISTENT_STATE_TARGET.to_owned(),
            custom_bind_mounts: Vec::new(),
            custom_ephemeral_mounts: Vec::new(),
        }
    }

    /// Recovery: overlays only, nothing persistent.
    pub fn recovery_default() -> Layout {
        Layout {
            volumes: Vec::new(),
            persistent_state_paths: Vec::new(),
            ..Layout::kairos_default()
        }
    }

    /// immucore's own values for keys a layout file leaves unset (SPEC §3 "Defaults when
    /// unset"): no volumes, `tmpfs:20%`, the wide RW_PATHS list, nothing persistent.
    pub fn immucore_default() -> Layout {
        Layout {
            volumes: Vec::new(),
            overlay: Overlay::Tmpfs {
                size: "20%".to_owned(),
            },
            rw_paths: owned(IMMUCORE_RW_PATHS),
            persistent_state_paths: Vec::new(),
            ..Layout::kairos_default()
        }
    }

    /// Apply parsed env files in order (later files override earlier keys), starting from
    /// `base`. Lists are whitespace-separated; bad entries are skipped with a warning naming
    /// the file and key. Unknown keys are ignored.
    pub fn apply(
        base: Layout,
        files: &[(PathBuf, Vec<(String, String)>)],
    ) -> (Layout, Vec<String>) {
        let mut l = base;
        let mut warnings = Vec::new();
        for (path, vars) in files {
            for (key, value) in vars {
                let mut w =
                    |msg: String| warnings.push(format!("{}: {key}: {msg}", path.display()));
                match key.as_str() {
                    "VOLUMES" => l.volumes = volumes(value, &mut w),
                    "OVERLAY" => match parse_overlay(value.trim()) {
                        Some(o) => l.overlay = o,
                        None => w(format!(
                            "{:?} is not {OVERLAY_FORMS}; kept the previous overlay",
                            value.trim()
                        )),
                    },
                    "RW_PATHS" => l.rw_paths = path_list(value, &mut w),
                    "PERSISTENT_STATE_PATHS" => l.persistent_state_paths = path_list(value, &mut w),
                    "CUSTOM_BIND_MOUNTS" => l.custom_bind_mounts = path_list(value, &mut w),
                    "CUSTOM_EPHEMERAL_MOUNTS" => {
                        l.custom_ephemeral_mounts = path_list(value, &mut w)
                    }
                    "PERSISTENT_STATE_TARGET" => match clean_path(value.trim()) {
                        Ok(p) => l.persistent_state_target = p,
                        Err(e) => w(format!("{e}; kept {}", l.persistent_state_target)),
                    },
                    _ => {}
                }
            }
        }
        (l, warnings)
    }
}

/// The first [`MAX_PATHS`] whitespace-separated entries; warns about the rest.
fn capped<'a>(
    value: &'a str,
    w: &mut impl FnMut(String),
) -> std::iter::Take<std::str::SplitWhitespace<'a>> {
    let total = value.split_whitespace().count();
    if total > MAX_PATHS {
        w(format!(
            "{total} entries; only the first {MAX_PATHS} are used"
        ));
    }
    value.split_whitespace().take(MAX_PATHS)
}

fn path_list(value: &str, w: &mut impl FnMut(String)) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in capped(value, w) {
        match clean_path(entry) {
            Ok(p) => {
                if seen.insert(p.clone()) {
                    out.push(p);
                }
            }
            Err(e) => w(format!("{e}; skipped")),
        }
    }
    out
}

fn volumes(value: &str, w: &mut impl FnMut(String)) -> Vec<Volume> {
    let mut out: Vec<Volume> = Vec::new();
    for entry in capped(value, w) {
        let Some((spec, mnt)) = split_volume(entry) else {
            w(format!("{entry:?} is not SPEC:/mountpoint; skipped"));
            continue;
        };
        let mountpoint = match clean_path(mnt) {
            Ok(m) => m,
            Err(e) => {
                w(format!("{e}; skipped"));
                continue;
            }
        };
        // Two volumes on one mountpoint would shadow each other; the first one counts.
        if out.iter().any(|v| v.mountpoint == mountpoint) {
            w(format!(
                "{entry:?}: {mountpoint} already has a volume; skipped"
            ));
            continue;
        }
        out.push(Volume {
            spec: spec.to_owned(),
            mountpoint,
        });
    }
    out
}

fn depth(p: &str) -> usize {
    p.split('/').filter(|c| !c.is_empty()).count()
}

/// SPEC §3 step 7: shallow-first (parents are bind-mounted before their children), then
/// alphabetical; duplicates removed.
pub fn sort_persistent(paths: &[String]) -> Vec<String> {
    let mut v = paths.to_vec();
    v.sort_by(|a, b| depth(a).cmp(&depth(b)).then_with(|| a.cmp(b)));
    v.dedup();
    v
}

/// "/var/lib/foo" -> "var-lib-foo": upstream's name for overlay upperdirs and `<p>.bind`
/// state dirs.
pub fn flatten(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn env(text: &str) -> Vec<(String, String)> {
        parse_env(text, &p("/t/cos-layout.env")).expect("test setup")
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    fn strings(list: &[&str]) -> Vec<String> {
        owned(list)
    }

    /// The Kairos image layout file, written the way images write it.
    const KAIROS_LAYOUT: &str = r#"# /etc/cos/cos-layout.env (Kairos image)
# Persistent volumes, mounted read-write.
VOLUMES="LABEL=COS_PERSISTENT:/usr/local"

# Overlay backing for the ephemeral paths
OVERLAY="tmpfs:25%"
RW_PATHS="/var /etc /srv"
export PERSISTENT_STATE_TARGET=/usr/local/.state   # bind targets live here
PERSISTENT_STATE_PATHS="/etc/cni /etc/init.d /etc/iscsi /etc/k0s /etc/kubernetes /etc/modprobe.d
 /etc/pwx /etc/rancher /etc/runlevels /etc/ssh /etc/ssl/certs /etc/sysconfig /etc/systemd /etc/zfs
 /home /opt /root /usr/libexec /var/cores /var/lib/ca-certificates /var/lib/cni /var/lib/containerd
 /var/lib/calico /var/lib/dbus /var/lib/etcd /var/lib/extensions /var/lib/k0s /var/lib/kubelet
 /var/lib/longhorn /var/lib/osd /var/lib/rancher /var/lib/rook /var/lib/tailscale /var/lib/wicked
 /var/lib/kairos /var/log /var/snap /var/lib/snapd /var/lib/osd"
CUSTOM_BIND_MOUNTS=''
CUSTOM_EPHEMERAL_MOUNTS=
"#;

    #[test]
    fn kairos_layout_file_gives_kairos_default() {
        let vars = env(KAIROS_LAYOUT);
        assert_eq!(vars.len(), 7);
        assert_eq!(vars[0], kv("VOLUMES", "LABEL=COS_PERSISTENT:/usr/local"));
        assert_eq!(vars[3], kv("PERSISTENT_STATE_TARGET", "/usr/local/.state"));
        // From immucore's defaults, the file alone yields exactly the Kairos defaults.
        let (layout, warnings) = Layout::apply(
            Layout::immucore_default(),
            &[(p("/etc/cos/cos-layout.env"), vars)],
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(layout, Layout::kairos_default());
        assert_eq!(layout.persistent_state_paths.len(), 38);
        assert_eq!(layout.volumes[0].spec, "LABEL=COS_PERSISTENT");
    }

    #[test]
    fn defaults() {
        let k = Layout::kairos_default();
        assert_eq!(k.overlay, Overlay::Tmpfs { size: "25%".into() });
        assert_eq!(k.rw_paths, strings(&["/var", "/etc", "/srv"]));
        assert_eq!(k.persistent_state_target, "/usr/local/.state");
        let unique: HashSet<_> = k.persistent_state_paths.iter().collect();
        assert_eq!(unique.len(), k.persistent_state_paths.len());
        assert!(
            k.persistent_state_paths
                .iter()
                .all(|p| clean_path(p).as_deref() == Ok(p.as_str()))
        );
        let r = Layout::recovery_default();
        assert_eq!(r.overlay, k.overlay);
        assert_eq!(r.rw_paths, k.rw_paths);
        assert!(r.volumes.is_empty() && r.persistent_state_paths.is_empty());
        assert!(r.custom_bind_mounts.is_empty() && r.custom_ephemeral_mounts.is_empty());
    }

    #[test]
    fn dotenv_forms() {
        let vars = env(concat!(
            "  # indented comment\n",
            "\n",
            "A=plain value # comment\n",
            "B=\"say \\\"hi\\\" \\\\ then\\nnext\" # trailing comment\n",
            "C='lit \\n \"q\"'\n",
            "export D = spaced\r\n",
            "E=a#not-a-comment\n",
            "F=\"multi\n  line\"\n",
            "G=''\n",
            "H=\"unknown \\t escape\"\n",
            "exportI=1",
        ));
        assert_eq!(
            vars,
            vec![
                kv("A", "plain value"),
                kv("B", "say \"hi\" \\ then\nnext"),
                kv("C", "lit \\n \"q\""),
                kv("D", "spaced"),
                kv("E", "a#not-a-comment"),
                kv("F", "multi\n  line"),
                kv("G", ""),
                kv("H", "unknown \\t escape"),
                kv("exportI", "1"),
            ]
        );
    }

    #[test]
    fn malformed_lines_error_with_line_number() {
        let cases: &[(&str, usize)] = &[
            ("A=1\njust words\n", 2),
            ("A=1\n\n# c\n=value\n", 4),
            ("1A=x", 1),
            ("MY KEY=x", 1),
            ("export\n", 1),
            ("A=1\nB=\"never closed\nC=2\n", 2),
            ("A='never closed", 1),
            ("A=\"x\" junk", 1),
            ("A=\"two\nlines\" junk\n", 2),
            ("A='x'y", 1),
            ("A=\"ends in backslash\\", 1),
            ("A=\"multi\nline\"\nB=1\nbad\n", 4),
        ];
        for (text, want) in cases {
            match parse_env(text, &p("/run/cos/custom-layout.env")) {
                Err(LayoutError::Syntax {
                    path,
                    line,
                    message,
                }) => {
                    assert_eq!(path, p("/run/cos/custom-layout.env"));
                    assert_eq!(line, *want, "{text:?}: {message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let e = parse_env("A=1\nnope", &p("/x.env")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x.env:2: expected KEY=VALUE, found \"nope\""
        );
    }

    #[test]
    fn override_order_across_three_files() {
        let files = vec![
            (p("/sysroot/etc/cos/cos-layout.env"), env(KAIROS_LAYOUT)),
            (
                p("/run/cos/extra-layout.env"),
                env(
                    "OVERLAY=tmpfs:1g\nRW_PATHS=\"/var /etc\"\nCUSTOM_BIND_MOUNTS=/data\nRW_PATHS=\"/var /tmp2\"",
                ),
            ),
            (
                p("/run/cos/custom-layout.env"),
                env(
                    "OVERLAY=LABEL=COS_OVL\nVOLUMES=\"LABEL=DATA:/data UUID=1-2:/srv/x\"\nPERSISTENT_STATE_TARGET=/usr/local/st/",
                ),
            ),
        ];
        let (l, warnings) = Layout::apply(Layout::immucore_default(), &files);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            l.overlay,
            Overlay::Device {
                spec: "LABEL=COS_OVL".into()
            }
        );
        assert_eq!(l.rw_paths, strings(&["/var", "/tmp2"]));
        assert_eq!(l.custom_bind_mounts, strings(&["/data"]));
        assert_eq!(
            l.volumes,
            vec![
                Volume {
                    spec: "LABEL=DATA".into(),
                    mountpoint: "/data".into()
                },
                Volume {
                    spec: "UUID=1-2".into(),
                    mountpoint: "/srv/x".into()
                },
            ]
        );
        assert_eq!(l.persistent_state_target, "/usr/local/st");
        assert_eq!(
            l.persistent_state_paths,
            Layout::kairos_default().persistent_state_paths
        );
        // An empty value clears a list.
        let (l, _) = Layout::apply(Layout::kairos_default(), &[(p("/f"), env("VOLUMES=\"\""))]);
        assert!(l.volumes.is_empty());
    }

    #[test]
    fn bad_entries_are_skipped_with_warnings() {
        let files = vec![(
            p("/run/cos/custom-layout.env"),
            env(concat!(
                "RW_PATHS=\"/var var/lib /a/../etc / /srv// /srv /./opt\"\n",
                "VOLUMES=\"LABEL=X LABEL=Y:rel :/m LABEL=A:/a LABEL=B:/a/ LABEL=C:/../c\"\n",
                "OVERLAY=tmpfs:lots\n",
                "PERSISTENT_STATE_TARGET=relative\n",
                "PERSISTENT_STATE_PATHS=\"/etc/ssh ../x\"\n",
            )),
        )];
        let (l, w) = Layout::apply(Layout::kairos_default(), &files);
        assert_eq!(l.rw_paths, strings(&["/var", "/srv", "/opt"]));
        assert_eq!(
            l.volumes,
            vec![Volume {
                spec: "LABEL=A".into(),
                mountpoint: "/a".into()
            }]
        );
        assert_eq!(l.overlay, Overlay::Tmpfs { size: "25%".into() });
        assert_eq!(l.persistent_state_target, "/usr/local/.state");
        assert_eq!(l.persistent_state_paths, strings(&["/etc/ssh"]));
        assert_eq!(w.len(), 3 + 5 + 1 + 1 + 1, "{w:#?}");
        assert!(
            w.iter()
                .all(|m| m.starts_with("/run/cos/custom-layout.env: "))
        );
        assert!(
            w[0].contains("RW_PATHS") && w[0].contains("var/lib"),
            "{}",
            w[0]
        );
        assert!(
            w[1].contains("..") && w[2].contains("root directory"),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|m| m.contains("OVERLAY") && m.contains("tmpfs:lots"))
        );
    }

    #[test]
    fn ten_thousand_paths_are_capped() {
        let many: Vec<String> = (0..10_000).map(|i| format!("/p/{i}")).collect();
        let text = format!(
            "PERSISTENT_STATE_PATHS=\"{}\"\nRW_PATHS={}\n",
            many.join(" "),
            "x ".repeat(10_000).trim()
        );
        let vars = env(&text);
        let (l, w) = Layout::apply(Layout::kairos_default(), &[(p("/big.env"), vars)]);
        assert_eq!(l.persistent_state_paths.len(), MAX_PATHS);
        assert_eq!(l.persistent_state_paths[..], many[..MAX_PATHS]);
        // 10 000 bad paths: capped before validating, so at most MAX_PATHS + 1 warnings.
        assert!(l.rw_paths.is_empty());
        assert_eq!(w.len(), 1 + 1 + MAX_PATHS);
        assert!(w[0].contains("10000 entries"), "{}", w[0]);
    }

    #[test]
    fn sort_order() {
        let input = strings(&[
            "/var/lib/kubelet",
            "/etc",
            "/var/log",
            "/etc/ssh",
            "/home",
            "/etc",
            "/var/lib/cni",
            "/a/b/c/d",
        ]);
        assert_eq!(
            sort_persistent(&input),
            strings(&[
                "/etc",
                "/home",
                "/etc/ssh",
                "/var/log",
                "/var/lib/cni",
                "/var/lib/kubelet",
                "/a/b/c/d"
            ])
        );
        let sorted = sort_persistent(&Layout::kairos_default().persistent_state_paths);
        assert_eq!(sorted.first().map(String::as_str), Some("/home"));
        assert_eq!(sorted.len(), 38);
    }

    #[test]
    fn flatten_names() {
        assert_eq!(flatten("/var/lib/foo"), "var-lib-foo");
        assert_eq!(flatten("/etc"), "etc");
        assert_eq!(flatten("/usr/local/"), "usr-local");
        assert_eq!(flatten("//a//b"), "a-b");
        assert_eq!(flatten("/"), "");
    }

    #[test]
    fn read_env_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("test setup");
        let missing = dir.path().join("nope.env");
        let e = read_env(&missing).unwrap_err();
        assert!(matches!(e, LayoutError::Io { .. }));
        assert!(e.to_string().starts_with(&missing.display().to_string()));
        let big = dir.path().join("big.env");
        std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize + 1]).expect("test setup");
        assert!(matches!(read_env(&big), Err(LayoutError::TooLarge { .. })));
        let good = dir.path().join("cos-layout.env");
        std::fs::write(&good, KAIROS_LAYOUT).expect("test setup");
        assert_eq!(read_env(&good).expect("test setup").len(), 7);
    }

    /// Item 9 of issue 15: the image's layout file is read bounded, not through symlinks (the
    /// kernel would resolve them in the initramfs), and never from a FIFO or a device.
    #[test]
    fn read_env_refuses_symlinks_fifos_and_devices() {
        let dir = tempfile::tempdir().expect("test setup");
        let good = dir.path().join("good.env");
        std::fs::write(&good, KAIROS_LAYOUT).expect("test setup");
        let refused = |p: &Path| match read_env(p) {
            Err(e @ LayoutError::NotAFile { .. }) => e.to_string(),
            other => panic!("{}: {other:?}", p.display()),
        };
        // The file itself a symlink, to a good file or to an endless device.
        let link = dir.path().join("link.env");
        std::os::unix::fs::symlink(&good, &link).expect("test setup");
        assert!(refused(&link).contains("is a symlink"));
        let zero = dir.path().join("zero.env");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("test setup");
        assert!(refused(&zero).contains("is a symlink (to /dev/zero)"));
        // A directory on the way a symlink (etc -> elsewhere).
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("test setup");
        std::fs::write(real.join("cos-layout.env"), KAIROS_LAYOUT).expect("test setup");
        std::os::unix::fs::symlink(&real, dir.path().join("etc")).expect("test setup");
        let via = dir.path().join("etc/cos-layout.env");
        assert!(refused(&via).contains("is a symlink"), "{}", refused(&via));
        // A FIFO: opening it must not wait for a writer.
        let fifo = dir.path().join("fifo.env");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo (coreutils)");
        assert!(made.success(), "mkfifo");
        assert!(refused(&fifo).contains("not a regular file"));
        assert!(refused(Path::new("/dev/zero")).contains("not a regular file"));
        assert_eq!(read_env(&good).expect("a plain file").len(), 7);
    }

    #[test]
    fn garbage_env_never_panics() {
        const PICK: &[u8] = b"A=\"'\\\n# /.:x";
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..50 {
            let bytes: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    PICK[(x % PICK.len() as u64) as usize]
                })
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(vars) = parse_env(&text, &p("/g")) {
                let _ = Layout::apply(Layout::kairos_default(), &[(p("/g"), vars)]);
            }
        }
    }
}
