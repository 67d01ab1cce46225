//! Live ISO support for the QEMU tests (issue 14): a Kairos-ready busybox image *tree* (the
//! `dir:` source of `kairos-build iso`), the ISO built from it by the real kairos-build
//! binary, and the QEMU arguments that attach it as a CD-ROM or a USB stick under SeaBIOS or
//! OVMF. Firmware and GRUB come from the medium: no `-kernel`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kairos_qemu::boot::BootSpec;
use kairos_qemu::rootfs::{self, RootfsOptions};

use crate::{DRIVER, agent_userland, artifacts, cargo_build_bin, generic_initramfs};

/// OVMF as one flash image (the ovmf package), given to QEMU with -bios.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// The Debian packages an ISO build and its boots need (all installed by `kairos-qemu setup`).
pub const PACKAGES: &[&str] = &[
    "xorriso",
    "squashfs-tools",
    "grub-common",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "dosfstools",
    "mtools",
    "ovmf",
];

/// Host tools `kairos-agent install` runs on a live system for a BIOS target (ELF files bring
/// their libraries): the filesystems and images, GRUB i386-pc.
pub const INSTALL_TOOLS: &[&str] = &[
    "/usr/sbin/mkfs.ext4",
    "/usr/sbin/tune2fs",
    "/usr/sbin/e2label",
    "/etc/mke2fs.conf",
    "/usr/bin/mksquashfs",
    // glibc loads it at run time for pthread_exit (mksquashfs' threads); ldd does not list it.
    "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
    "/usr/bin/grub-mkimage",
    "/usr/lib/grub/i386-pc",
];

/// What a UEFI target needs beyond [`INSTALL_TOOLS`]: GRUB x86_64-efi, mtools for the ESP
/// (mmd and mcopy are links to mtools, and mkfs.vfat: see [`uefi_links_and_mkfs`]), and
/// glibc's gconv for mtools' code page 850.
pub const UEFI_INSTALL_TOOLS: &[&str] = &[
    "/usr/lib/grub/x86_64-efi",
    "/usr/bin/mtools",
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules",
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.d",
    "/usr/lib/x86_64-linux-gnu/gconv/IBM850.so",
];

/// mkfs.vfat's real file (a link on Debian) and the (link, target) pairs for mmd and mcopy.
pub fn uefi_links_and_mkfs() -> (String, Vec<(String, String)>) {
    let mkfs_fat = std::fs::canonicalize("/usr/sbin/mkfs.vfat")
        .unwrap_or_else(|_| "/usr/sbin/mkfs.fat".into());
    let links = ["mmd", "mcopy"]
        .iter()
        .map(|t| (format!("/usr/bin/{t}"), "mtools".to_string()))
        .collect();
    (mkfs_fat.display().to_string(), links)
}

/// What a live source tree holds beyond the common parts; filled by the caller's tweak.
#[derive(Debug, Clone, Default)]
pub struct LiveTreeSpec {
    /// Extra files: (absolute path, contents, mode).
    pub image_files: Vec<(String, Vec<u8>, u32)>,
    /// Host files or directories copied in (ELF files bring their libraries).
    pub host_tools: Vec<String>,
    /// Symlinks: (absolute path, target).
    pub image_symlinks: Vec<(String, String)>,
    /// `/etc/cos/cos-layout.env`; None: none (kairos-init's defaults).
    pub layout_file: Option<String>,
    /// `/boot/initrd`; default: [`generic_initramfs`] (CD-ROM, USB storage and isofs drivers,
    /// which the harness's smaller initramfs lacks).
    pub initrd: Option<PathBuf>,
}

/// A Kairos-ready busybox image tree at `WORK/NAME.tree` (rebuilt each call), as
/// [`crate::pid1_disk`] makes its active image: kairos-init as `/sbin/init`, kairos-agent
/// (`agent_userland`), the k3s stand-in, the test driver at `/usr/libexec/kairos-test-driver`,
/// `/boot/vmlinuz` (the harness's Debian kernel) and `/boot/initrd`; plus the installer's host
/// tools ([`INSTALL_TOOLS`], [`UEFI_INSTALL_TOOLS`]) and what `tweak` adds. The driver is not started by anything in
/// the tree: a test's config does that.
pub fn live_source_tree(name: &str, tweak: impl FnOnce(&mut LiveTreeSpec)) -> PathBuf {
    let a = artifacts();
    let agent = agent_userland();
    kairos_qemu::apt::ensure_packages(PACKAGES).expect("the ISO tools (kairos-qemu setup)");
    let (mkfs_fat, links) = uefi_links_and_mkfs();
    let mut spec = LiveTreeSpec {
        host_tools: INSTALL_TOOLS
            .iter()
            .chain(UEFI_INSTALL_TOOLS)
            .map(|t| t.to_string())
            .chain([mkfs_fat])
            .collect(),
        image_symlinks: links,
        ..LiveTreeSpec::default()
    };
    tweak(&mut spec);
    let initrd = spec
        .initrd
        .clone()
        .unwrap_or_else(|| generic_initramfs().to_path_buf());

    let tree = a.work.join(format!("{name}.tree"));
    let _ = std::fs::remove_dir_all(&tree);
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        panic!("live tree {}: {what}: {e}", tree.display())
    };
    let opts = RootfsOptions {
        kernel: Some(a.kernel.vmlinuz.clone()),
        initrd: Some(initrd),
        layout_file: spec.layout_file.clone(),
    };
    rootfs::build_tree(&tree, "active", &opts).unwrap_or_else(|e| fail("busybox tree", &e));
    rootfs::install_init_binary(&tree, &a.init_binary)
        .unwrap_or_else(|e| fail("kairos-init as /sbin/init", &e));
    let mut files = vec![
        (
            "/usr/bin/k3s".to_string(),
            rootfs::K3S_STANDIN.as_bytes().to_vec(),
            0o755,
        ),
        (
            "/usr/libexec/kairos-test-driver".to_string(),
            DRIVER.as_bytes().to_vec(),
            0o755,
        ),
        (
            "/usr/bin/kairos-agent".to_string(),
            std::fs::read(&agent).unwrap_or_else(|e| fail("reading kairos-agent", &e)),
            0o755,
        ),
    ];
    files.append(&mut spec.image_files);
    for (path, data, mode) in &files {
        rootfs::add_file(&tree, path, data, *mode).unwrap_or_else(|e| fail(path, &e));
    }
    for tool in &spec.host_tools {
        rootfs::add_host_path(&tree, Path::new(tool)).unwrap_or_else(|e| fail(tool, &e));
    }
    for (path, target) in &spec.image_symlinks {
        let p = tree.join(path.trim_start_matches('/'));
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap_or_else(|e| fail(path, &e));
        }
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).unwrap_or_else(|e| fail(path, &e));
    }
    tree
}

/// The kairos-build binary (test profile), built once per test process.
pub fn kairos_build_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| cargo_build_bin("kairos-build").map_err(|e| format!("{e:#}"))) {
        Ok(p) => p.clone(),
        Err(e) => panic!("building kairos-build: {e}"),
    }
}

/// `kairos-build iso --source dir:TREE --out WORK/NAME.iso [--config FILE] EXTRA...`, which
/// must succeed; prints its output and `FIGURE iso NAME: ...` lines (size, build time).
pub fn build_iso(name: &str, tree: &Path, config: Option<&str>, extra_args: &[&str]) -> PathBuf {
    let a = artifacts();
    let out = a.work.join(format!("{name}.iso"));
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new(kairos_build_bin());
    cmd.arg("iso")
        .arg("--source")
        .arg(format!("dir:{}", tree.display()))
        .arg("--out")
        .arg(&out)
        .args(extra_args)
        .stdin(Stdio::null());
    if let Some(text) = config {
        let path = a.work.join(format!("{name}.config.yaml"));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cmd.arg("--config").arg(path);
    }
    let t = Instant::now();
    let o = cmd.output().expect("running kairos-build iso");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "--- kairos-build iso {name}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "kairos-build iso {name} failed");
    // GRUB finds its medium by this UUID: the one kairos-build put in its built-in config must
    // be the one the ISO carries.
    let said = String::from_utf8_lossy(&o.stdout);
    let uuid = said
        .split(" uuid ")
        .nth(1)
        .and_then(|r| r.split([',', ' ']).next())
        .unwrap_or_else(|| panic!("no uuid in kairos-build's summary: {said}"))
        .to_string();
    let blkid = Command::new("blkid")
        .args(["-p", "-s", "UUID", "-o", "value"])
        .arg(&out)
        .output()
        .expect("blkid");
    assert_eq!(
        String::from_utf8_lossy(&blkid.stdout).trim(),
        uuid,
        "{}: the ISO's UUID is not the one GRUB searches for",
        out.display()
    );
    let bytes = std::fs::metadata(&out)
        .unwrap_or_else(|e| panic!("{}: {e}", out.display()))
        .len();
    println!(
        "FIGURE iso {name}: {:.1} MiB, built in {secs:.1} s",
        bytes as f64 / (1 << 20) as f64
    );
    out
}

/// How the ISO file is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// An IDE CD-ROM drive (the i440fx machine's own controller).
    Cd,
    /// A USB stick (usb-storage behind an xHCI controller), the file written to it byte for byte.
    Usb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    SeaBios,
    Ovmf,
}

impl Medium {
    /// QEMU's arguments for the medium, first in the firmware's boot order (`bootindex=0`;
    /// the harness's virtio disks have none, so they come after it). Read-only: tests share
    /// one ISO file.
    pub fn qemu_args(self, iso: &Path) -> Vec<String> {
        let file = iso.to_string_lossy().replace(',', ",,");
        let args: Vec<String> = match self {
            Medium::Cd => vec![
                "-drive".into(),
                format!("if=none,id=live,media=cdrom,format=raw,readonly=on,file={file}"),
                "-device".into(),
                "ide-cd,drive=live,bootindex=0".into(),
            ],
            Medium::Usb => vec![
                "-device".into(),
                "qemu-xhci,id=xhci".into(),
                "-drive".into(),
                format!("if=none,id=live,format=raw,readonly=on,file={file}"),
                "-device".into(),
                "usb-storage,bus=xhci.0,drive=live,bootindex=0".into(),
            ],
        };
        args
    }
}

impl Firmware {
    pub fn qemu_args(self) -> Vec<String> {
        match self {
            Firmware::SeaBios => Vec::new(),
            Firmware::Ovmf => vec!["-bios".into(), OVMF.into()],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Firmware::SeaBios => "seabios",
            Firmware::Ovmf => "ovmf",
        }
    }
}

/// A boot of `iso` on `medium` under `firmware`, with `disks` (virtio, booted after the
/// medium) attached: 1 GiB, the serial log at `WORK/NAME.log`, ending at one of `until`, a
/// power-off or `timeout_s`.
pub fn live_boot_spec(
    name: &str,
    iso: &Path,
    medium: Medium,
    firmware: Firmware,
    disks: &[&Path],
    until: &[&str],
    timeout_s: u64,
) -> BootSpec {
    let a = artifacts();
    let mut s = BootSpec::new(a.work.join(format!("{name}.log")));
    s.disks = disks.iter().map(|d| d.to_path_buf()).collect();
    s.memory_mb = 1024;
    s.kvm = std::env::var_os("KAIROS_KVM").is_some();
    s.until = until.iter().map(|u| u.to_string()).collect();
    s.timeout = Duration::from_secs(timeout_s);
    s.extra_args = firmware.qemu_args();
    s.extra_args.extend(medium.qemu_args(iso));
    s
}
