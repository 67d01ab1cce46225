//! A Kairos-style grub.cfg (SPEC §2, §4) and BIOS GRUB installed into a disk
//! image file without `grub-install` (which needs a block device): core.img
//! from `grub-mkimage`, boot.img and the blocklist patched in by hand.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{self, AptError};
use crate::rootfs::{CommandError, run};

/// Where grub-pc-bin keeps the i386-pc images and modules.
pub const GRUB_I386_PC_DIR: &str = "/usr/lib/grub/i386-pc";

/// Packages [`install_bios`] runs tools from.
pub const PACKAGES: &[&str] = &["grub-pc-bin", "grub-common"];

/// Modules built into core.img, so grub.cfg works without reading any module
/// from disk; names this grub-pc-bin lacks are dropped.
pub const CORE_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "ext2",
    "normal",
    "configfile",
    "loadenv",
    "test",
    "echo",
    "linux",
    "serial",
    "terminal",
    "loopback",
    "squash4",
    "search",
    "search_label",
    "regexp",
    "linux16",
    "boot",
    "cat",
    "ls",
    "sleep",
    "halt",
    "reboot",
];

/// Kernel arguments every entry gets (SPEC §2; no `quiet`, ttyS0 last so it is /dev/console).
pub const BASE_CMDLINE: &str = "console=tty1 console=ttyS0,115200 net.ifnames=1 rd.cos.oemlabel=COS_OEM rd.cos.oemtimeout=10 panic=5 rd.emergency=reboot rd.shell=0 systemd.crash_reboot=yes";

const SECTOR: u64 = 512;
/// Offsets in boot.img / diskboot.img (grub-core/boot/i386/pc/*.S).
const MBR_CODE_LEN: usize = 440;
const MBR_KERNEL_SECTOR: usize = 0x5c;
const MBR_DRIVE_CHECK: usize = 0x66;
const BLOCKLIST: usize = 512 - 12;
const CORE_SEGMENT: u16 = 0x820;
/// GPT type GUID of a BIOS boot partition (21686148-6E6F-744E-6565-644E65454649) as stored on disk.
const BIOS_BOOT_TYPE: [u8; 16] = *b"Hah!IdontNeedEFI";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubCfgOptions {
    /// Menu timeout in seconds (tests use 0).
    pub timeout: u32,
    /// Appended to the base command line of every entry.
    pub extra_cmdline: String,
}

impl Default for GrubCfgOptions {
    fn default() -> Self {
        Self {
            timeout: 1,
            extra_cmdline: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("installing GRUB: {0}")]
    Apt(#[from] AptError),
    #[error("{}: {what}", path.display())]
    BadImage { path: PathBuf, what: String },
    #[error("{}: core.img needs {needed} sectors but the bios partition at sector {first} holds {available}", disk.display())]
    CoreTooLarge {
        disk: PathBuf,
        first: u64,
        needed: u64,
        available: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> GrubError + '_ {
    move |source| GrubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, what: impl Into<String>) -> GrubError {
    GrubError::BadImage {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// Splits a kernel command line the way the kernel does (whitespace outside
/// double quotes separates; the quotes themselves go) and renders each
/// argument as one GRUB word. GRUB's `linux` puts double quotes back around
/// arguments containing spaces, so `a="b c"` reaches the kernel intact.
fn grub_words(cmdline: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                started = true;
            }
            c if c.is_whitespace() && !in_quote => {
                if started {
                    args.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(cur);
    }
    args.into_iter().map(|a| grub_quote(&a)).collect()
}

/// Quotes a word for GRUB script only when it has characters GRUB would interpret.
fn grub_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.,:/=+-@%^~".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

struct Entry {
    id: &'static str,
    title_suffix: &'static str,
    /// Variable holding the partition the image is on (`state` is set globally).
    image: &'static str,
    loopdev: &'static str,
    cmdline: &'static str,
    extra_var: &'static str,
}

// Each entry has its own loop device: GRUB 2.06 refuses to re-create an existing
// name ("device name already exists"), so a fallback entry reusing loop0 would
// read the broken image the failed entry had attached.
const ENTRIES: &[Entry] = &[
    Entry {
        id: "cos",
        title_suffix: "",
        image: "/cOS/active.img",
        loopdev: "loop0",
        cmdline: "root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img",
        extra_var: "extra_active_cmdline",
    },
    Entry {
        id: "fallback",
        title_suffix: " (fallback)",
        image: "/cOS/passive.img",
        loopdev: "loop1",
        cmdline: "root=LABEL=COS_PASSIVE cos-img/filename=/cOS/passive.img",
        extra_var: "extra_passive_cmdline",
    },
    Entry {
        id: "recovery",
        title_suffix: " recovery",
        image: "(${recroot})/cOS/recovery.squashfs",
        loopdev: "loop2",
        cmdline: "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs",
        extra_var: "extra_recovery_cmdline",
    },
    Entry {
        id: "statereset",
        title_suffix: " state reset (auto)",
        image: "(${recroot})/cOS/recovery.squashfs",
        loopdev: "loop3",
        cmdline: "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs kairos.reset",
        extra_var: "extra_recovery_cmdline",
    },
];

/// The grub.cfg for `COS_STATE:/grub2/grub.cfg`. Prints `KAIROS-GRUB:` lines
/// on the console so boot tests can see what GRUB chose.
pub fn grub_cfg(opts: &GrubCfgOptions) -> String {
    let mut base = BASE_CMDLINE.to_string();
    for w in grub_words(&opts.extra_cmdline) {
        base.push(' ');
        base.push_str(&w);
    }
    let mut s = format!(
        r#"# Kairos GRUB configuration (generated by kairos-qemu).
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout={timeout}
set timeout_style=menu

# $root is COS_STATE already through the prefix; the search keeps it right if disks move.
search --no-floppy --label --set=state COS_STATE
if [ -n "${{state}}" ]; then
  set root="${{state}}"
fi

# Environment: COS_STATE:/grub_oem_env first, then COS_OEM:/grubenv, whose values win.
if [ -f /grub_oem_env ]; then
  load_env -f /grub_oem_env
fi
set env_file=
search --no-floppy --label --set=oem COS_OEM
if [ -n "${{oem}}" ]; then
  if [ -f "(${{oem}})/grubenv" ]; then
    set env_file="(${{oem}})/grubenv"
    load_env -f "${{env_file}}"
  fi
fi

# next_entry is a one-shot choice: use it and clear it on disk.
if [ -n "${{next_entry}}" ]; then
  set default="${{next_entry}}"
  set next_entry=
  if [ -n "${{env_file}}" ]; then
    save_env -f "${{env_file}}" next_entry
  fi
elif [ -n "${{saved_entry}}" ]; then
  set default="${{saved_entry}}"
else
  set default=cos
fi
# Entries GRUB cannot load fall through to the next (0 cos, 1 fallback, 2 recovery).
if [ -n "${{default_fallback}}" ]; then
  set fallback="${{default_fallback}}"
else
  set fallback="0 1 2"
fi
set menu_title=Kairos
if [ -n "${{default_menu_entry}}" ]; then
  set menu_title="${{default_menu_entry}}"
fi
export extra_cmdline extra_active_cmdline extra_passive_cmdline extra_recovery_cmdline
echo "KAIROS-GRUB: default=${{default}} fallback=${{fallback}}"
"#,
        timeout = opts.timeout
    );
    for e in ENTRIES {
        let search = if e.image.contains("recroot") {
            "  search --no-floppy --label --set=recroot COS_RECOVERY\n"
        } else {
            ""
        };
        s.push_str(&format!(
            r#"
menuentry "${{menu_title}}{suffix}" --id {id} {{
  echo "KAIROS-GRUB: entry={id}"
{search}  loopback {dev} {image}
  linux ({dev})/boot/vmlinuz {base} {cmdline} rd.kairos.boot_reason={id} ${{extra_cmdline}} ${{{extra}}}
  initrd ({dev})/boot/initrd
}}
"#,
            suffix = e.title_suffix,
            id = e.id,
            dev = e.loopdev,
            image = e.image,
            cmdline = e.cmdline,
            extra = e.extra_var,
        ));
    }
    s.push_str(
        r#"
# Site additions on COS_STATE, as upstream.
if [ -f /grubcustom ]; then
  source /grubcustom
fi
if [ -f /grubmenu ]; then
  source /grubmenu
fi
"#,
    );
    s
}

/// Copies GRUB's i386-pc modules and lists to `prefix_dir/i386-pc`, as
/// grub-install does, so `insmod` and command autoloading work from the prefix.
pub fn install_modules(prefix_dir: &Path) -> Result<(), GrubError> {
    let src = Path::new(GRUB_I386_PC_DIR);
    let dst = prefix_dir.join("i386-pc");
    fs::create_dir_all(&dst).map_err(io_err(&dst))?;
    for entry in fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let name = entry.file_name();
        let keep = Path::new(&name)
            .extension()
            .is_some_and(|e| e == "mod" || e == "lst");
        if keep {
            let to = dst.join(&name);
            fs::copy(entry.path(), &to).map_err(io_err(&to))?;
        }
    }
    Ok(())
}

/// Builds core.img with the prefix baked in; returns its bytes.
fn make_core(disk: &Path, prefix: &str) -> Result<Vec<u8>, GrubError> {
    let dir = Path::new(GRUB_I386_PC_DIR);
    let modules: Vec<&str> = CORE_MODULES
        .iter()
        .copied()
        .filter(|m| dir.join(format!("{m}.mod")).exists())
        .collect();
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let core_path = disk.with_file_name(format!(".{name}.core.img.{}", std::process::id()));
    let result = run(Command::new("grub-mkimage")
        .args(["-O", "i386-pc", "-d", GRUB_I386_PC_DIR, "-o"])
        .arg(&core_path)
        .args(["-p", prefix])
        .args(&modules))
    .map_err(GrubError::from)
    .and_then(|_| fs::read(&core_path).map_err(io_err(&core_path)));
    let _ = fs::remove_file(&core_path);
    result
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_at(f: &mut fs::File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, GrubError> {
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    f.read_exact(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

fn write_at(f: &mut fs::File, path: &Path, offset: u64, data: &[u8]) -> Result<(), GrubError> {
    f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))
}

/// Size in sectors of the BIOS boot partition starting at `first`, from the primary GPT.
fn bios_partition_sectors(f: &mut fs::File, disk: &Path, first: u64) -> Result<u64, GrubError> {
    let hdr = read_at(f, disk, SECTOR, SECTOR as usize)?;
    if &hdr[..8] != b"EFI PART" {
        return Err(bad(disk, "no GPT header at sector 1"));
    }
    let entries_lba = le_u64(&hdr, 72);
    let count = le_u32(&hdr, 80) as usize;
    let size = le_u32(&hdr, 84) as usize;
    if !(128..=4096).contains(&size) || count == 0 || count > 1024 {
        return Err(bad(
            disk,
            format!("implausible GPT entry table ({count} × {size} bytes)"),
        ));
    }
    let table_at = entries_lba
        .checked_mul(SECTOR)
        .ok_or_else(|| bad(disk, format!("GPT entry table at absurd LBA {entries_lba}")))?;
    let table = read_at(f, disk, table_at, count * size)?;
    for (i, e) in table.chunks_exact(size).enumerate() {
        if le_u64(e, 32) != first || e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        if e[..16] != BIOS_BOOT_TYPE {
            return Err(bad(
                disk,
                format!(
                    "partition {} at sector {first} is not of type BIOS boot (ef02)",
                    i + 1
                ),
            ));
        }
        let last = le_u64(e, 40);
        if last < first {
            return Err(bad(
                disk,
                format!("partition {} ends before it starts", i + 1),
            ));
        }
        return Ok(last - first + 1);
    }
    Err(bad(
        disk,
        format!("no GPT partition starts at sector {first}"),
    ))
}

/// Installs BIOS GRUB into the disk image file `disk`: core.img (with
/// `prefix`, e.g. `(hd0,gpt4)/grub2`) into the bios_grub partition starting at
/// `bios_part_first_sector`, boot.img into the MBR, keeping the partition table.
pub fn install_bios(
    disk: &Path,
    bios_part_first_sector: u64,
    prefix: &str,
) -> Result<(), GrubError> {
    apt::ensure_packages(PACKAGES)?;
    install_bios_unchecked(disk, bios_part_first_sector, prefix)
}

pub(crate) fn install_bios_unchecked(
    disk: &Path,
    first: u64,
    prefix: &str,
) -> Result<(), GrubError> {
    let boot_path = Path::new(GRUB_I386_PC_DIR).join("boot.img");
    let boot = fs::read(&boot_path).map_err(io_err(&boot_path))?;
    if boot.len() != SECTOR as usize {
        return Err(bad(&boot_path, "boot.img is not one sector"));
    }
    let mut core = make_core(disk, prefix)?;
    let core_path = Path::new("core.img");
    if core.len() < SECTOR as usize {
        return Err(bad(core_path, "grub-mkimage wrote less than one sector"));
    }
    let core_sectors = (core.len() as u64).div_ceil(SECTOR);
    // What diskboot.img expects in its last 12 bytes: grub-mkimage already put
    // the sector count there and the load segment; only the start is ours to set.
    let mkimage_len = u16::from_le_bytes([core[BLOCKLIST + 8], core[BLOCKLIST + 9]]);
    let segment = u16::from_le_bytes([core[BLOCKLIST + 10], core[BLOCKLIST + 11]]);
    if u64::from(mkimage_len) != core_sectors - 1 || segment != CORE_SEGMENT {
        return Err(bad(
            core_path,
            format!(
                "unexpected diskboot blocklist (count {mkimage_len}, segment {segment:#x}) for {core_sectors} sectors"
            ),
        ));
    }

    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(io_err(disk))?;
    let available = bios_partition_sectors(&mut f, disk, first)?;
    if core_sectors > available {
        return Err(GrubError::CoreTooLarge {
            disk: disk.to_path_buf(),
            first,
            needed: core_sectors,
            available,
        });
    }

    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(first + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&((core_sectors - 1) as u16).to_le_bytes());
    write_at(&mut f, disk, first * SECTOR, &core)?;

    let mut mbr = read_at(&mut f, disk, 0, SECTOR as usize)?;
    if mbr[510..] != [0x55, 0xaa] {
        return Err(bad(disk, "no protective MBR (run sgdisk first)"));
    }
    // Boot code only: bytes 440.. hold the disk signature and the partition table.
    mbr[..MBR_CODE_LEN].copy_from_slice(&boot[..MBR_CODE_LEN]);
    mbr[MBR_KERNEL_SECTOR..MBR_KERNEL_SECTOR + 8].copy_from_slice(&first.to_le_bytes());
    // As grub-bios-setup does for hard disks: nop the jump that skips the
    // workaround for BIOSes passing a bogus boot drive in DL.
    if mbr[MBR_DRIVE_CHECK] == 0xeb {
        mbr[MBR_DRIVE_CHECK] = 0x90;
        mbr[MBR_DRIVE_CHECK + 1] = 0x90;
    }
    write_at(&mut f, disk, 0, &mbr)?;
    f.sync_all().map_err(io_err(disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_path(tool: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    }

    #[test]
    fn words_are_quoted_for_grub() {
        assert_eq!(
            grub_words(r#" rd.kairos.debug  a="b c" x=$y it's "#),
            vec!["rd.kairos.debug", "'a=b c'", "'x=$y'", r"'it'\''s'"]
        );
        assert!(grub_words("").is_empty());
    }

    #[test]
    fn cfg_has_entries_and_cmdlines() {
        let cfg = grub_cfg(&GrubCfgOptions {
            timeout: 0,
            extra_cmdline: "rd.kairos.debug".into(),
        });
        assert!(cfg.contains("set timeout=0\n"));
        for id in ["cos", "fallback", "recovery", "statereset"] {
            assert!(cfg.contains(&format!("--id {id} {{")), "{id}");
            assert!(
                cfg.contains(&format!("rd.kairos.boot_reason={id} ")),
                "{id}"
            );
        }
        assert!(cfg.contains(&format!(
            "linux (loop0)/boot/vmlinuz {BASE_CMDLINE} rd.kairos.debug root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img rd.kairos.boot_reason=cos ${{extra_cmdline}} ${{extra_active_cmdline}}\n"
        )));
        assert!(cfg.contains("loopback loop2 (${recroot})/cOS/recovery.squashfs\n"));
        assert!(cfg.contains(
            "rd.live.squashimg=/cOS/recovery.squashfs kairos.reset rd.kairos.boot_reason=statereset"
        ));
        assert!(!cfg.contains("quiet"));
        assert_eq!(
            grub_cfg(&GrubCfgOptions::default()).lines().nth(4),
            Some("set timeout=1")
        );
    }

    #[test]
    fn cfg_passes_grub_script_check() {
        if !on_path("grub-script-check") {
            eprintln!("skipping: grub-script-check missing (grub-common)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("grub.cfg");
        fs::write(
            &path,
            grub_cfg(&GrubCfgOptions {
                timeout: 0,
                extra_cmdline: r#"a="b c" $x;y"#.into(),
            }),
        )
        .unwrap();
        let out = Command::new("grub-script-check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn install_patches_mbr_and_blocklist() {
        if !on_path("sgdisk") || !on_path("grub-mkimage") || !Path::new(GRUB_I386_PC_DIR).exists() {
            eprintln!("skipping: sgdisk or grub-pc-bin missing");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d.img");
        fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
        run(Command::new("sgdisk")
            .args([
                "-a",
                "2048",
                "-n1:0:+1M",
                "-t1:ef02",
                "-c1:bios",
                "-n2:0:0",
                "-c2:state",
            ])
            .arg(&disk))
        .unwrap();
        let before = fs::read(&disk).unwrap();
        install_bios_unchecked(&disk, 2048, "(hd0,gpt2)/grub2").unwrap();
        let after = fs::read(&disk).unwrap();
        let boot = fs::read(Path::new(GRUB_I386_PC_DIR).join("boot.img")).unwrap();
        assert_eq!(after[..MBR_KERNEL_SECTOR], boot[..MBR_KERNEL_SECTOR]);
        assert_eq!(le_u64(&after, MBR_KERNEL_SECTOR), 2048);
        assert_eq!(after[MBR_DRIVE_CHECK..MBR_DRIVE_CHECK + 2], [0x90, 0x90]);
        assert_eq!(after[440..512], before[440..512], "partition table kept");
        assert_eq!(after[512..2048 * 512], before[512..2048 * 512], "GPT kept");
        let core = &after[2048 * 512..];
        assert_eq!(le_u64(core, BLOCKLIST), 2049);
        let count = u16::from_le_bytes([core[BLOCKLIST + 8], core[BLOCKLIST + 9]]);
        assert!(count > 10 && count < 2047, "{count}");
        // Not a BIOS boot partition: refused.
        let err = install_bios_unchecked(&disk, 4096, "(hd0,gpt2)/grub2").unwrap_err();
        assert!(err.to_string().contains("BIOS boot"), "{err}");
    }
}
