//! `kairos-build raw`: a ready-to-boot disk image with the same GPT, labels, images and GRUB
//! as `kairos-agent install`, made by the installer's own phases on a loop device over a
//! sparse file.
//!
//! 1. checks that write nothing: `--size`, `--config`, root, qemu-img for qcow2, the output's
//!    directory; the source resolved (an OCI image pulled and unpacked into the work
//!    directory, so its size is exact), a kernel and initrd in it, GRUB for the firmware;
//!    the disk's size against what the images need;
//! 2. `OUT.partial`: a sparse file on a loop device, then the install phases: GPT, ext4s,
//!    active/passive/recovery, GRUB's files, grubenv, the config (0600), boot code;
//! 3. the loop device's partitions removed and the device detached, then the file renamed
//!    to OUT, or converted to qcow2 by `qemu-img convert` first.
//!
//! On any error the partial files are removed: nothing is left at OUT.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kairos_agent::Ctx;
use kairos_agent::install::efi::Firmware;
use kairos_agent::install::{self, InstallError, device};
use kairos_agent::progress::Progress;
use kairos_agent::upgrade::{self, rotate::Booted};
use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::checks::{self, CheckError, Ready};
use crate::cli::{Format, RawArgs, RawFirmware};
use crate::{WorkDir, find_tool};

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("--size {given:?}: {what}; nothing was written")]
    Size { given: String, what: String },
    #[error(
        "--size {given}: {size_mib} MiB is smaller than the {needed_mib} MiB this source needs (boot {boot} + oem {oem} + recovery {recovery} + state {state} + persistent {persistent} MiB and the partition tables); nothing was written"
    )]
    TooSmall {
        given: String,
        size_mib: u64,
        needed_mib: u64,
        boot: u64,
        oem: u64,
        recovery: u64,
        state: u64,
        persistent: u64,
    },
    #[error("kairos-build raw needs root (loop devices, mkfs, mounts); nothing was written")]
    NotRoot,
    #[error("{tool} is needed for {why} and is not installed ({package}); nothing was written")]
    Tool {
        tool: &'static str,
        package: &'static str,
        why: &'static str,
    },
    #[error("{}: attaching a loop device: {err}", file.display())]
    Loop { file: PathBuf, err: String },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Work(#[from] crate::WorkError),
    #[error(transparent)]
    Check(#[from] CheckError),
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct RawReport {
    pub out: PathBuf,
    pub format: Format,
    /// The disk's size (what it is when written to a device; qcow2 files are smaller).
    pub disk_bytes: u64,
    /// The file's size on the host filesystem (allocated blocks).
    pub file_bytes: u64,
    /// (GPT name, MiB) of each partition.
    pub partitions: Vec<(String, u64)>,
    pub seconds: f64,
}

/// `SIZE` with an optional K, M, G, T suffix (powers of 1024; `MiB`, `GB` and the like read
/// the same), rounded up to whole MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number with an optional K, M, G or T suffix".to_string())?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown unit {other:?} (K, M, G or T)")),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "too large".to_string())?;
    if bytes == 0 {
        return Err("must be more than 0".into());
    }
    Ok(bytes.div_ceil(MIB) * MIB)
}

fn firmware(f: RawFirmware) -> Firmware {
    match f {
        RawFirmware::Bios => Firmware::Bios,
        RawFirmware::Efi => Firmware::Efi,
        RawFirmware::Hybrid => Firmware::Hybrid,
    }
}

/// `path` with `suffix` added to its file name.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Files removed on drop unless kept: the partial outputs of a failed build.
pub(crate) struct Partial(pub(crate) Vec<PathBuf>);

impl Drop for Partial {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn run(args: &RawArgs, log: &mut dyn Write) -> Result<RawReport, RawError> {
    let started = Instant::now();
    // 1. Checks that write nothing.
    let size = args
        .size
        .as_deref()
        .map(|s| {
            parse_size(s).map_err(|what| RawError::Size {
                given: s.into(),
                what,
            })
        })
        .transpose()?;
    let config_text = checks::read_config(args.config.as_deref())?;
    // The config's install block: grub_options and the custom mounts go to COS_OEM as an
    // install writes them; the layout keys are an install's (a raw image has the built-in
    // layout, COS_PERSISTENT grown to the disk at first boot).
    let install_block = config_text
        .as_deref()
        .and_then(|b| {
            kairos_agent::config::parse("--config", &String::from_utf8_lossy(b), false)
                .ok()
                .flatten()
        })
        .and_then(|s| s.config.install)
        .unwrap_or_default();
    let grubenv = install::install_grubenv(
        &install_block.grub_options,
        install_block.grub_entry_name.as_deref(),
    )?;
    let custom_mounts = install::custom_mounts_config(&install_block)?;
    if install_block.partitions.is_some()
        || !install_block.extra_partitions.is_empty()
        || install_block.no_format
    {
        writeln!(
            log,
            "kairos-build: warning: install.partitions, install.extra-partitions and install.no-format are applied by kairos-agent install, not here: a raw image has the built-in layout (COS_PERSISTENT grows to the disk at first boot)"
        )
        .ok();
    }
    if !rustix::process::geteuid().is_root() {
        return Err(RawError::NotRoot);
    }
    let qemu_img = match args.format {
        Format::Qcow2 => Some(find_tool(&["qemu-img"]).ok_or(RawError::Tool {
            tool: "qemu-img",
            package: "qemu-utils",
            why: "--format qcow2",
        })?),
        Format::Raw => None,
    };
    checks::check_out(&args.out)?;
    let work = WorkDir::new(args.work_dir.as_deref(), "raw")?;
    let ctx = Ctx::new("/", "/oem/grubenv");
    // The same check an upgrade makes (kairos-agent's image.rs).
    let Ready { mut src, .. } =
        checks::ready_source::<RawError>(&ctx, &args.source, work.path(), "GRUB boots", log)?;
    let fw = firmware(args.firmware);
    let boot = install::find_boot_code(&ctx, fw, None, &src, &args.out)?;
    let s = install::sizes(src.image_size, fw);
    let needed = install::needed_mib(&s) * MIB;
    let disk_bytes = size.unwrap_or(needed);
    if disk_bytes < needed {
        return Err(RawError::TooSmall {
            given: args.size.clone().unwrap_or_default(),
            size_mib: disk_bytes / MIB,
            needed_mib: needed / MIB,
            boot: s.boot,
            oem: s.oem,
            recovery: s.recovery,
            state: s.state,
            persistent: s.persistent_min,
        });
    }
    let parts = install::layout(disk_bytes, &s, fw).ok_or_else(|| RawError::Size {
        given: args.size.clone().unwrap_or_default(),
        what: "too small for the layout".into(),
    })?;
    writeln!(
        log,
        "kairos-build: {} MiB disk for {} (image {} MiB, firmware {:?})",
        disk_bytes / MIB,
        src.origin,
        src.image_size.div_ceil(MIB),
        args.firmware
    )
    .ok();

    // 2. The disk, by the installer's phases.
    let partial_raw = with_suffix(&args.out, ".partial");
    let mut partial = Partial(vec![partial_raw.clone()]);
    std::fs::File::create(&partial_raw)
        .and_then(|f| f.set_len(disk_bytes))
        .at(&partial_raw, "creating")?;
    let lo =
        kairos_init::sys::loopdev::attach(Path::new("/dev"), &partial_raw, false).map_err(|e| {
            RawError::Loop {
                file: partial_raw.clone(),
                err: e.to_string(),
            }
        })?;
    let disk = device::inspect(&ctx, &lo.path, false)?;
    let built = (|| -> Result<(), RawError> {
        let mut p = Progress::new("install", 7);
        p.step("writing the partition table", log);
        let nodes = install::write_partitions(&ctx, &disk, &parts, log)?;
        p.step("making the filesystems", log);
        let targets = install::make_filesystems(&parts, &nodes, &work.path().join("mnt"))?;
        let size = install::deploy_images(&mut src, &targets, &mut p, log)?;
        p.step("installing GRUB", log);
        let line = upgrade::history_line(
            &kairos_util::time::rfc3339(kairos_util::time::now_ms()),
            "build",
            &src.origin,
            src.digest.as_deref(),
            Booted::Active,
            "active.img",
            size,
        );
        install::write_boot_files(&targets, &boot, args.config.as_deref(), &line)?;
        install::write_oem_extras(&targets, &grubenv, custom_mounts.as_deref())?;
        install::write_boot_code(&disk, &parts, &nodes, &boot, &targets)?;
        install::finish(targets, &disk)?;
        Ok(())
    })();
    // The partitions go before the loop device, whatever happened.
    let numbers: Vec<u32> = (1..=parts.len() as u32).collect();
    let removed = std::fs::File::open(&lo.path)
        .at(&lo.path, "opening")
        .map_err(RawError::from)
        .and_then(|f| Ok(device::remove_partitions(&f, &lo.path, &numbers)?));
    drop(lo);
    drop(src);
    built?;
    removed?;

    // 3. The output.
    match qemu_img {
        Some(tool) => {
            let partial_q = with_suffix(&args.out, ".partial.qcow2");
            partial.0.push(partial_q.clone());
            run_tool(
                Command::new(&tool)
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&partial_raw)
                    .arg(&partial_q),
            )?;
            std::fs::rename(&partial_q, &args.out).at(&args.out, "renaming the qcow2 image to")?;
        }
        None => {
            std::fs::rename(&partial_raw, &args.out).at(&args.out, "renaming the disk image to")?
        }
    }
    drop(partial);
    let file_bytes = std::fs::metadata(&args.out)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .unwrap_or(0);
    Ok(RawReport {
        out: args.out.clone(),
        format: args.format,
        disk_bytes,
        file_bytes,
        partitions: parts
            .iter()
            .map(|p| (p.name.clone(), (p.last - p.first + 1) * 512 / MIB))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The report as the CLI prints it.
pub fn summary(r: &RawReport) -> String {
    let parts: Vec<String> = r
        .partitions
        .iter()
        .map(|(n, mib)| format!("{n} {mib} MiB"))
        .collect();
    format!(
        "kairos-build: wrote {} ({}, {} MiB disk, {} MiB on the host; {}) in {:.1} s",
        r.out.display(),
        match r.format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        },
        r.disk_bytes / MIB,
        r.file_bytes.div_ceil(MIB),
        parts.join(", "),
        r.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_round_up_to_mib() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1500M"), Ok(1500 << 20));
        assert_eq!(parse_size("1048577"), Ok(2 << 20));
        assert_eq!(parse_size(" 2t "), Ok(2 << 40));
        for bad in ["", "G", "4X", "-1G", "0", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn partial_files_go_on_drop() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("disk.raw.partial");
        std::fs::write(&f, "x").expect("write");
        drop(Partial(vec![f.clone()]));
        assert!(!f.exists());
        assert_eq!(
            with_suffix(Path::new("/a/disk.raw"), ".partial"),
            Path::new("/a/disk.raw.partial")
        );
    }
}
