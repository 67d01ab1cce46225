//! BIOS GRUB installed into a disk image file without `grub-install` (which
//! needs a block device): core.img from `grub-mkimage`, boot.img and the
//! blocklist patched in by hand. The grub.cfg itself comes from
//! [`kairos_init::grubcfg`], shared with the agent; its tests in real GRUB live here.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::process::Command;

use crate::apt::{self, AptError};

pub use kairos_init::grubcfg::{
    BASE_CMDLINE, ENTRY_IDS, GrubCfgOptions, MAX_TRIES, decision_script, grub_cfg,
};
pub use kairos_init::grubenv::{DEFAULT_MAX_TRIES, reason};

/// Where grub-pc-bin keeps the i386-pc images and modules.
pub const GRUB_I386_PC_DIR: &str = "/usr/lib/grub/i386-pc";

/// Packages [`install_bios`] runs tools from.
pub const PACKAGES: &[&str] = &["grub-pc-bin", "grub-common"];

use kairos_init::grubbios::{self, GrubBiosError};
use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error("installing GRUB: {0}")]
    Apt(AptError),
    #[error(transparent)]
    Bios(#[from] GrubBiosError),
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<AptError> for GrubError {
    fn from(e: AptError) -> GrubError {
        GrubError::Apt(e)
    }
}

/// Copies GRUB's i386-pc modules and lists to `prefix_dir/i386-pc`, as
/// grub-install does, so `insmod` and command autoloading work from the prefix.
pub fn install_modules(prefix_dir: &Path) -> Result<(), GrubError> {
    let src = Path::new(GRUB_I386_PC_DIR);
    let dst = prefix_dir.join("i386-pc");
    fs::create_dir_all(&dst).at(&dst, "creating")?;
    for entry in fs::read_dir(src).at(src, "reading the directory")? {
        let entry = entry.at(src, "reading the directory")?;
        let name = entry.file_name();
        let keep = Path::new(&name)
            .extension()
            .is_some_and(|e| e == "mod" || e == "lst");
        if keep {
            let to = dst.join(&name);
            let from = entry.path();
            fs::copy(&from, &to).at(&to, format!("copying {} here", from.display()))?;
        }
    }
    Ok(())
}

/// Builds core.img with the prefix baked in; returns its bytes.
fn make_core(disk: &Path, prefix: &str) -> Result<Vec<u8>, GrubError> {
    let dir = Path::new(GRUB_I386_PC_DIR);
    let modules = grubbios::core_modules_in(dir);
    let name = disk
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".into());
    let core_path = disk.with_file_name(format!(".{name}.core.img.{}", std::process::id()));
    let result = run_tool(
        Command::new("grub-mkimage")
            .args(["-O", "i386-pc", "-d", GRUB_I386_PC_DIR, "-o"])
            .arg(&core_path)
            .args(["-p", prefix])
            .args(&modules),
    )
    .map_err(GrubError::from)
    .and_then(|_| {
        fs::read(&core_path)
            .at(&core_path, "reading")
            .map_err(GrubError::from)
    });
    let _ = fs::remove_file(&core_path);
    result
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
    let boot = fs::read(&boot_path).at(&boot_path, "reading")?;
    let core = make_core(disk, prefix)?;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .at(disk, "opening")?;
    grubbios::install(&mut f, disk, first, &boot, core)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_init::grubbios::{BLOCKLIST, MBR_DRIVE_CHECK, MBR_KERNEL_SECTOR};
    use kairos_init::grubcfg::{GRUB_DIR, grub_prefix};
    use std::io::{self, Seek, SeekFrom, Write};
    use std::path::PathBuf;

    fn le_u64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn write_at(f: &mut fs::File, _disk: &Path, at: u64, data: &[u8]) -> io::Result<()> {
        f.seek(SeekFrom::Start(at))?;
        f.write_all(data)
    }

    fn on_path(tool: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    }

    #[test]
    fn cfg_passes_grub_script_check() {
        assert!(
            on_path("grub-script-check"),
            "needs grub-script-check (grub-common; `kairos-qemu setup` installs it)"
        );
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
        assert!(
            on_path("sgdisk") && on_path("grub-mkimage") && Path::new(GRUB_I386_PC_DIR).exists(),
            "needs sgdisk (gdisk) and grub-pc-bin (`kairos-qemu setup` installs them)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("d.img");
        fs::File::create(&disk).unwrap().set_len(8 << 20).unwrap();
        run_tool(
            Command::new("sgdisk")
                .args([
                    "-a",
                    "2048",
                    "-n1:0:+1M",
                    "-t1:ef02",
                    "-c1:bios",
                    "-n2:0:0",
                    "-c2:state",
                ])
                .arg(&disk),
        )
        .unwrap();
        let before = fs::read(&disk).unwrap();
        install_bios_unchecked(&disk, 2048, &grub_prefix(2)).unwrap();
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
        let err = install_bios_unchecked(&disk, 4096, &grub_prefix(2)).unwrap_err();
        assert!(err.to_string().contains("BIOS boot"), "{err}");
    }

    /// Without these the test fails and says which (it never passes without having run).
    fn grub_tests_ready() {
        let tools = [
            "sgdisk",
            "grub-mkimage",
            "grub-editenv",
            "mkfs.ext4",
            "debugfs",
        ];
        let ok = tools.iter().all(|t| on_path(t))
            && Path::new(GRUB_I386_PC_DIR).exists()
            && crate::apt::is_installed("qemu-system-x86");
        assert!(
            ok,
            "needs qemu-system-x86, gdisk, grub-pc-bin, grub-common, e2fsprogs (`kairos-qemu setup` installs them)"
        );
    }

    /// A disk with a BIOS boot partition and one 8 MiB ext4 partition per
    /// (label, tree), GRUB installed with `prefix`; returns each partition's byte range.
    fn grub_only_disk(disk: &Path, parts: &[(&str, &Path)], prefix: &str) -> Vec<(u64, u64)> {
        const PART: u64 = 8 << 20;
        let _ = fs::remove_file(disk);
        fs::File::create(disk)
            .unwrap()
            .set_len((2 + 8 * parts.len() as u64 + 1) << 20)
            .unwrap();
        let mut sgdisk = Command::new("sgdisk");
        sgdisk.args(["-a", "2048", "-n1:0:+1M", "-t1:ef02", "-c1:bios"]);
        for i in 0..parts.len() {
            sgdisk.arg(format!("-n{}:0:+8M", i + 2));
        }
        run_tool(sgdisk.arg(disk)).unwrap();
        let mut f = OpenOptions::new().write(true).open(disk).unwrap();
        let mut ranges = Vec::new();
        for (i, (label, tree)) in parts.iter().enumerate() {
            let img = disk.with_extension(format!("p{i}"));
            crate::rootfs::mkfs_ext(
                Some(tree),
                &img,
                label,
                PART / 1024,
                crate::rootfs::ExtFs::Ext4,
            )
            .unwrap();
            let at = (2 << 20) + i as u64 * PART;
            write_at(&mut f, disk, at, &fs::read(&img).unwrap()).unwrap();
            fs::remove_file(&img).unwrap();
            ranges.push((at, PART));
        }
        drop(f);
        install_bios_unchecked(disk, 2048, prefix).unwrap();
        ranges
    }

    fn boot_until(disk: &Path, dir: &Path, marker: &str) -> crate::boot::BootResult {
        let mut spec = crate::boot::BootSpec::new(dir.join("serial.log"));
        spec.disks.push(disk.to_path_buf());
        spec.until = vec![marker.into()];
        spec.timeout = std::time::Duration::from_secs(120);
        let r = crate::boot::run(&spec).unwrap();
        assert!(
            r.matched.is_some(),
            "no {marker:?} from GRUB:\n{}",
            r.tail(40)
        );
        r
    }

    fn extract_part(disk: &Path, (at, len): (u64, u64), to: PathBuf) -> PathBuf {
        let data = fs::read(disk).unwrap();
        fs::write(&to, &data[at as usize..(at + len) as usize]).unwrap();
        to
    }

    fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
        run_tool(
            Command::new("debugfs")
                .args(["-R", &format!("cat {path}")])
                .arg(img),
        )
        .unwrap()
        .stdout
    }

    /// A grubenv block from `grub-editenv` (the reference writer) holding `vars`.
    fn editenv_block(dir: &Path, vars: &[(&str, &str)]) -> Vec<u8> {
        let path = dir.join("editenv.tmp");
        let _ = fs::remove_file(&path);
        run_tool(Command::new("grub-editenv").arg(&path).arg("create")).unwrap();
        if !vars.is_empty() {
            run_tool(
                Command::new("grub-editenv")
                    .arg(&path)
                    .arg("set")
                    .args(vars.iter().map(|(k, v)| format!("{k}={v}"))),
            )
            .unwrap();
        }
        fs::read(&path).unwrap()
    }

    /// `key=value` lines of a grubenv block, as GRUB reads them (no unescaping needed here).
    fn block_vars(block: &[u8]) -> Vec<(String, String)> {
        String::from_utf8_lossy(block)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    struct Case {
        block: Vec<u8>,
        entry: &'static str,
        reason: &'static str,
        /// Variables that must hold this value afterwards (None: absent).
        after: Vec<(&'static str, Option<String>)>,
    }

    /// Every variable the decision reads or writes, unset between cases.
    const CASE_VARS: &[&str] = &[
        "next_entry",
        "saved_entry",
        "enable_boot_assessment",
        "kairos_tries_cos",
        "kairos_tries_fallback",
        "kairos_max_tries",
        "boot_assessment_tentative",
        "kairos_boot_entry",
        "kairos_boot_reason",
        "kairos_next",
        "env_ok",
        "env_file",
    ];

    #[allow(clippy::vec_init_then_push)] // one case per push reads better with comments between
    fn decision_cases(dir: &Path) -> Vec<Case> {
        let s = |v: &str| Some(v.to_string());
        let mut cases = Vec::new();
        // Not armed: default, or saved_entry; armed=no is not armed.
        cases.push(Case {
            block: editenv_block(dir, &[("kairos_max_tries", "3")]),
            entry: "cos",
            reason: reason::DEFAULT,
            after: vec![
                ("kairos_boot_entry", s("cos")),
                ("kairos_boot_reason", s(reason::DEFAULT)),
                ("boot_assessment_tentative", None),
            ],
        });
        cases.push(Case {
            block: editenv_block(
                dir,
                &[("enable_boot_assessment", "no"), ("kairos_tries_cos", "3")],
            ),
            entry: "cos",
            reason: reason::DEFAULT,
            after: vec![("kairos_tries_cos", s("3"))],
        });
        cases.push(Case {
            block: editenv_block(dir, &[("saved_entry", "recovery")]),
            entry: "recovery",
            reason: reason::SAVED_ENTRY,
            after: vec![("kairos_boot_entry", s("recovery"))],
        });
        // next_entry wins over counting and saved_entry, and is cleared.
        cases.push(Case {
            block: editenv_block(
                dir,
                &[
                    ("next_entry", "fallback"),
                    ("saved_entry", "recovery"),
                    ("enable_boot_assessment", "yes"),
                    ("kairos_tries_cos", "3"),
                ],
            ),
            entry: "fallback",
            reason: reason::NEXT_ENTRY,
            after: vec![
                ("next_entry", s("")),
                ("kairos_tries_cos", s("3")),
                ("kairos_boot_reason", s(reason::NEXT_ENTRY)),
            ],
        });
        // Armed: every value of active's counter.
        for n in 1..=MAX_TRIES {
            let v = n.to_string();
            cases.push(Case {
                block: editenv_block(
                    dir,
                    &[
                        ("enable_boot_assessment", "yes"),
                        ("kairos_tries_cos", &v),
                        ("kairos_tries_fallback", "3"),
                    ],
                ),
                entry: "cos",
                reason: reason::COUNTED_TRY,
                after: vec![
                    ("kairos_tries_cos", Some((n - 1).to_string())),
                    ("kairos_tries_fallback", s("3")),
                    ("boot_assessment_tentative", s("yes")),
                    ("kairos_boot_entry", s("cos")),
                    ("kairos_boot_reason", s(reason::COUNTED_TRY)),
                ],
            });
        }
        // Active's counter spent (0, garbage, out of range, missing): passive's tries.
        for cos in [Some("0"), Some("x"), Some("10"), Some("-1"), Some(""), None] {
            for n in 1..=MAX_TRIES {
                // All fallback values once with cos=0, then one value per kind of garbage.
                if cos != Some("0") && n != 2 {
                    continue;
                }
                let v = n.to_string();
                let mut vars = vec![
                    ("enable_boot_assessment", "yes"),
                    ("kairos_tries_fallback", v.as_str()),
                ];
                if let Some(c) = cos {
                    vars.push(("kairos_tries_cos", c));
                }
                cases.push(Case {
                    block: editenv_block(dir, &vars),
                    entry: "fallback",
                    reason: reason::COS_TRIES_EXHAUSTED,
                    after: vec![
                        ("kairos_tries_cos", cos.map(str::to_string)),
                        ("kairos_tries_fallback", Some((n - 1).to_string())),
                        ("boot_assessment_tentative", s("yes")),
                        ("kairos_boot_entry", s("fallback")),
                    ],
                });
            }
        }
        // Everything spent: recovery, nothing counted.
        for fb in ["0", "garbage", "1x"] {
            cases.push(Case {
                block: editenv_block(
                    dir,
                    &[
                        ("enable_boot_assessment", "yes"),
                        ("kairos_tries_cos", "0"),
                        ("kairos_tries_fallback", fb),
                    ],
                ),
                entry: "recovery",
                reason: reason::ALL_TRIES_EXHAUSTED,
                after: vec![
                    ("kairos_tries_cos", s("0")),
                    ("kairos_tries_fallback", s(fb)),
                    ("boot_assessment_tentative", None),
                    ("kairos_boot_reason", s(reason::ALL_TRIES_EXHAUSTED)),
                ],
            });
        }
        // Not a block at all: boots the default and writes nothing.
        let mut garbage = vec![0u8; 1024];
        let mut x: u32 = 0x1234_5678;
        for b in garbage.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        cases.push(Case {
            block: garbage,
            entry: "cos",
            reason: reason::DEFAULT,
            after: vec![("kairos_boot_entry", None)],
        });
        let armed = editenv_block(
            dir,
            &[("enable_boot_assessment", "yes"), ("kairos_tries_cos", "3")],
        );
        cases.push(Case {
            block: armed[..20].to_vec(),
            entry: "cos",
            reason: reason::DEFAULT,
            after: vec![("kairos_boot_entry", None)],
        });
        // A block with a valid header and no room left: a try that cannot be
        // counted is not booted.
        cases.push(Case {
            block: b"# GRUB Environment Block\nenable_boot_assessment=yes\nkairos_tries_cos=3\n"
                .to_vec(),
            entry: "recovery",
            reason: reason::GRUBENV_UNWRITABLE,
            after: vec![("kairos_tries_cos", s("3"))],
        });
        cases
    }

    /// GRUB only really runs in a machine: boots real GRUB in QEMU on a small
    /// disk whose grub.cfg sources [`decision_script`] once per prepared
    /// grubenv, then reads each block back to see what GRUB saved.
    #[test]
    fn decisions_in_real_grub() {
        grub_tests_ready();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let cases = decision_cases(dir);
        let prefix = grub_prefix(2);
        let tree = dir.join("tree");
        fs::create_dir_all(tree.join(GRUB_DIR)).unwrap();
        fs::create_dir_all(tree.join("cases")).unwrap();
        let mut cfg = String::from(
            "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset root=(hd0,gpt2)\n",
        );
        for (i, case) in cases.iter().enumerate() {
            fs::write(tree.join(format!("cases/{i}")), &case.block).unwrap();
            for v in CASE_VARS {
                cfg.push_str(&format!("unset {v}\n"));
            }
            cfg.push_str(&format!(
                "set env_file=(hd0,gpt2)/cases/{i}\nif load_env -f \"${{env_file}}\"; then\n  set env_ok=yes\nfi\nsource {prefix}/decide.cfg\necho \"KAIROS-CASE: {i} entry=${{kairos_boot_entry}} reason=${{kairos_boot_reason}}\"\n"
            ));
        }
        cfg.push_str("echo \"KAIROS-CASE: end\"\nhalt\n");
        fs::write(tree.join(GRUB_DIR).join("grub.cfg"), &cfg).unwrap();
        fs::write(tree.join(GRUB_DIR).join("decide.cfg"), decision_script()).unwrap();

        let disk = dir.join("disk.img");
        let parts = grub_only_disk(&disk, &[("COS_STATE", &tree)], &prefix);
        let r = boot_until(&disk, dir, "KAIROS-CASE: end");
        eprintln!("{} cases in {:.1} s", cases.len(), r.elapsed.as_secs_f64());
        // The partition after GRUB wrote to it, for debugfs.
        let after = extract_part(&disk, parts[0], dir.join("after.img"));
        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let want = format!(
                "KAIROS-CASE: {i} entry={} reason={}\n",
                case.entry, case.reason
            );
            let got = r
                .log
                .lines()
                .find(|l| l.starts_with(&format!("KAIROS-CASE: {i} ")))
                .unwrap_or("(no line)");
            if !r.log.contains(&want) {
                failures.push(format!("case {i}: want {want:?}, GRUB said {got:?}"));
            }
            let block = debugfs_cat(&after, &format!("/cases/{i}"));
            if block.len() != case.block.len() {
                failures.push(format!(
                    "case {i}: block is {} bytes now, was {}",
                    block.len(),
                    case.block.len()
                ));
            }
            let vars = block_vars(&block);
            for (k, v) in &case.after {
                let got = vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                if got != *v {
                    failures.push(format!("case {i}: {k} is {got:?}, want {v:?}"));
                }
            }
            if block != case.block && block.len() == 1024 {
                // What GRUB wrote, grub-editenv reads.
                let f = dir.join(format!("case{i}.env"));
                fs::write(&f, &block).unwrap();
                if let Err(e) = run_tool(Command::new("grub-editenv").arg(&f).arg("list")) {
                    failures.push(format!("case {i}: {e}"));
                }
            }
            let valid = case.block.starts_with(b"# GRUB Environment Block\n");
            if !valid && block != case.block {
                failures.push(format!("case {i}: GRUB wrote to an invalid block"));
            }
        }
        assert!(
            failures.is_empty(),
            "{}\nlog:\n{}",
            failures.join("\n"),
            r.log
        );
    }

    /// The whole generated grub.cfg in real GRUB, with no images to load: the
    /// environment is found by label and counted, the chosen entry reports
    /// its reason, and the entry GRUB falls through to says `menu`.
    #[test]
    fn full_config_counts_and_falls_through_in_real_grub() {
        grub_tests_ready();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let oem = dir.join("oem");
        fs::create_dir_all(&oem).unwrap();
        let block = editenv_block(
            dir,
            &[
                ("enable_boot_assessment", "yes"),
                ("kairos_tries_cos", "1"),
                ("kairos_tries_fallback", "3"),
                ("extra_cmdline", "x"),
            ],
        );
        fs::write(oem.join("grubenv"), &block).unwrap();
        let state = dir.join("state");
        fs::create_dir_all(state.join(GRUB_DIR)).unwrap();
        fs::write(
            state.join(GRUB_DIR).join("grub.cfg"),
            grub_cfg(&GrubCfgOptions {
                timeout: 0,
                extra_cmdline: String::new(),
            }),
        )
        .unwrap();
        let disk = dir.join("disk.img");
        let parts = grub_only_disk(
            &disk,
            &[("COS_OEM", &oem), ("COS_STATE", &state)],
            &grub_prefix(3),
        );
        // GRUB waits 10 s ("Press any key") after each entry that fails: stop at the second.
        let r = boot_until(&disk, dir, "KAIROS-GRUB: entry=fallback");
        // The first line comes after the terminal's clear-screen sequence.
        let lines: Vec<&str> = r
            .log
            .lines()
            .filter_map(|l| l.find("KAIROS-GRUB: ").map(|at| &l[at..]))
            .collect();
        assert_eq!(
            lines,
            [
                "KAIROS-GRUB: start",
                // COS_OEM and COS_STATE from the disk GRUB was loaded from; no recovery on it.
                "KAIROS-GRUB: boot disk hd0 state=hd0,gpt3 oem=hd0,gpt2 recovery=",
                "KAIROS-GRUB: chose cos:counted-try",
                "KAIROS-GRUB: tries cos=0 fallback=3 tentative=yes",
                "KAIROS-GRUB: default=cos fallback=1 2",
                "KAIROS-GRUB: entry=cos reason=counted-try",
                "KAIROS-GRUB: entry=fallback reason=menu",
            ],
            "{}",
            r.log
        );
        let after = extract_part(&disk, parts[0], dir.join("oem.img"));
        let saved = debugfs_cat(&after, "/grubenv");
        assert_eq!(saved.len(), 1024);
        let vars = block_vars(&saved);
        for (k, v) in [
            ("kairos_tries_cos", "0"),
            ("kairos_tries_fallback", "3"),
            ("boot_assessment_tentative", "yes"),
            ("kairos_boot_entry", "cos"),
            ("kairos_boot_reason", "counted-try"),
            ("extra_cmdline", "x"),
        ] {
            assert!(
                vars.contains(&(k.to_string(), v.to_string())),
                "{k}={v} not in {vars:?}"
            );
        }
    }
}
