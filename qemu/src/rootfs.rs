//! The test/demo root filesystem: a busybox tree whose `/sbin/init` prints
//! `KAIROS-TEST:` lines the QEMU tests assert on, packed rootless into ext4/ext2
//! or squashfs image files (`mkfs.ext4 -d`, `mksquashfs`; no mount, no loop).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kairos_init::grubcfg::EXT4_FEATURES_GRUB_CANNOT_READ;
use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::apt::{self, AptError};

/// `/sbin/init` of the image. Its output lines are a contract with the tests.
///
/// `/etc/kairos-test-nowrite` in the image: it writes nothing to /etc, /usr/local and the
/// persistent state paths, so a test can check COS_PERSISTENT is left as the boot found it.
///
/// Flag files on COS_OEM drive the boot-assessment tests (issue 3):
/// - `kairos-test-fail-<image>`: this image "fails": it reboots before
///   marking the boot good, so GRUB's counters run down;
/// - `kairos-test-select-fallback`: removed, then `kairos-agent bootentry
///   --select fallback` (a one-shot choice of passive for the next boot);
/// - `kairos-test-repair`: removed, then `kairos-agent state` and `kairos-agent
///   bootentry --repair`, before the agent touches the grubenv otherwise;
/// - `kairos-test-hook.sh`: sourced after the checks above, before `done`;
/// - `kairos-test-reboots`: a number; while above 0, a good boot counts it
///   down and reboots instead of powering off, so one QEMU run holds several boots.
///
/// A good boot writes `/run/kairos/boot-stage-ok` (what the agent's health
/// check requires) and, when the image has `/usr/bin/kairos-agent`, runs
/// `kairos-agent mark-good` and `kairos-agent state`, every output line
/// prefixed with `KAIROS-TEST: `, followed by `KAIROS-TEST: kairos-agent ARGS exit=N`.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo "KAIROS-TEST: uptime=$(cut -d' ' -f1 /proc/uptime)"
echo "KAIROS-TEST: hello from image=$(cat /etc/kairos-image) pid=$$"
for m in active passive recovery autoreset live; do [ -e /run/cos/${m}_mode ] && echo "KAIROS-TEST: mode=$m"; done
if touch /kairos-rootfs-write-probe 2>/dev/null; then echo "KAIROS-TEST: root=rw"; rm -f /kairos-rootfs-write-probe; else echo "KAIROS-TEST: root=ro"; fi
for f in /etc/kairos-test-overlay /usr/local/kairos-test-persist /etc/ssh/kairos-test-state /var/log/kairos-test-state; do
  if [ -e "$f" ]; then echo "KAIROS-TEST: present $f"; else echo "KAIROS-TEST: absent $f"; fi
done
if [ -e /etc/kairos-test-nowrite ]; then echo "KAIROS-TEST: no test files written"; else
echo written > /etc/kairos-test-overlay && echo written > /usr/local/kairos-test-persist && echo written > /etc/ssh/kairos-test-state && echo written > /var/log/kairos-test-state && echo "KAIROS-TEST: wrote test files"
fi
while read -r dev mnt fs opts rest; do echo "KAIROS-TEST: mount $mnt $fs $opts"; done < /proc/mounts
grep -q '"bind /sysroot/etc/ssh"' /run/kairos/boot-timeline.json 2>/dev/null && echo "KAIROS-TEST: boot-timeline.json has bind /sysroot/etc/ssh"
sync
image=$(cat /etc/kairos-image)
if [ -e "/oem/kairos-test-fail-$image" ]; then
  echo "KAIROS-TEST: failing on purpose"
  sync
  reboot -f
  sleep 60
fi
mkdir -p /run/kairos && touch /run/kairos/boot-stage-ok
agent() {
  out=$(kairos-agent "$@" 2>&1)
  rc=$?
  [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/KAIROS-TEST: /'
  echo "KAIROS-TEST: kairos-agent $* exit=$rc"
}
if [ -x /usr/bin/kairos-agent ]; then
  if [ -e /oem/kairos-test-select-fallback ]; then
    rm -f /oem/kairos-test-select-fallback && sync
    agent bootentry --select fallback
  fi
  if [ -e /oem/kairos-test-repair ]; then
    rm -f /oem/kairos-test-repair && sync
    agent state
    agent bootentry --repair
  fi
  agent mark-good
  agent state
  sync
fi
# A test's own checks (hardening tests); they print their own KAIROS-TEST lines.
if [ -f /oem/kairos-test-hook.sh ]; then . /oem/kairos-test-hook.sh; fi
echo "KAIROS-TEST: done"
reboots=$(cat /oem/kairos-test-reboots 2>/dev/null)
if [ "$reboots" -gt 0 ] 2>/dev/null; then
  echo $((reboots - 1)) > /oem/kairos-test-reboots
  sync
  echo "KAIROS-TEST: rebooting, $((reboots - 1)) more after this"
  reboot -f
  sleep 60
fi
poweroff -f
"#;

/// A stand-in for `/usr/bin/k3s` (the real binary cannot be fetched on the test machines).
/// `server`/`agent`: records its argv (one per line), environment and
/// `/etc/rancher/k3s/config.yaml` under `/run/k3s-standin/`, prints them on the console as
/// `KAIROS-K3S:` lines, then stays up (a sleep loop) so a supervisor sees a live process;
/// `kubectl get --raw /readyz` answers `ok`. Each start bumps `/run/k3s-standin/starts`.
/// Plain POSIX sh: runs under busybox and Debian's dash.
pub const K3S_STANDIN: &str = r#"#!/bin/sh
# Its records hold the K3s token: root only, as k3s keeps its own files.
umask 077
d=/run/k3s-standin
mkdir -p "$d"
case "$1" in
  kubectl)
    shift
    if [ "$*" = "get --raw /readyz" ] || [ "$*" = "get --raw=/readyz" ]; then echo ok; exit 0; fi
    echo "k3s stand-in: kubectl $* is not implemented" >&2
    exit 1 ;;
  server|agent) ;;
  --version|-v|version) echo "k3s version v1.31.0+k3s1 (kairos test stand-in)"; exit 0 ;;
  *) echo "k3s stand-in: unsupported command: $*" >&2; exit 1 ;;
esac
mode=$1
n=$(( $(cat "$d/starts" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/starts"
: > "$d/argv"
for a in "$@"; do printf '%s
' "$a" >> "$d/argv"; done
env | sort > "$d/env"
if [ -f /etc/rancher/k3s/config.yaml ]; then cp /etc/rancher/k3s/config.yaml "$d/config.yaml"; else rm -f "$d/config.yaml"; fi
echo $$ > "$d/pid"
{
  echo "KAIROS-K3S: start n=$n pid=$$ mode=$mode argc=$#"
  for a in "$@"; do echo "KAIROS-K3S: arg $a"; done
  sed 's/^/KAIROS-K3S: env /' "$d/env"
  if [ -f "$d/config.yaml" ]; then sed 's/^/KAIROS-K3S: config /' "$d/config.yaml"; else echo "KAIROS-K3S: no config"; fi
  echo "KAIROS-K3S: running n=$n"
} > /dev/console 2>&1
trap 'echo "KAIROS-K3S: stopping pid=$$ on SIGTERM" > /dev/console; exit 0' TERM INT
while :; do sleep 1; done
"#;

/// Debian's static busybox, as installed by `busybox-static`.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Packages the functions of this module run tools from.
pub const PACKAGES: &[&str] = &["busybox-static", "e2fsprogs", "squashfs-tools"];

/// What goes into the tree besides busybox and the init script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootfsOptions {
    /// Copied to `/boot/vmlinuz` (GRUB loads it from inside the image, as upstream Kairos does).
    pub kernel: Option<PathBuf>,
    /// Copied to `/boot/initrd`.
    pub initrd: Option<PathBuf>,
    /// Written to `/etc/cos/cos-layout.env`; without it the image has no `/etc/cos`.
    pub layout_file: Option<String>,
}

/// Which ext filesystem an image gets: upstream Kairos uses ext2, ours defaults to ext4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExtFs {
    Ext2,
    #[default]
    Ext4,
}

impl ExtFs {
    fn mkfs(self) -> &'static str {
        match self {
            ExtFs::Ext2 => "mkfs.ext2",
            ExtFs::Ext4 => "mkfs.ext4",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error("installing tools: {0}")]
    Apt(AptError),
    #[error("`{HOST_BUSYBOX} --list` named no applets")]
    NoApplets,
    #[error("invalid image name {0:?} (expected one word such as active, passive, recovery)")]
    BadImageName(String),
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<AptError> for RootfsError {
    fn from(e: AptError) -> RootfsError {
        RootfsError::Apt(e)
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), RootfsError> {
    fs::write(path, contents).at(path, "writing")?;
    Ok(fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .at(path, "setting permissions")?)
}

fn mkdir(path: &Path, mode: u32) -> Result<(), RootfsError> {
    fs::create_dir_all(path).at(path, "creating")?;
    // Explicit chmod: create_dir_all is subject to the umask and cannot set the sticky bit.
    Ok(fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .at(path, "setting permissions")?)
}

/// Creates `link -> target`, replacing whatever is at `link` so rebuilding a tree works.
fn symlink_force(target: &str, link: &Path) -> Result<(), RootfsError> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).at(link, "removing")?;
    }
    Ok(symlink(target, link).at(link, "creating the symlink")?)
}

fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<(), RootfsError> {
    fs::copy(from, to).at(from, format!("copying to {}", to.display()))?;
    Ok(fs::set_permissions(to, fs::Permissions::from_mode(mode)).at(to, "setting permissions")?)
}

/// Applet names from `busybox --list`, minus the ones that would shadow our init.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, RootfsError> {
    let out = run_tool(Command::new(busybox).arg("--list"))?;
    let applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .filter(|a| *a != "init" && *a != "linuxrc")
        .map(str::to_string)
        .collect();
    if applets.is_empty() {
        return Err(RootfsError::NoApplets);
    }
    Ok(applets)
}

/// Builds the minimal FHS tree of a test image in `dir` (created if needed;
/// files of an earlier build are replaced).
pub fn build_tree(dir: &Path, image_name: &str, opts: &RootfsOptions) -> Result<(), RootfsError> {
    apt::ensure_packages(&["busybox-static"])?;
    build_tree_unchecked(dir, image_name, opts)
}

/// [`build_tree`] without the package check, for callers that did it already.
pub(crate) fn build_tree_unchecked(
    dir: &Path,
    image_name: &str,
    opts: &RootfsOptions,
) -> Result<(), RootfsError> {
    mkdir(dir, 0o755)?;
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local",
        "usr/libexec",
        "dev",
        "proc",
        "sys",
        "run",
        "etc",
        "etc/ssh",
        "var",
        "var/log",
        "var/lib",
        "srv",
        "oem",
        "home",
        "opt",
        "mnt",
        "boot",
    ] {
        mkdir(&dir.join(d), 0o755)?;
    }
    mkdir(&dir.join("tmp"), 0o1777)?;
    mkdir(&dir.join("var/tmp"), 0o1777)?;
    mkdir(&dir.join("root"), 0o700)?;

    let busybox = Path::new(HOST_BUSYBOX);
    copy_file(busybox, &dir.join("bin/busybox"), 0o755)?;
    for applet in busybox_applets(busybox)? {
        symlink_force("busybox", &dir.join("bin").join(&applet))?;
    }
    // Tools people type with a full path; everything else is found through PATH in /bin.
    for d in ["sbin", "usr/bin", "usr/sbin"] {
        for applet in ["poweroff", "reboot", "halt"] {
            symlink_force("/bin/busybox", &dir.join(d).join(applet))?;
        }
    }
    write_file(&dir.join("sbin/init"), INIT_SCRIPT.as_bytes(), 0o755)?;

    set_image_name(dir, image_name)?;
    write_file(
        &dir.join("etc/os-release"),
        b"NAME=\"Kairos test image\"\nID=kairos\nPRETTY_NAME=\"Kairos test image\"\nVERSION_ID=test\n",
        0o644,
    )?;
    write_file(
        &dir.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write_file(&dir.join("etc/group"), b"root:x:0:\n", 0o644)?;
    write_file(&dir.join("etc/hostname"), b"kairos-test\n", 0o644)?;

    install_boot_files(dir, opts)
}

/// The parts of an image every tree gets from the disk builder, busybox or not: the layout
/// file (or no /etc/cos), `/boot/vmlinuz` and `/boot/initrd`.
pub(crate) fn install_boot_files(dir: &Path, opts: &RootfsOptions) -> Result<(), RootfsError> {
    let cos = dir.join("etc/cos");
    match &opts.layout_file {
        Some(text) => {
            mkdir(&cos, 0o755)?;
            write_file(&cos.join("cos-layout.env"), text.as_bytes(), 0o644)?;
        }
        // No /etc/cos at all: the init must fall back to its built-in defaults.
        None if cos.exists() => fs::remove_dir_all(&cos).at(&cos, "removing")?,
        None => {}
    }
    if let Some(kernel) = &opts.kernel {
        copy_file(kernel, &dir.join("boot/vmlinuz"), 0o644)?;
    }
    if let Some(initrd) = &opts.initrd {
        copy_file(initrd, &dir.join("boot/initrd"), 0o644)?;
    }
    Ok(())
}

/// The busybox image variant whose `/sbin/init` is `init` (kairos-init itself, running as the
/// system's PID 1) instead of [`INIT_SCRIPT`], which stays at `/usr/libexec/kairos-test-init`.
/// Adds `/etc/shadow` (the users step of a cloud-config edits it) and the mount points
/// kairos-init fills at start (/dev/pts, /dev/shm).
pub fn install_init_binary(dir: &Path, init: &Path) -> Result<(), RootfsError> {
    write_file(
        &dir.join("usr/libexec/kairos-test-init"),
        INIT_SCRIPT.as_bytes(),
        0o755,
    )?;
    let target = dir.join("sbin/init");
    if target.symlink_metadata().is_ok() {
        fs::remove_file(&target).at(&target, "removing")?;
    }
    copy_file(init, &target, 0o755)?;
    write_file(
        &dir.join("etc/shadow"),
        b"root:*:19000:0:99999:7:::\n",
        0o640,
    )?;
    for d in ["dev/pts", "dev/shm", "etc/rancher/k3s"] {
        mkdir(&dir.join(d), 0o755)?;
    }
    Ok(())
}

/// Writes a file into a tree, creating its parent directories.
pub fn add_file(dir: &Path, rel: &str, contents: &[u8], mode: u32) -> Result<(), RootfsError> {
    let path = dir.join(rel.trim_start_matches('/'));
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    if path.symlink_metadata().is_ok() {
        fs::remove_file(&path).at(&path, "removing")?;
    }
    write_file(&path, contents, mode)
}

/// The shared objects `ldd` names for an ELF file (resolved paths and the loader); none for a
/// static binary or a script.
pub fn ldd_paths(ldd_output: &str) -> Vec<PathBuf> {
    ldd_output
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies a host file or directory to the same path in the tree. ELF executables bring their
/// shared libraries and the dynamic loader along (found by `ldd`), so host tools such as
/// `mke2fs` run in the busybox image. Symlinks on the way are followed: the tree gets files.
pub fn add_host_path(dir: &Path, host: &Path) -> Result<(), RootfsError> {
    let meta = fs::metadata(host).at(host, "reading metadata")?;
    if meta.is_dir() {
        for entry in fs::read_dir(host).at(host, "reading the directory")? {
            let entry = entry.at(host, "reading the directory")?;
            add_host_path(dir, &entry.path())?;
        }
        return Ok(());
    }
    let rel = host.to_string_lossy();
    place_host_file(
        host,
        &dir.join(rel.trim_start_matches('/')),
        meta.permissions().mode() & 0o7777,
    )?;
    let is_elf = fs::read(host)
        .map(|b| b.starts_with(b"\x7fELF"))
        .unwrap_or(false);
    if !is_elf || meta.permissions().mode() & 0o111 == 0 {
        return Ok(());
    }
    // ldd exits non-zero for static binaries ("not a dynamic executable"): nothing to add.
    let Ok(out) = run_tool(Command::new("ldd").arg(host)) else {
        return Ok(());
    };
    for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout)) {
        let to = dir.join(lib.to_string_lossy().trim_start_matches('/'));
        if !to.exists() {
            place_host_file(&lib, &to, 0o755)?;
        }
    }
    Ok(())
}

/// Copy replacing what is there: a busybox applet symlink of the same name must not be
/// written through (it would overwrite busybox itself).
fn place_host_file(from: &Path, to: &Path, mode: u32) -> Result<(), RootfsError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    if to.symlink_metadata().is_ok() {
        fs::remove_file(to).at(to, "removing")?;
    }
    copy_file(from, to, mode)
}

/// Rewrites `/etc/kairos-image`, so one tree serves active, passive and recovery in turn.
pub fn set_image_name(dir: &Path, image_name: &str) -> Result<(), RootfsError> {
    if image_name.is_empty() || image_name.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(RootfsError::BadImageName(image_name.to_string()));
    }
    write_file(
        &dir.join("etc/kairos-image"),
        format!("{image_name}\n").as_bytes(),
        0o644,
    )
}

/// Bytes a tree needs, counting each file at its apparent size rounded up to
/// 4 KiB (sparse files count in full: an image may be rewritten later) and
/// 4 KiB per directory and symlink.
pub fn tree_bytes(tree: &Path) -> Result<u64, RootfsError> {
    const BLOCK: u64 = 4096;
    let meta = tree.symlink_metadata().at(tree, "reading metadata")?;
    if !meta.is_dir() {
        return Ok(meta.len().div_ceil(BLOCK).max(1) * BLOCK);
    }
    let mut total = BLOCK;
    for entry in fs::read_dir(tree).at(tree, "reading the directory")? {
        let entry = entry.at(tree, "reading the directory")?;
        total += tree_bytes(&entry.path())?;
    }
    Ok(total)
}

/// Image size for a tree: its size + 30 % + 16 MiB (journal, metadata, slack).
pub fn image_size_mb(tree: &Path) -> Result<u64, RootfsError> {
    const MIB: u64 = 1 << 20;
    let bytes = tree_bytes(tree)?;
    Ok((bytes + bytes * 3 / 10).div_ceil(MIB) + 16)
}

/// The `-O` argument turning off the ext4 features GRUB 2.06 cannot read,
/// limited to the names this e2fsprogs knows (probed once on a scratch file).
fn grub_safe_features() -> Option<&'static str> {
    static FEATURES: OnceLock<String> = OnceLock::new();
    let s = FEATURES.get_or_init(|| {
        let known: Vec<&str> = EXT4_FEATURES_GRUB_CANNOT_READ
            .iter()
            .copied()
            .filter(|f| mkfs_knows_feature(f))
            .collect();
        known
            .iter()
            .map(|f| format!("^{f}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    (!s.is_empty()).then_some(s.as_str())
}

fn mkfs_knows_feature(feature: &str) -> bool {
    let probe = std::env::temp_dir().join(format!(
        "kairos-qemu-mkfs-probe-{}-{feature}.img",
        std::process::id()
    ));
    let ok = run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O"])
            .arg(format!("^{feature}"))
            .arg(&probe)
            .arg("8M"),
    )
    .is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

/// Makes an ext filesystem image file of `size_kib` from `tree` (empty if None).
pub(crate) fn mkfs_ext(
    tree: Option<&Path>,
    out: &Path,
    label: &str,
    size_kib: u64,
    fs_kind: ExtFs,
) -> Result<(), RootfsError> {
    // mke2fs refuses to shrink nothing but would reuse a larger file's tail; start clean.
    if out.symlink_metadata().is_ok() {
        fs::remove_file(out).at(out, "removing")?;
    }
    let mut cmd = Command::new(fs_kind.mkfs());
    cmd.args(["-q", "-F", "-L", label]);
    if let Some(tree) = tree {
        cmd.arg("-d").arg(tree);
    }
    if let Some(features) = grub_safe_features() {
        cmd.arg("-O").arg(features);
    }
    cmd.arg(out).arg(format!("{size_kib}k"));
    run_tool(&mut cmd)?;
    Ok(())
}

/// `mkfs.ext4 -d TREE` into the file `out` of `size_mb` MiB, labelled `label`.
pub fn make_ext_image(
    tree: &Path,
    out: &Path,
    label: &str,
    size_mb: u64,
) -> Result<(), RootfsError> {
    make_ext_image_as(tree, out, label, size_mb, ExtFs::Ext4)
}

/// [`make_ext_image`] with a choice of ext2 (upstream's images) or ext4.
pub fn make_ext_image_as(
    tree: &Path,
    out: &Path,
    label: &str,
    size_mb: u64,
    fs_kind: ExtFs,
) -> Result<(), RootfsError> {
    apt::ensure_packages(&["e2fsprogs"])?;
    mkfs_ext(Some(tree), out, label, size_mb * 1024, fs_kind)
}

/// Packs `tree` into a squashfs file. xz, because GRUB's squash4 reads xz but not zstd.
pub fn make_squashfs(tree: &Path, out: &Path) -> Result<(), RootfsError> {
    apt::ensure_packages(&["squashfs-tools"])?;
    make_squashfs_unchecked(tree, out)
}

pub(crate) fn make_squashfs_unchecked(tree: &Path, out: &Path) -> Result<(), RootfsError> {
    run_tool(Command::new("mksquashfs").arg(tree).arg(out).args([
        "-comp",
        "xz",
        "-noappend",
        "-all-root",
        "-quiet",
    ]))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have(tool: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    }

    /// Without these the test fails and says which (it never passes without having run).
    fn tools_present() {
        let ok = Path::new(HOST_BUSYBOX).exists()
            && [
                "mkfs.ext4",
                "mksquashfs",
                "debugfs",
                "dumpe2fs",
                "unsquashfs",
            ]
            .iter()
            .all(|t| have(t));
        assert!(
            ok,
            "needs busybox-static, e2fsprogs and squashfs-tools (`kairos-qemu setup` installs them)"
        );
    }

    fn sample_tree(dir: &Path, layout: Option<&str>) {
        let kernel = dir.join("vmlinuz.in");
        fs::write(&kernel, b"fake kernel").unwrap();
        let opts = RootfsOptions {
            kernel: Some(kernel),
            initrd: None,
            layout_file: layout.map(str::to_string),
        };
        build_tree_unchecked(&dir.join("tree"), "active", &opts).unwrap();
    }

    #[test]
    fn tree_has_init_busybox_and_identity() {
        tools_present();
        let tmp = tempfile::tempdir().unwrap();
        sample_tree(tmp.path(), None);
        let t = tmp.path().join("tree");
        assert_eq!(
            fs::read_to_string(t.join("sbin/init")).unwrap(),
            INIT_SCRIPT
        );
        let mode = fs::metadata(t.join("sbin/init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        let tmp_mode = fs::metadata(t.join("tmp")).unwrap().permissions().mode();
        assert_eq!(tmp_mode & 0o7777, 0o1777);
        assert_eq!(
            fs::read_link(t.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            fs::read_link(t.join("sbin/poweroff")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(!t.join("bin/init").exists());
        assert_eq!(
            fs::read_to_string(t.join("etc/kairos-image")).unwrap(),
            "active\n"
        );
        assert_eq!(fs::read(t.join("boot/vmlinuz")).unwrap(), b"fake kernel");
        assert!(!t.join("boot/initrd").exists());
        assert!(!t.join("etc/cos").exists());
        // A rebuild over the same dir works and the layout file appears.
        build_tree_unchecked(
            &t,
            "passive",
            &RootfsOptions {
                layout_file: Some("OVERLAY=tmpfs:25%\n".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(t.join("etc/cos/cos-layout.env")).unwrap(),
            "OVERLAY=tmpfs:25%\n"
        );
        assert!(set_image_name(&t, "bad name").is_err());
    }

    /// Asserts busybox `sh -n` accepts `script`; false (skip) when the host has no busybox.
    fn sh_syntax_ok(script: &str) {
        assert!(
            Path::new(HOST_BUSYBOX).exists(),
            "needs {HOST_BUSYBOX} (busybox-static; `kairos-qemu setup` installs it)"
        );
        let out = Command::new(HOST_BUSYBOX)
            .args(["sh", "-n", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn init_script_is_valid_sh() {
        sh_syntax_ok(INIT_SCRIPT);
    }

    #[test]
    fn k3s_standin_records_and_answers_readyz() {
        sh_syntax_ok(K3S_STANDIN);
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("k3s");
        write_file(&script, K3S_STANDIN.as_bytes(), 0o755).unwrap();
        let ready = Command::new(HOST_BUSYBOX)
            .arg("sh")
            .arg(&script)
            .args(["kubectl", "get", "--raw", "/readyz"])
            .output()
            .unwrap();
        assert!(ready.status.success());
        assert_eq!(String::from_utf8_lossy(&ready.stdout), "ok\n");
        let bad = Command::new(HOST_BUSYBOX)
            .arg("sh")
            .arg(&script)
            .arg("etcd-snapshot")
            .output()
            .unwrap();
        assert!(!bad.status.success());
    }

    #[test]
    fn init_binary_variant_keeps_the_script_aside() {
        tools_present();
        let tmp = tempfile::tempdir().unwrap();
        sample_tree(tmp.path(), None);
        let t = tmp.path().join("tree");
        let bin = tmp.path().join("fake-init");
        fs::write(&bin, b"\x7fELF fake").unwrap();
        install_init_binary(&t, &bin).unwrap();
        assert_eq!(fs::read(t.join("sbin/init")).unwrap(), b"\x7fELF fake");
        assert_eq!(
            fs::read_to_string(t.join("usr/libexec/kairos-test-init")).unwrap(),
            INIT_SCRIPT
        );
        assert!(t.join("etc/shadow").exists() && t.join("dev/pts").is_dir());
        add_file(&t, "/usr/bin/k3s", K3S_STANDIN.as_bytes(), 0o755).unwrap();
        let mode = fs::metadata(t.join("usr/bin/k3s"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn ext_images_are_grub_readable() {
        tools_present();
        let tmp = tempfile::tempdir().unwrap();
        sample_tree(
            tmp.path(),
            Some("VOLUMES=\"LABEL=COS_PERSISTENT:/usr/local\"\n"),
        );
        let t = tmp.path().join("tree");
        let mb = image_size_mb(&t).unwrap();
        assert!((17..40).contains(&mb), "size {mb}");
        for (kind, name) in [(ExtFs::Ext4, "a4.img"), (ExtFs::Ext2, "a2.img")] {
            let img = tmp.path().join(name);
            mkfs_ext(Some(&t), &img, "COS_ACTIVE", mb * 1024, kind).unwrap();
            assert_eq!(fs::metadata(&img).unwrap().len(), mb << 20);
            let head = run_tool(Command::new("dumpe2fs").arg("-h").arg(&img)).unwrap();
            let head = String::from_utf8_lossy(&head.stdout);
            assert!(
                head.contains("Filesystem volume name:   COS_ACTIVE"),
                "{head}"
            );
            let features = head
                .lines()
                .find(|l| l.starts_with("Filesystem features:"))
                .unwrap();
            for f in EXT4_FEATURES_GRUB_CANNOT_READ {
                assert!(!features.contains(f), "{features}");
            }
            assert_eq!(features.contains("has_journal"), kind == ExtFs::Ext4);
            let cat = run_tool(
                Command::new("debugfs")
                    .args(["-R", "cat /etc/kairos-image"])
                    .arg(&img),
            )
            .unwrap();
            assert_eq!(String::from_utf8_lossy(&cat.stdout), "active\n");
            let ls = run_tool(
                Command::new("debugfs")
                    .args(["-R", "stat /sbin/init"])
                    .arg(&img),
            )
            .unwrap();
            assert!(String::from_utf8_lossy(&ls.stdout).contains("Mode:  0755"));
        }
    }

    #[test]
    fn squashfs_lists_tree() {
        tools_present();
        let tmp = tempfile::tempdir().unwrap();
        sample_tree(tmp.path(), None);
        let out = tmp.path().join("r.squashfs");
        make_squashfs_unchecked(&tmp.path().join("tree"), &out).unwrap();
        let stat = run_tool(Command::new("unsquashfs").arg("-s").arg(&out)).unwrap();
        assert!(String::from_utf8_lossy(&stat.stdout).contains("Compression xz"));
        let ls = run_tool(Command::new("unsquashfs").arg("-lls").arg(&out)).unwrap();
        let ls = String::from_utf8_lossy(&ls.stdout);
        assert!(ls.contains("squashfs-root/sbin/init"), "{ls}");
        assert!(ls.contains("root/root"), "{ls}");
    }
    #[test]
    fn ldd_paths_takes_resolved_libraries_and_the_loader() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibext2fs.so.2 => /lib/x86_64-linux-gnu/libext2fs.so.2 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n\tlibgone.so => not found\n";
        assert_eq!(
            ldd_paths(out),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libext2fs.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(ldd_paths("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn host_tools_bring_their_libraries_and_do_not_write_through_applet_links() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path();
        let busybox = tree.join("bin/busybox");
        fs::create_dir_all(busybox.parent().unwrap()).unwrap();
        fs::write(&busybox, b"busybox").unwrap();
        fs::create_dir_all(tree.join("sbin")).unwrap();
        symlink("../bin/busybox", tree.join("sbin/mke2fs")).unwrap();
        assert!(
            Path::new("/sbin/mke2fs").exists(),
            "needs /sbin/mke2fs (e2fsprogs; `kairos-qemu setup` installs it)"
        );
        add_host_path(tree, Path::new("/sbin/mke2fs")).unwrap();
        assert_eq!(fs::read(&busybox).unwrap(), b"busybox");
        assert!(
            fs::read(tree.join("sbin/mke2fs"))
                .unwrap()
                .starts_with(b"\x7fELF")
        );
        assert!(tree.join("lib64/ld-linux-x86-64.so.2").exists());
        let out = Command::new("ldd").arg("/sbin/mke2fs").output().unwrap();
        for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout)) {
            assert!(
                tree.join(lib.strip_prefix("/").unwrap()).exists(),
                "{lib:?}"
            );
        }
    }
}
