//! `kairos-build iso`: a live installer ISO from a Kairos-ready image, one hybrid file that
//! boots as a CD and as a USB stick, under BIOS and UEFI, built with Debian's GRUB and xorriso
//! tools and no mounts (root only when the source needs it, e.g. an OCI image with device
//! nodes).
//!
//! What the ISO holds (the layout of upstream Kairos ISOs):
//! - `/rootfs.squashfs`: the image's root tree (xz, which GRUB's squash4 also reads), booted
//!   read-only by kairos-init with `root=live:CDLABEL=<label>`;
//! - `/boot/kernel`, `/boot/initrd`: the image's `/boot/vmlinuz` and `/boot/initrd`;
//! - `/boot/grub2/grub.cfg`: the menu ([`kairos_init::grubcfg::live_grub_cfg`]);
//! - `/config.yaml` (mode 0600): the `--config`; kairos-init mounts the medium at
//!   `/run/initramfs/live`, where the agent reads cloud-configs first (SPEC §6);
//! - `/boot/grub2/eltorito.img`: GRUB for BIOS (`grub-mkimage -O i386-pc-eltorito`: cdboot.img
//!   and a core with every module the menu needs), the El Torito boot image of a CD; the MBR
//!   (GRUB's boot_hybrid.img) starts the same core when the file is a USB stick;
//! - `/boot/grub2/efiboot.img`: a FAT image holding `EFI/BOOT/BOOTX64.EFI` (GRUB for UEFI),
//!   the El Torito EFI image of a CD and, through the GPT xorriso writes, the ESP of a USB
//!   stick; `/EFI/BOOT/BOOTX64.EFI` is in the ISO tree too.
//!
//! Both GRUBs carry a small built-in configuration ([`kairos_init::grubcfg::live_early_cfg`])
//! that finds the medium by the ISO's UUID (the modification date given to xorriso), by its
//! label when no filesystem has that UUID, and reads `/boot/grub2/grub.cfg` from it.
//!
//! 1. checks that write nothing: the label, `--config`, the tools and GRUB's files, the
//!    output's directory; the source resolved (an OCI image pulled and unpacked into the work
//!    directory), its kernel and initrd;
//! 2. the ISO tree in the work directory: squashfs, kernel, initrd, GRUB images, grub.cfg,
//!    config;
//! 3. `xorriso` writes `OUT.partial`, renamed to OUT. On any error the partial file is
//!    removed: nothing is left at OUT.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kairos_agent::Ctx;
use kairos_agent::install::efi::{self, GRUB_X86_64_EFI};
use kairos_agent::install::{GRUB_I386_PC, InstallError};
use kairos_agent::upgrade::UpgradeError;
use kairos_agent::upgrade::image;
use kairos_init::grubbios::BIOS_PLATFORM_MODULES;
use kairos_init::grubcfg::{self, CFG_MODULES, EFI_PLATFORM_MODULES, LIVE_MODULES};
use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::checks::{self, CheckError, Ready};
use crate::cli::IsoArgs;
use crate::raw::{Partial, with_suffix};
use crate::{WorkDir, find_tool};

const MIB: u64 = 1 << 20;
/// Paths in the ISO tree (relative to its root).
pub const ELTORITO_IMG: &str = "boot/grub2/eltorito.img";
pub const EFIBOOT_IMG: &str = "boot/grub2/efiboot.img";
pub const CONFIG_FILE: &str = "config.yaml";
const BOOTX64: &str = "EFI/BOOT/BOOTX64.EFI";

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("--label {label:?}: {why}; nothing was written")]
    Label { label: String, why: String },
    #[error("{tool} is needed for {why} and is not installed ({package}); nothing was written")]
    Tool {
        tool: &'static str,
        package: &'static str,
        why: &'static str,
    },
    #[error("{}: {what} ({package}); nothing was written", dir.display())]
    Grub {
        dir: PathBuf,
        what: String,
        package: &'static str,
    },
    #[error("SOURCE_DATE_EPOCH={given:?}: not a number of seconds; nothing was written")]
    Date { given: String },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    #[error(transparent)]
    Work(#[from] crate::WorkError),
    #[error(transparent)]
    Check(#[from] CheckError),
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct IsoReport {
    pub out: PathBuf,
    pub label: String,
    /// The ISO's UUID as GRUB and blkid show it (`YYYY-MM-DD-hh-mm-ss-cc`).
    pub uuid: String,
    pub bytes: u64,
    pub squashfs_bytes: u64,
    /// Kernel and initramfs together.
    pub boot_bytes: u64,
    pub config: bool,
    pub seconds: f64,
}

/// The ISO's timestamp for `ms` since the epoch (UTC): xorriso's `--modification-date`
/// (`YYYYMMDDhhmmsscc`) and the UUID it gives the filesystem (`YYYY-MM-DD-hh-mm-ss-cc`),
/// which GRUB's `search --fs-uuid` and blkid report.
pub fn iso_stamp(ms: u64) -> (String, String) {
    // "YYYY-MM-DDThh:mm:ss.mmmZ"
    let t = kairos_util::time::rfc3339(ms);
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    let (ymdhms, _) = digits.split_at(14.min(digits.len()));
    let cc = format!("{:02}", (ms % 1000) / 10);
    let date = format!("{ymdhms}{cc}");
    let p = |a: usize, b: usize| date.get(a..b).unwrap_or("00");
    let uuid = format!(
        "{}-{}-{}-{}-{}-{}-{}",
        p(0, 4),
        p(4, 6),
        p(6, 8),
        p(8, 10),
        p(10, 12),
        p(12, 14),
        p(14, 16)
    );
    (date, uuid)
}

/// The build's time: `SOURCE_DATE_EPOCH` (seconds; reproducible builds) when set, else now.
fn build_time_ms() -> Result<u64, IsoError> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse::<u64>()
            .ok()
            .and_then(|secs| secs.checked_mul(1000))
            .ok_or(IsoError::Date { given: s }),
        _ => Ok(kairos_util::time::now_ms()),
    }
}

/// xorriso's arguments for the hybrid image, as grub-mkrescue makes it (without its HFS+
/// for Macs): the El Torito BIOS image with GRUB's boot info patched in, GRUB's hybrid MBR
/// (`boot_hybrid_img`) for USB sticks, the EFI image both as an El Torito entry and as a GPT
/// partition (the ESP of a stick), a protective MBR partition table; Rock Ridge with modes
/// kept (config.yaml stays 0600) and every file owned by root; ISO level 3 for a squashfs
/// past 4 GiB.
pub fn xorriso_args(
    label: &str,
    date: &str,
    boot_hybrid_img: &Path,
    tree: &Path,
    out: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = [
        "-as",
        "mkisofs",
        "-V",
        label,
        &format!("--modification-date={date}"),
        "-R",
        "-uid",
        "0",
        "-gid",
        "0",
        "-iso-level",
        "3",
        "-b",
        ELTORITO_IMG,
        "-no-emul-boot",
        "-boot-load-size",
        "4",
        "-boot-info-table",
        "--grub2-boot-info",
        "--grub2-mbr",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    a.push(boot_hybrid_img.into());
    a.extend(
        [
            "--efi-boot",
            EFIBOOT_IMG,
            "-efi-boot-part",
            "--efi-boot-image",
            "--protective-msdos-label",
            "-o",
        ]
        .map(OsString::from),
    );
    a.push(out.into());
    a.push(tree.into());
    a
}

/// The tools of an ISO build, found before anything is written.
struct Tools {
    xorriso: PathBuf,
    mkimage: PathBuf,
    mkfs_vfat: PathBuf,
    mmd: PathBuf,
    mcopy: PathBuf,
}

fn tools() -> Result<Tools, IsoError> {
    let need = |names: &[&str], tool, package, why| {
        find_tool(names).ok_or(IsoError::Tool { tool, package, why })
    };
    let xorriso = need(&["xorriso"], "xorriso", "xorriso", "the ISO image")?;
    need(
        &["mksquashfs"],
        "mksquashfs",
        "squashfs-tools",
        "the root filesystem",
    )?;
    let mkimage = need(
        &["grub-mkimage"],
        "grub-mkimage",
        "grub-common",
        "GRUB's boot images",
    )?;
    // The installer's ESP tools: one list, in `efi::tools`.
    let esp = efi::tools().map_err(|m| IsoError::Tool {
        tool: m.tool,
        package: m.package,
        why: "the EFI boot image",
    })?;
    Ok(Tools {
        xorriso,
        mkimage,
        mkfs_vfat: esp.mkfs,
        mmd: esp.mmd,
        mcopy: esp.mcopy,
    })
}

fn grub_dirs() -> Result<(PathBuf, PathBuf), IsoError> {
    let bios = PathBuf::from(GRUB_I386_PC);
    for f in ["cdboot.img", "boot_hybrid.img", "kernel.img", "normal.mod"] {
        if !bios.join(f).is_file() {
            return Err(IsoError::Grub {
                dir: bios,
                what: format!("no {f}: GRUB for BIOS is not installed"),
                package: "grub-pc-bin",
            });
        }
    }
    let uefi = PathBuf::from(GRUB_X86_64_EFI);
    if !efi::is_grub_efi_dir(&uefi) {
        return Err(IsoError::Grub {
            dir: uefi,
            what: "GRUB for UEFI is not installed".into(),
            package: "grub-efi-amd64-bin",
        });
    }
    Ok((bios, uefi))
}

/// The checks that write nothing, in the order the CLI reports them.
fn check_args(args: &IsoArgs) -> Result<Option<Vec<u8>>, IsoError> {
    grubcfg::check_live_label(&args.label).map_err(|why| IsoError::Label {
        label: args.label.clone(),
        why,
    })?;
    let config = checks::read_config(args.config.as_deref())?;
    checks::check_out(&args.out)?;
    Ok(config)
}

fn mkdir(p: &Path) -> Result<(), IsoError> {
    std::fs::create_dir_all(p).at(p, "creating")?;
    Ok(())
}

fn write_mode(p: &Path, data: &[u8], mode: u32) -> Result<(), IsoError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, data).at(p, "writing")?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).at(p, "chmod")?;
    Ok(())
}

fn copy_mode(from: &Path, to: &Path, mode: u32) -> Result<u64, IsoError> {
    use std::os::unix::fs::PermissionsExt;
    let n = std::fs::copy(from, to).at(from, "copying")?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).at(to, "chmod")?;
    Ok(n)
}

/// `grub-mkimage` for `format` from `dir` with `early` built in.
fn mkimage(
    t: &Tools,
    format: &str,
    dir: &Path,
    modules: &[&str],
    early: &Path,
    out: &Path,
) -> Result<(), IsoError> {
    run_tool(
        Command::new(&t.mkimage)
            .args(["-O", format, "-d"])
            .arg(dir)
            .args(["-p", grubcfg::LIVE_GRUB_DIR, "-c"])
            .arg(early)
            .arg("-o")
            .arg(out)
            .args(modules),
    )?;
    Ok(())
}

/// The FAT image holding `EFI/BOOT/BOOTX64.EFI`: BOOTX64.EFI's size plus room for FAT's
/// tables, made with mkfs.vfat and mtools (no mount).
fn efi_image(t: &Tools, bootx64: &Path, out: &Path) -> Result<(), IsoError> {
    let len = std::fs::metadata(bootx64).at(bootx64, "reading")?.len();
    let kib = (len / 1024 + 512).div_ceil(1024) * 1024;
    std::fs::File::create(out)
        .and_then(|f| f.set_len(kib * 1024))
        .at(out, "creating")?;
    run_tool(Command::new(&t.mkfs_vfat).arg(out))?;
    run_tool(
        Command::new(&t.mmd)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(out)
            .args(["::/EFI", "::/EFI/BOOT"]),
    )?;
    run_tool(
        Command::new(&t.mcopy)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(out)
            .arg(bootx64)
            .arg(format!("::/{BOOTX64}")),
    )?;
    Ok(())
}

pub fn run(args: &IsoArgs, log: &mut dyn Write) -> Result<IsoReport, IsoError> {
    let started = Instant::now();
    // 1. Checks that write nothing.
    let config = check_args(args)?;
    let tools = tools()?;
    let (bios_dir, efi_dir) = grub_dirs()?;
    let (date, uuid) = iso_stamp(build_time_ms()?);
    if let Some(c) = &config
        && !kairos_agent::config::HEADERS.iter().any(|h| {
            String::from_utf8_lossy(c)
                .lines()
                .take(10)
                .any(|l| l.trim() == *h)
        })
    {
        writeln!(
            log,
            "kairos-build: warning: --config has no #cloud-config header in its first lines: the agent will ignore it"
        )
        .ok();
    }
    let work = WorkDir::new(args.work_dir.as_deref(), "iso")?;
    let ctx = Ctx::new("/", "/oem/grubenv");
    let Ready {
        src,
        tree,
        kernel_files,
    } = checks::ready_source::<IsoError>(
        &ctx,
        &args.source,
        work.path(),
        "the live system boots",
        log,
    )?;
    if !rustix::process::geteuid().is_root() {
        writeln!(
            log,
            "kairos-build: note: not root: files this user cannot read fail the squashfs, and owners are recorded as this user sees them"
        )
        .ok();
    }

    // 2. The ISO tree.
    let iso = work.path().join("iso");
    let grub_dir = iso.join(grubcfg::LIVE_GRUB_DIR.trim_start_matches('/'));
    mkdir(&grub_dir)?;
    mkdir(&iso.join("EFI/BOOT"))?;
    writeln!(
        log,
        "kairos-build: squashfs of {} ({} MiB of files)",
        src.origin,
        src.image_size.div_ceil(MIB)
    )
    .ok();
    let sq = iso.join(grubcfg::LIVE_SQUASHFS);
    image::mksquashfs(&tree, &sq)?;
    let squashfs_bytes = std::fs::metadata(&sq).at(&sq, "reading")?.len();
    let mut boot_bytes = 0;
    for (from, to) in kernel_files
        .iter()
        .zip([grubcfg::LIVE_KERNEL, grubcfg::LIVE_INITRD])
    {
        boot_bytes += copy_mode(from, &iso.join(to.trim_start_matches('/')), 0o644)?;
    }
    drop(src);
    let cfg = grubcfg::live_grub_cfg(&grubcfg::LiveCfgOptions {
        label: args.label.clone(),
        timeout: args.grub_timeout,
        extra_cmdline: args.cmdline.clone().unwrap_or_default(),
    });
    write_mode(&grub_dir.join("grub.cfg"), cfg.as_bytes(), 0o644)?;
    if let Some(c) = &config {
        // Cloud-configs carry tokens and passwords: root only, as the installer writes them.
        write_mode(&iso.join(CONFIG_FILE), c, 0o600)?;
    }
    writeln!(log, "kairos-build: GRUB for BIOS and UEFI").ok();
    let scratch = work.path().join("grub");
    mkdir(&scratch)?;
    let early = scratch.join("early.cfg");
    write_mode(
        &early,
        grubcfg::live_early_cfg(&uuid, &args.label).as_bytes(),
        0o644,
    )?;
    let bios_modules = grubcfg::modules_in(
        &bios_dir,
        &[BIOS_PLATFORM_MODULES, CFG_MODULES, LIVE_MODULES],
    );
    mkimage(
        &tools,
        "i386-pc-eltorito",
        &bios_dir,
        &bios_modules,
        &early,
        &iso.join(ELTORITO_IMG),
    )?;
    let efi_modules =
        grubcfg::modules_in(&efi_dir, &[EFI_PLATFORM_MODULES, CFG_MODULES, LIVE_MODULES]);
    let bootx64 = iso.join(BOOTX64);
    mkimage(
        &tools,
        "x86_64-efi",
        &efi_dir,
        &efi_modules,
        &early,
        &bootx64,
    )?;
    efi_image(&tools, &bootx64, &iso.join(EFIBOOT_IMG))?;

    // 3. The image.
    writeln!(
        log,
        "kairos-build: xorriso (label {}, uuid {uuid})",
        args.label
    )
    .ok();
    let partial_path = with_suffix(&args.out, ".partial");
    let partial = Partial(vec![partial_path.clone()]);
    let _ = std::fs::remove_file(&partial_path);
    run_tool(Command::new(&tools.xorriso).args(xorriso_args(
        &args.label,
        &date,
        &bios_dir.join("boot_hybrid.img"),
        &iso,
        &partial_path,
    )))?;
    std::fs::rename(&partial_path, &args.out).at(&args.out, "renaming the ISO to")?;
    drop(partial);
    let bytes = std::fs::metadata(&args.out).at(&args.out, "reading")?.len();
    Ok(IsoReport {
        out: args.out.clone(),
        label: args.label.clone(),
        uuid,
        bytes,
        squashfs_bytes,
        boot_bytes,
        config: config.is_some(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The report as the CLI prints it.
pub fn summary(r: &IsoReport) -> String {
    let mib = |b: u64| b as f64 / MIB as f64;
    format!(
        "kairos-build: wrote {} (ISO 9660 {} uuid {}, {:.1} MiB: rootfs.squashfs {:.1} MiB, kernel and initrd {:.1} MiB, {}) in {:.1} s",
        r.out.display(),
        r.label,
        r.uuid,
        mib(r.bytes),
        mib(r.squashfs_bytes),
        mib(r.boot_bytes),
        if r.config { "config.yaml" } else { "no config" },
        r.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_xorriso_s_date_and_grub_s_uuid() {
        // 2026-12-07T02:50:40.123Z
        let ms = 1_796_611_840_123;
        assert_eq!(
            iso_stamp(ms),
            ("2026120702504012".into(), "2026-12-07-02-50-40-12".into())
        );
        assert_eq!(iso_stamp(0).1, "1970-01-01-00-00-00-00");
    }

    #[test]
    fn xorriso_makes_the_hybrid_grub_mkrescue_does() {
        let a = xorriso_args(
            "COS_LIVE",
            "2026120702504012",
            Path::new("/usr/lib/grub/i386-pc/boot_hybrid.img"),
            Path::new("/w/iso"),
            Path::new("/o/k.iso.partial"),
        );
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            a.join(" "),
            "-as mkisofs -V COS_LIVE --modification-date=2026120702504012 -R -uid 0 -gid 0 -iso-level 3 \
             -b boot/grub2/eltorito.img -no-emul-boot -boot-load-size 4 -boot-info-table --grub2-boot-info \
             --grub2-mbr /usr/lib/grub/i386-pc/boot_hybrid.img \
             --efi-boot boot/grub2/efiboot.img -efi-boot-part --efi-boot-image --protective-msdos-label \
             -o /o/k.iso.partial /w/iso"
        );
        // Rock Ridge keeps modes (config.yaml 0600): never -r, which resets them.
        assert!(!a.contains(&"-r".to_string()));
    }

    fn args(dir: &Path, source: &str) -> IsoArgs {
        IsoArgs {
            source: source.into(),
            out: dir.join("out/k.iso"),
            config: None,
            label: "COS_LIVE".into(),
            cmdline: None,
            grub_timeout: 5,
            work_dir: Some(dir.to_path_buf()),
        }
    }

    fn nothing_written(dir: &Path) {
        let out = dir.join("out");
        let left: Vec<_> = std::fs::read_dir(&out)
            .expect("out dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let work: Vec<_> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "out" && n != "src")
            .collect();
        assert!(work.is_empty(), "work dirs left: {work:?}");
    }

    #[test]
    fn refusals_name_the_problem_and_write_nothing() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("out")).expect("mkdir");
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("etc")).expect("mkdir");
        let source = format!("dir:{}", src.display());
        let mut log = Vec::new();

        let mut a = args(t.path(), &source);
        a.label = "cos-live".into();
        let e = run(&a, &mut log).unwrap_err();
        assert!(matches!(e, IsoError::Label { .. }), "{e}");
        assert!(e.to_string().contains("--label \"cos-live\""), "{e}");
        nothing_written(t.path());

        let mut a = args(t.path(), &source);
        a.config = Some(t.path().join("no-such.yaml"));
        let e = run(&a, &mut log).unwrap_err();
        assert!(
            e.to_string().contains("no-such.yaml: cannot read it"),
            "{e}"
        );
        nothing_written(t.path());

        let mut a = args(t.path(), &source);
        a.out = t.path().join("missing-dir/k.iso");
        let e = run(&a, &mut log).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        nothing_written(t.path());

        // Needs the tools (the kernel check comes after them).
        if tools().is_err() || grub_dirs().is_err() {
            panic!(
                "xorriso, squashfs-tools, GRUB (i386-pc, x86_64-efi), dosfstools or mtools not installed (`kairos-qemu setup` installs them): a test that cannot run fails, it never passes"
            );
        }
        let e = run(&args(t.path(), &source), &mut log).unwrap_err();
        assert!(
            e.to_string()
                .contains("the image has no /boot/vmlinuz (the kernel and initramfs"),
            "{e}"
        );
        nothing_written(t.path());
    }
}
