//! The Debian 12 test image: a `debootstrap --variant=minbase` tree with systemd as init, built
//! once and cached under the kairos-qemu cache (`debian-12/rootfs`). No kernel goes inside: the
//! disk builder puts the cached Debian kernel and our initramfs at `/boot` like it does for the
//! busybox image, and kairos-init boots it as any Kairos image.
//!
//! The cache is complete only when `rootfs/.kairos-complete` exists; a build goes to
//! `rootfs.tmp` and is renamed into place, so an interrupted build is redone, never half-used.
//! Tests copy the tree ([`copy_tree`]) before adding the agent and test files.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::apt::{self, AptError};
use crate::kernel::{Kernel, KernelError};
use crate::rootfs::RootfsError;

pub const PACKAGES: &[&str] = &["debootstrap", "debian-archive-keyring"];
pub const SUITE: &str = "bookworm";
/// Overridable with `KAIROS_DEBIAN_MIRROR` (a local mirror or proxy).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const STAMP: &str = ".kairos-complete";
/// Bumped whenever [`configure`] changes: a cached tree with an older stamp is reconfigured
/// in place (cheap) instead of being bootstrapped again.
const CONFIG_VERSION: u32 = 2;

/// Units that only cost boot time (or wait for input) on a headless test node: masked.
/// `systemd-firstboot` would prompt on the console when it thinks this is a first boot;
/// the gettys would wait for device units that never appear without udev.
const MASKED: &[&str] = &[
    "systemd-firstboot.service",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "getty-static.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
];

/// Paths removed after debootstrap: documentation, translations and package caches (about a
/// third of a minbase tree), never read on a test node.
const TRIM: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
    "var/log/bootstrap.log",
];

#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error("installing debootstrap: {0}")]
    Apt(AptError),
    #[error("{}: debootstrap finished but the tree has no {what}", tree.display())]
    Incomplete { tree: PathBuf, what: &'static str },
    #[error("the kernel for the Debian image: {0}")]
    Kernel(KernelError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<KernelError> for DebianError {
    fn from(e: KernelError) -> DebianError {
        DebianError::Kernel(e)
    }
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<AptError> for DebianError {
    fn from(e: AptError) -> DebianError {
        DebianError::Apt(e)
    }
}

/// `<kairos-qemu cache>/debian-12`.
pub fn default_dir() -> PathBuf {
    crate::kernel::default_cache_dir().join("debian-12")
}

/// The cached tree, built on first use.
pub fn cached_or_build() -> Result<PathBuf, DebianError> {
    build(&default_dir())
}

/// Serialises builds inside one process (tests run in threads); the lock file does the same
/// across processes.
static BUILD: Mutex<()> = Mutex::new(());

/// What the stamp of a tree configured by this version says.
fn stamp_config() -> String {
    format!("config={CONFIG_VERSION}")
}

/// Whether `tree` is complete: Some(true) current, Some(false) from an older [`configure`].
fn stamp_state(tree: &Path) -> Option<bool> {
    let text = fs::read_to_string(tree.join(STAMP)).ok()?;
    Some(text.lines().any(|l| l == stamp_config()))
}

fn write_stamp(tree: &Path, mirror: &str) -> Result<(), DebianError> {
    let stamp = tree.join(STAMP);
    let text = format!(
        "{SUITE} minbase+systemd-sysv from {mirror}\n{}\n",
        stamp_config()
    );
    Ok(fs::write(&stamp, text).at(&stamp, "writing")?)
}

/// Makes `dir/rootfs` (idempotent: returns at once when the stamp is there and current; a
/// tree from an older [`configure`] is reconfigured in place, not bootstrapped again).
pub fn build(dir: &Path) -> Result<PathBuf, DebianError> {
    let tree = dir.join("rootfs");
    if stamp_state(&tree) == Some(true) {
        return Ok(tree);
    }
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(dir).at(dir, "creating")?;
    let lock_path = dir.join("build.lock");
    let lock = File::create(&lock_path).at(&lock_path, "creating")?;
    lock.lock().at(&lock_path, "locking")?;
    let mirror = std::env::var("KAIROS_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
    match stamp_state(&tree) {
        Some(true) => return Ok(tree),
        Some(false) => {
            configure(&tree)?;
            write_stamp(&tree, &mirror)?;
            return Ok(tree);
        }
        None => {}
    }
    apt::ensure_packages(PACKAGES)?;
    let tmp = dir.join("rootfs.tmp");
    remove_tree(&tmp)?;
    run_tool(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd-sysv",
                "--components=main",
            ])
            .arg(SUITE)
            .arg(&tmp)
            .arg(&mirror),
    )?;
    configure(&tmp)?;
    for (what, p) in [
        ("/lib/systemd/systemd", "lib/systemd/systemd"),
        ("/sbin/init", "sbin/init"),
    ] {
        if tmp.join(p).symlink_metadata().is_err() {
            return Err(DebianError::Incomplete { tree: tmp, what });
        }
    }
    write_stamp(&tmp, &mirror)?;
    remove_tree(&tree)?;
    fs::rename(&tmp, &tree).at(&tree, "renaming into place")?;
    Ok(tree)
}

fn remove_tree(p: &Path) -> Result<(), DebianError> {
    let is_dir = p.symlink_metadata().is_ok_and(|m| m.is_dir());
    let res = if is_dir {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
    match res {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(IoError::new(p, "removing", e).into()),
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<(), DebianError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    // Replaced, not rewritten: a read-only file (machine-id) would refuse a non-root rerun.
    if path.symlink_metadata().is_ok() {
        fs::remove_file(path).at(path, "removing")?;
    }
    fs::write(path, contents).at(path, "writing")?;
    Ok(fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .at(path, "setting permissions")?)
}

/// `link -> target`, replacing what is there.
pub fn symlink_force(target: &str, link: &Path) -> Result<(), DebianError> {
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).at(link, "removing")?;
    }
    Ok(symlink(target, link).at(link, "creating the symlink")?)
}

/// Makes the fresh tree a quiet headless node whose journal shows on the serial console.
fn configure(t: &Path) -> Result<(), DebianError> {
    for p in TRIM {
        let path = t.join(p);
        remove_tree(&path)?;
        if !path.exists() && !p.contains('.') {
            fs::create_dir_all(&path).at(&path, "creating")?;
        }
    }
    // A fixed id: with an empty one systemd treats every boot as the first (firstboot, presets).
    write(
        &t.join("etc/machine-id"),
        "4b6169726f7344656269616e31320000\n",
        0o444,
    )?;
    write(&t.join("etc/hostname"), "kairos-debian\n", 0o644)?;
    for dir in ["oem", "usr/local", "etc/cos", "var/lib/kairos"] {
        let p = t.join(dir);
        fs::create_dir_all(&p).at(&p, "creating")?;
    }
    // The image's Kairos layout is the built-in default; an empty /etc/cos keeps it that way.
    remove_tree(&t.join("etc/cos"))?;
    let units = t.join("etc/systemd/system");
    symlink_force(
        "/lib/systemd/system/multi-user.target",
        &units.join("default.target"),
    )?;
    for u in MASKED {
        symlink_force("/dev/null", &units.join(u))?;
    }
    for wants in ["timers.target.wants", "getty.target.wants"] {
        remove_tree(&units.join(wants))?;
    }
    // / is read-only on Kairos: /tmp needs its own tmpfs (Debian ships the unit, disabled).
    symlink_force("/usr/share/systemd/tmp.mount", &units.join("tmp.mount"))?;
    symlink_force(
        "/etc/systemd/system/tmp.mount",
        &units.join("local-fs.target.wants/tmp.mount"),
    )?;
    // The tests read what services print on the serial log: forward the journal there.
    write(
        &t.join("etc/systemd/journald.conf.d/10-kairos-console.conf"),
        "[Journal]\nStorage=volatile\nForwardToConsole=yes\nTTYPath=/dev/ttyS0\nMaxLevelConsole=info\n",
        0o644,
    )?;
    // A root password nobody knows is no better than none on a test node; ssh is not installed.
    write(
        &t.join("etc/systemd/system.conf.d/10-kairos.conf"),
        "[Manager]\nDefaultTimeoutStopSec=10s\nShowStatus=yes\n",
        0o644,
    )?;
    Ok(())
}

/// Copies the cached tree to `to` (replacing it), preserving owners, modes and links.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), DebianError> {
    remove_tree(to)?;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    run_tool(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(from)
            .arg(to),
    )?;
    Ok(())
}

/// Installs a systemd unit and enables it for `multi-user.target` the way `systemctl enable`
/// would for `WantedBy=multi-user.target`: a symlink in the target's `.wants` directory.
pub fn install_unit(tree: &Path, name: &str, contents: &str) -> Result<(), DebianError> {
    let units = tree.join("etc/systemd/system");
    write(&units.join(name), contents, 0o644)?;
    // Template units (name@.service) are not enabled as such; timers enable into timers.target.
    if name.contains("@.") {
        return Ok(());
    }
    let wanted_by = wanted_by(contents).unwrap_or_else(|| "multi-user.target".into());
    for target in wanted_by.split_whitespace() {
        symlink_force(
            &format!("/etc/systemd/system/{name}"),
            &units.join(format!("{target}.wants")).join(name),
        )?;
    }
    Ok(())
}

/// The `WantedBy=` of a unit's `[Install]` section.
fn wanted_by(unit: &str) -> Option<String> {
    let mut in_install = false;
    let mut out: Vec<String> = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
        } else if in_install && let Some(v) = line.strip_prefix("WantedBy=") {
            out.extend(v.split_whitespace().map(str::to_string));
        }
    }
    (!out.is_empty()).then(|| out.join(" "))
}

// ---- The same tree as a Kairos user's image: Debian's kernel installed in it ----

/// What a Debian image needs beside its kernel package to load drivers: kmod (modprobe,
/// depmod) and udev (loads the driver of each device it finds, e.g. a NIC's).
pub const KERNEL_TREE_PACKAGES: &[&str] = &["kmod", "udev"];

/// Module directories (under `lib/modules/<ver>/kernel/`) that no test node loads, removed
/// from the kernel-tree image. The full tree of Debian's kernel is ~390 MB and would be in
/// every active/passive image, the recovery squashfs and every in-guest upgrade, all slow
/// under TCG; the test nodes are QEMU machines with virtio/SATA/NVMe/USB/SD disks and a
/// virtio NIC, so graphics, sound, cameras/TV, radios, InfiniBand, staging drivers, physical
/// NICs, Fibre Channel HBAs, network filesystems and the like can go (119 MB of modules are
/// left of 390). Disk, USB, MMC, local filesystem, crypto and virtio modules stay.
pub const PRUNED_MODULES: &[&str] = &[
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/net/can",
    "drivers/net/usb",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "drivers/iio",
    "drivers/isdn",
    "drivers/hid",
    "drivers/input/touchscreen",
    "drivers/input/joystick",
    "drivers/video",
    "drivers/platform/chrome",
    "drivers/thunderbolt",
    "drivers/comedi",
    "drivers/net/phy",
    "drivers/target",
    "drivers/mtd",
    "drivers/hwmon",
    "drivers/scsi/lpfc",
    "drivers/scsi/qla2xxx",
    "drivers/scsi/qla4xxx",
    "drivers/scsi/bfa",
    "drivers/scsi/mpt3sas",
    "drivers/scsi/megaraid",
    "drivers/scsi/aic7xxx",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
    "net/netfilter",
    "net/rds",
    "net/sunrpc",
    "net/ceph",
    "net/sctp",
    "net/tipc",
    "net/rxrpc",
    "net/nfc",
    "net/batman-adv",
    "net/smc",
    "net/atm",
    "net/openvswitch",
    "fs/ocfs2",
    "fs/gfs2",
    "fs/nfs",
    "fs/nfsd",
    "fs/smb",
    "fs/ceph",
    "fs/afs",
    "fs/ubifs",
    "fs/dlm",
    "fs/nilfs2",
    "fs/reiserfs",
];

/// Bumped whenever [`build_with_kernel`] changes what goes in: a cached kernel tree with an
/// older stamp is built again (from the base tree, which stays).
const KERNEL_TREE_VERSION: u32 = 1;

/// The Debian image with its kernel (see [`cached_or_build_with_kernel`]).
#[derive(Debug, Clone)]
pub struct KernelTree {
    pub tree: PathBuf,
    /// The kernel release, e.g. "6.1.0-56-amd64".
    pub kver: String,
    /// The tree's size ([`crate::rootfs::tree_bytes`]) after pruning.
    pub bytes: u64,
}

fn kernel_stamp_config(kver: &str) -> String {
    format!(
        "{}\nkernel-tree={KERNEL_TREE_VERSION}\nkernel={kver}",
        stamp_config()
    )
}

/// The tree's size when `tree` is a complete kernel tree for `kver` built by this version.
fn kernel_stamp_bytes(tree: &Path, kver: &str) -> Option<u64> {
    let text = fs::read_to_string(tree.join(STAMP)).ok()?;
    if !text.contains(&kernel_stamp_config(kver)) {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("bytes="))
        .and_then(|b| b.parse().ok())
}

/// The cached Debian tree as a Kairos user's image has it: the base tree
/// ([`cached_or_build`]) plus kmod and udev, and the cached Debian kernel package
/// ([`crate::kernel::cached_or_fetch`]) unpacked into it (`/boot/vmlinuz-<ver>`,
/// `/boot/config-<ver>`, `/lib/modules/<ver>` with `modules.dep` from the image's own
/// depmod), minus [`PRUNED_MODULES`]. Cached in `debian-12/kernel-rootfs` (stamp + rename).
pub fn cached_or_build_with_kernel() -> Result<KernelTree, DebianError> {
    let base = cached_or_build()?;
    let kernel = crate::kernel::cached_or_fetch()?;
    build_with_kernel(&default_dir(), &base, &kernel)
}

static KERNEL_BUILD: Mutex<()> = Mutex::new(());

/// Makes `dir/kernel-rootfs` from `base` and `kernel` (idempotent, like [`build`]).
pub fn build_with_kernel(
    dir: &Path,
    base: &Path,
    kernel: &Kernel,
) -> Result<KernelTree, DebianError> {
    let tree = dir.join("kernel-rootfs");
    let kver = kernel.version.clone();
    let done = |bytes| KernelTree {
        tree: tree.clone(),
        kver: kver.clone(),
        bytes,
    };
    if let Some(bytes) = kernel_stamp_bytes(&tree, &kver) {
        return Ok(done(bytes));
    }
    let _guard = KERNEL_BUILD.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(dir).at(dir, "creating")?;
    let lock_path = dir.join("kernel-build.lock");
    let lock = File::create(&lock_path).at(&lock_path, "creating")?;
    lock.lock().at(&lock_path, "locking")?;
    if let Some(bytes) = kernel_stamp_bytes(&tree, &kver) {
        return Ok(done(bytes));
    }
    let tmp = dir.join("kernel-rootfs.tmp");
    copy_tree(base, &tmp)?;
    install_debs(&tmp, &dir.join("kernel-debs"), KERNEL_TREE_PACKAGES)?;

    // The package's files as dpkg would put them (the cache holds the unpacked .deb).
    let boot = tmp.join("boot");
    fs::create_dir_all(&boot).at(&boot, "creating")?;
    // `cached_or_fetch` keeps the package tree in `root/` beside its `vmlinuz`.
    let pkg_boot = kernel
        .vmlinuz
        .parent()
        .map(|out| out.join("root/boot"))
        .unwrap_or_default();
    for name in ["vmlinuz", "config", "System.map"] {
        let from = pkg_boot.join(format!("{name}-{kver}"));
        if from.is_file() {
            let to = boot.join(format!("{name}-{kver}"));
            fs::copy(&from, &to).at(&from, format!("copying to {}", to.display()))?;
        }
    }
    let vmlinuz = boot.join(format!("vmlinuz-{kver}"));
    if !vmlinuz.is_file() {
        fs::copy(&kernel.vmlinuz, &vmlinuz)
            .at(&kernel.vmlinuz, format!("copying to {}", vmlinuz.display()))?;
    }
    let modules = tmp.join("lib/modules");
    fs::create_dir_all(&modules).at(&modules, "creating")?;
    run_tool(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&kernel.modules_dir)
            .arg(modules.join(&kver)),
    )?;
    for p in PRUNED_MODULES {
        remove_tree(&modules.join(&kver).join("kernel").join(p))?;
    }
    // The image's own depmod (kmod), as the package's postinst runs it.
    run_tool(
        Command::new("chroot")
            .arg(&tmp)
            .args(["depmod", "-a", &kver])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    )?;
    for (what, p) in [
        ("modules.dep", format!("lib/modules/{kver}/modules.dep")),
        ("udevadm (udev)", "bin/udevadm".to_string()),
        ("modprobe (kmod)", "sbin/modprobe".to_string()),
    ] {
        if tmp.join(&p).symlink_metadata().is_err() {
            return Err(DebianError::Incomplete { tree: tmp, what });
        }
    }
    let bytes = crate::rootfs::tree_bytes(&tmp)?;
    let stamp = tmp.join(STAMP);
    let text = format!(
        "{SUITE} minbase+systemd-sysv+{} with {kver}\n{}\nbytes={bytes}\n",
        KERNEL_TREE_PACKAGES.join("+"),
        kernel_stamp_config(&kver)
    );
    fs::write(&stamp, text).at(&stamp, "writing")?;
    remove_tree(&tree)?;
    fs::rename(&tmp, &tree).at(&tree, "renaming into place")?;
    Ok(done(bytes))
}

/// Installs `packages` and what they need into `tree` with the host's apt (same suite:
/// bookworm) choosing against the tree's own dpkg status, and dpkg running their maintainer
/// scripts chrooted in the tree, as an `apt-get install` inside it would.
fn install_debs(tree: &Path, debs: &Path, packages: &[&str]) -> Result<(), DebianError> {
    remove_tree(debs)?;
    let partial = debs.join("partial");
    fs::create_dir_all(&partial).at(&partial, "creating")?;
    let status = tree.join("var/lib/dpkg/status");
    let download = || {
        run_tool(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .arg("-o")
                .arg(format!("Dir::State::status={}", status.display()))
                .arg("-o")
                .arg(format!("Dir::Cache::archives={}", debs.display()))
                .args([
                    "-o",
                    "Debug::NoLocking=1",
                    "-q",
                    "-y",
                    "--no-install-recommends",
                    "--download-only",
                    "install",
                ])
                .args(packages),
        )
    };
    if download().is_err() {
        // Empty or stale package lists on a fresh machine.
        apt::update_once()?;
        download()?;
    }
    let mut files: Vec<PathBuf> = fs::read_dir(debs)
        .at(debs, "reading the directory")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    files.sort();
    if !files.is_empty() {
        run_tool(
            Command::new("dpkg")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .arg(format!("--root={}", tree.display()))
                .args(["--force-unsafe-io", "-i"])
                .args(&files),
        )?;
    }
    remove_tree(debs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_by_reads_install_section() {
        let u = "[Unit]\nWantedBy=nope\n[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target sysinit.target\n";
        assert_eq!(
            wanted_by(u).as_deref(),
            Some("multi-user.target sysinit.target")
        );
        assert_eq!(wanted_by("[Service]\nExecStart=/x\n"), None);
    }

    #[test]
    fn configure_is_idempotent_and_quiet() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        fs::create_dir_all(t.join("usr/share/doc/pkg")).unwrap();
        fs::create_dir_all(t.join("etc/systemd/system/timers.target.wants")).unwrap();
        fs::create_dir_all(t.join("var/cache/debconf")).unwrap();
        fs::write(t.join("var/cache/debconf/templates.dat-old"), b"x").unwrap();
        for _ in 0..2 {
            configure(t).unwrap();
        }
        let u = t.join("etc/systemd/system");
        assert_eq!(
            fs::read_link(u.join("default.target")).unwrap(),
            Path::new("/lib/systemd/system/multi-user.target")
        );
        for m in MASKED {
            assert_eq!(fs::read_link(u.join(m)).unwrap(), Path::new("/dev/null"));
        }
        assert!(
            u.join("local-fs.target.wants/tmp.mount")
                .symlink_metadata()
                .is_ok()
        );
        assert!(!u.join("timers.target.wants").exists());
        assert!(!t.join("usr/share/doc/pkg").exists());
        assert!(!t.join("var/cache/debconf/templates.dat-old").exists());
        assert_eq!(
            fs::read_to_string(t.join("etc/machine-id")).unwrap().len(),
            33
        );
        assert!(t.join("oem").is_dir() && !t.join("etc/cos").exists());
        assert_eq!(stamp_state(t), None);
        write_stamp(t, "http://mirror").unwrap();
        assert_eq!(stamp_state(t), Some(true));
        fs::write(t.join(STAMP), "bookworm\nconfig=1\n").unwrap();
        assert_eq!(stamp_state(t), Some(false));
    }

    #[test]
    fn kernel_tree_stamp_names_kernel_and_version() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        assert_eq!(kernel_stamp_bytes(t, "6.1.0-1-amd64"), None);
        let text = format!(
            "bookworm\n{}\nbytes=1234\n",
            kernel_stamp_config("6.1.0-1-amd64")
        );
        fs::write(t.join(STAMP), text).unwrap();
        assert_eq!(kernel_stamp_bytes(t, "6.1.0-1-amd64"), Some(1234));
        // Another kernel, or a tree from an older KERNEL_TREE_VERSION, is built again.
        assert_eq!(kernel_stamp_bytes(t, "6.1.0-2-amd64"), None);
        let old = format!(
            "bookworm\n{}\nkernel-tree=0\nkernel=6.1.0-1-amd64\nbytes=1\n",
            stamp_config()
        );
        fs::write(t.join(STAMP), old).unwrap();
        assert_eq!(kernel_stamp_bytes(t, "6.1.0-1-amd64"), None);
    }

    #[test]
    fn install_unit_enables_it() {
        let tmp = tempfile::tempdir().unwrap();
        install_unit(
            tmp.path(),
            "a.service",
            "[Service]\nExecStart=/x\n[Install]\nWantedBy=sysinit.target\n",
        )
        .unwrap();
        install_unit(tmp.path(), "b.service", "[Service]\nExecStart=/x\n").unwrap();
        let u = tmp.path().join("etc/systemd/system");
        assert_eq!(
            fs::read_link(u.join("sysinit.target.wants/a.service")).unwrap(),
            Path::new("/etc/systemd/system/a.service")
        );
        assert!(
            u.join("multi-user.target.wants/b.service")
                .symlink_metadata()
                .is_ok()
        );
    }
}
