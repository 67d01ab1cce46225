//! `kairos-agent install` in QEMU: a live system (the pid1 busybox image, with mkfs.ext4,
//! mksquashfs, grub-mkimage and GRUB's i386-pc files copied in from the host) installs itself
//! onto a blank second disk; the same run checks the refusals (a mounted disk, a partition, a
//! disk too small: named errors, nothing written). Then the installed disk boots alone,
//! through real GRUB, into its active image, with the config given to `--config` in effect.

use std::path::Path;
use std::time::Duration;

use kairos_tests::diskimg::Mounted;
use kairos_tests::{ACTIVE, BASE_CMDLINE, DRIVER_DONE, artifacts, driver_lines, require_root};

/// Tools the installer runs, from the host (ELF files bring their libraries).
const HOST_TOOLS: &[&str] = kairos_tests::iso::INSTALL_TOOLS;

/// The config given to `--config`: starts the test driver on the installed system and leaves a
/// file the driver prints. Not a .yaml on the live system, so only the installed one reads it.
const INSTALL_CONFIG: &str = "#cloud-config\nstages:\n  boot:\n    - name: installed marker\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0644\n          content: installed by kairos-agent install\n  network:\n    - name: start the test driver\n      commands:\n        - setsid /usr/libexec/kairos-test-driver </dev/null >/dev/console 2>&1 &\n";

/// Sizes of the blank disks in bytes (the scenario has them in sectors): the guest tells the
/// disks apart by size (virtio disks are not always named in the order QEMU lists them).
const TARGET_SIZE: u64 = 3 << 30;
const SMALL_SIZE: u64 = 256 << 20;

/// Runs on the live system: the refusals first (they must write nothing), then the install.
const SCENARIO: &str = r#"
out() { tr '\n' '|' < "$1"; }
for b in /sys/block/vd*; do
  case $(cat $b/size) in
    6291456) target=/dev/${b##*/} ;;
    524288) small=/dev/${b##*/} ;;
    *) live=/dev/${b##*/} ;;
  esac
done
say "disks live=$live target=$target small=$small"
for d in live:$live part:${live}4 small:$small; do
  kairos-agent install --device ${d#*:} --config /oem/to-install.cfg >/tmp/o 2>/tmp/e
  say "refused ${d%%:*} rc=$? $(out /tmp/e)"
done
t0=$(cut -d' ' -f1 /proc/uptime)
kairos-agent install --device $target --config /oem/to-install.cfg >/tmp/o 2>/tmp/e
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
say "install rc=$rc from $t0 to $t1"
while read -r l; do say "log $l"; done < /tmp/e
say "out $(out /tmp/o)"
"#;

fn sparse(path: &Path, size: u64) {
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn value<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key).map(str::trim_start))
}

/// The scenario's `install rc=0 from T0 to T1` line (uptimes in seconds): asserts rc 0 and
/// prints the time as the figure `what`.
fn install_succeeded(lines: &[String], what: &str) {
    let rc = value(lines, "install rc=").unwrap_or("(none)");
    assert!(
        rc.starts_with("0 "),
        "{what} failed: rc={rc}\n{}",
        lines.join("\n")
    );
    let times: Vec<f64> = rc
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    if let [t0, t1] = times[..] {
        println!("FIGURE {what} in the guest (TCG): {:.1} s", t1 - t0);
    }
}

#[test]
fn install_onto_a_blank_disk_then_boot_it_alone() {
    require_root();
    let a = artifacts();
    let live = kairos_tests::pid1_disk(
        "install-live",
        &[
            ("kairos-test-extra.sh", SCENARIO),
            ("to-install.cfg", INSTALL_CONFIG),
        ],
        |s| {
            s.host_tools = HOST_TOOLS.iter().map(|t| t.to_string()).collect();
        },
    );
    let target = a.work.join("install-target.img");
    sparse(&target, TARGET_SIZE);
    let small = a.work.join("install-small.img");
    sparse(&small, SMALL_SIZE);

    // Boot 1: the live system installs onto the blank 3 GiB disk (kernel and initramfs given directly).
    let mut spec = kairos_qemu::boot::BootSpec::new(a.work.join("install-live.log"));
    spec.disks = vec![live.clone(), target.clone(), small.clone()];
    spec.kernel = Some(a.kernel.vmlinuz.clone());
    spec.initrd = Some(a.initramfs.clone());
    spec.append = Some(format!("{BASE_CMDLINE} {ACTIVE}"));
    spec.memory_mb = 1024;
    spec.kvm = std::env::var_os("KAIROS_KVM").is_some();
    spec.timeout = Duration::from_secs(900);
    let r = kairos_qemu::boot::run(&spec).expect("booting the live system");
    println!(
        "---- serial log of install-live ({:.1} s) ----\n{}",
        r.elapsed.as_secs_f64(),
        r.log
    );
    let lines = driver_lines(&r.log);
    assert!(
        lines.iter().any(|l| l == "driver done"),
        "the driver did not finish"
    );

    // Refusals: named errors, exit 2, nothing written.
    let refused = |dev: &str| {
        value(&lines, &format!("refused {dev} "))
            .unwrap_or_else(|| panic!("no refusal line for {dev}"))
            .to_string()
    };
    let disks = value(&lines, "disks ").unwrap_or("");
    println!("guest disks: {disks}");
    let live_dev = refused("live");
    assert!(live_dev.starts_with("rc=2 "), "{live_dev}");
    assert!(
        live_dev.contains(": in use (")
            && live_dev.contains("4 is mounted at /run/initramfs/cos-state"),
        "{live_dev}"
    );
    assert!(live_dev.contains("nothing was written"), "{live_dev}");
    let part = refused("part");
    assert!(
        part.contains("4 is a partition; give the whole disk"),
        "{part}"
    );
    let small_dev = refused("small");
    assert!(
        small_dev.contains(": 256 MiB is too small: this source needs at least ")
            && small_dev.contains("nothing was written"),
        "{small_dev}"
    );
    let small_bytes = std::fs::read(&small).expect("reading the small disk");
    assert!(
        small_bytes.iter().all(|&b| b == 0),
        "the refused small disk was written to"
    );

    // The install.
    install_succeeded(&lines, "install");
    for step in [
        "log install: writing the partition table",
        "log install: making the filesystems",
        "log install: building active.img",
        "log install: building recovery.squashfs",
        "log install: installing GRUB",
    ] {
        assert!(lines.iter().any(|l| l == step), "no {step:?}");
    }
    let out = value(&lines, "out ").unwrap_or("");
    // Virtio names follow probe order: the target is whichever the scenario found by size.
    let target_dev = disks
        .split_whitespace()
        .find_map(|w| w.strip_prefix("target="))
        .unwrap_or("(no target in the disks line)");
    assert!(
        out.contains(&format!("kairos-agent: installed dir:/ to {target_dev} ")),
        "{out}"
    );

    // The GPT on the host's view, by the reference tool.
    let v = std::process::Command::new("sgdisk")
        .arg("-p")
        .arg(&target)
        .output()
        .expect("sgdisk");
    let p = String::from_utf8_lossy(&v.stdout);
    for n in ["bios", "oem", "recovery", "state", "persistent"] {
        assert!(p.contains(n), "{p}");
    }
    assert!(p.contains("EF02"), "{p}");

    // What the installer wrote, read on the host through read-only loop mounts.
    let oem = Mounted::part(&target, 2);
    let cfg = oem.root().join("90_custom.yaml");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), INSTALL_CONFIG);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let env = std::fs::read(oem.root().join("grubenv")).unwrap();
    assert_eq!(env.len(), 1024);
    assert!(kairos_tests::grub_editenv_accepts(&env));
    assert_eq!(
        kairos_tests::grubenv_get(&env, "kairos_max_tries").as_deref(),
        Some("3")
    );
    drop(oem);
    let state = Mounted::part(&target, 4);
    for f in [
        "cOS/active.img",
        "cOS/passive.img",
        "grub2/grub.cfg",
        "grub2/i386-pc/normal.mod",
    ] {
        assert!(state.root().join(f).is_file(), "COS_STATE:/{f} missing");
    }
    drop(state);
    let rec = Mounted::part(&target, 3);
    assert!(rec.root().join("cOS/recovery.squashfs").is_file());
    drop(rec);
    let persistent = Mounted::part(&target, 5);
    let hist = std::fs::read_to_string(persistent.root().join(".kairos-state")).unwrap();
    assert!(
        hist.contains("\"action\":\"install\"") && hist.contains("\"source\":\"dir:/\""),
        "{hist}"
    );
    drop(persistent);

    // Boot 2: the installed disk alone, firmware -> our GRUB -> kernel -> kairos-init.
    let r = kairos_tests::boot_until_off("install-installed", &target, 400);
    kairos_tests::assert_has(&r, "KAIROS-GRUB: start");
    kairos_tests::assert_has(&r, "starting: mode=active image=/cOS/active.img");
    kairos_tests::assert_has(&r, DRIVER_DONE);
    let lines = driver_lines(&r.log);
    let file = value(&lines, "file ").unwrap_or("(no file line)");
    assert!(
        file.starts_with("644 ") && file.contains("installed by kairos-agent install"),
        "the --config file was not applied: {file}"
    );
}

/// Runs on the live system booted by OVMF: the install to the blank disk, UEFI chosen because
/// this system booted UEFI.
const UEFI_SCENARIO: &str = r#"
out() { tr '\n' '|' < "$1"; }
for b in /sys/block/vd*; do
  case $(cat $b/size) in
    6291456) target=/dev/${b##*/} ;;
  esac
done
[ -d /sys/firmware/efi ] && say "booted uefi" || say "booted bios"
t0=$(cut -d' ' -f1 /proc/uptime)
kairos-agent install --device $target --config /oem/to-install.cfg >/tmp/o 2>/tmp/e
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
say "install rc=$rc from $t0 to $t1"
while read -r l; do say "log $l"; done < /tmp/e
say "out $(out /tmp/o)"
"#;

/// OVMF as one flash image (the ovmf package), given to QEMU with -bios.
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

#[test]
fn install_uefi_onto_a_blank_disk_then_boot_it_alone() {
    require_root();
    // `kairos-qemu setup` installs them; a machine without them fails here, not silently.
    kairos_qemu::apt::ensure_packages(&["ovmf", "grub-efi-amd64-bin", "dosfstools", "mtools"])
        .expect("OVMF, GRUB x86_64-efi, dosfstools and mtools");
    let a = artifacts();
    let live = kairos_tests::pid1_disk(
        "install-uefi-live",
        &[
            ("kairos-test-extra.sh", UEFI_SCENARIO),
            ("to-install.cfg", INSTALL_CONFIG),
        ],
        |s| {
            s.host_tools = HOST_TOOLS.iter().map(|t| t.to_string()).collect();
            let (mkfs_fat, links) = kairos_tests::iso::uefi_links_and_mkfs();
            s.host_tools.extend(
                kairos_tests::iso::UEFI_INSTALL_TOOLS
                    .iter()
                    .map(|t| t.to_string())
                    .chain([mkfs_fat]),
            );
            s.image_symlinks.extend(links);
        },
    );
    let target = a.work.join("install-uefi-target.img");
    sparse(&target, TARGET_SIZE);
    let firmware = vec!["-bios".to_string(), OVMF.to_string()];

    // Boot 1: OVMF starts the kernel given directly; the live system installs onto the target.
    let mut spec = kairos_qemu::boot::BootSpec::new(a.work.join("install-uefi-live.log"));
    spec.disks = vec![live.clone(), target.clone()];
    spec.kernel = Some(a.kernel.vmlinuz.clone());
    spec.initrd = Some(a.initramfs.clone());
    spec.append = Some(format!("{BASE_CMDLINE} {ACTIVE}"));
    spec.memory_mb = 1024;
    spec.kvm = std::env::var_os("KAIROS_KVM").is_some();
    spec.timeout = Duration::from_secs(1200);
    spec.extra_args = firmware.clone();
    let r = kairos_qemu::boot::run(&spec).expect("booting the live system under OVMF");
    println!(
        "---- serial log of install-uefi-live ({:.1} s) ----\n{}",
        r.elapsed.as_secs_f64(),
        r.log
    );
    let lines = driver_lines(&r.log);
    assert!(
        lines.iter().any(|l| l == "driver done"),
        "the driver did not finish"
    );
    assert!(
        lines.iter().any(|l| l == "booted uefi"),
        "the live system did not boot UEFI"
    );
    install_succeeded(&lines, "UEFI install");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("log install: firmware: UEFI (this system booted UEFI)")),
        "the installer did not choose UEFI"
    );
    let out = value(&lines, "out ").unwrap_or("");
    assert!(
        out.contains("kairos-agent: installed dir:/ to /dev/vd"),
        "{out}"
    );

    // The GPT and the ESP on the host's view.
    let v = std::process::Command::new("sgdisk")
        .arg("-p")
        .arg(&target)
        .output()
        .expect("sgdisk");
    let p = String::from_utf8_lossy(&v.stdout);
    let rows: Vec<&str> = p
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(rows.len(), 5, "{p}");
    assert!(rows[0].contains("EF00") && rows[0].contains("efi"), "{p}");
    assert!(rows[3].contains("state"), "{p}");
    assert!(!p.contains("EF02"), "{p}");
    let (offset, _) = kairos_qemu::disk::partition_bytes(&target, 1).expect("partition 1");
    let image = format!("{}@@{offset}", target.display());
    let label = std::process::Command::new("mlabel")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-i", &image, "::"])
        .output()
        .expect("mlabel");
    let label = String::from_utf8_lossy(&label.stdout);
    assert!(label.contains("COS_GRUB"), "ESP label: {label}");
    let cfg = std::process::Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", &image, "::/EFI/BOOT/grub.cfg"])
        .output()
        .expect("mtype");
    let cfg = String::from_utf8_lossy(&cfg.stdout);
    assert!(
        cfg == kairos_init::grubcfg::esp_grub_cfg()
            && cfg.contains("configfile ($root)/grub2/grub.cfg"),
        "{cfg}"
    );
    let dir = std::process::Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-b", "-i", &image, "::/EFI/BOOT"])
        .output()
        .expect("mdir");
    assert!(
        String::from_utf8_lossy(&dir.stdout).contains("BOOTX64.EFI"),
        "no BOOTX64.EFI"
    );
    let state = Mounted::part(&target, 4);
    for f in [
        "cOS/active.img",
        "grub2/grub.cfg",
        "grub2/x86_64-efi/normal.mod",
    ] {
        assert!(state.root().join(f).is_file(), "COS_STATE:/{f} missing");
    }
    drop(state);

    // Boot 2: the installed disk alone, OVMF -> EFI/BOOT/BOOTX64.EFI -> COS_STATE's grub.cfg
    // -> kernel -> kairos-init -> active image.
    let mut spec = kairos_qemu::boot::BootSpec::new(a.work.join("install-uefi-installed.log"));
    spec.disks = vec![target.clone()];
    spec.memory_mb = 768;
    spec.kvm = std::env::var_os("KAIROS_KVM").is_some();
    spec.timeout = Duration::from_secs(900);
    spec.extra_args = firmware;
    let r = kairos_qemu::boot::run(&spec).expect("booting the installed disk under OVMF");
    println!(
        "---- serial log of install-uefi-installed ({:.1} s) ----\n{}",
        r.elapsed.as_secs_f64(),
        r.log
    );
    kairos_tests::assert_has(&r, "KAIROS-GRUB: start");
    kairos_tests::assert_has(&r, "starting: mode=active image=/cOS/active.img");
    kairos_tests::assert_has(&r, DRIVER_DONE);
    let lines = driver_lines(&r.log);
    let file = value(&lines, "file ").unwrap_or("(no file line)");
    assert!(
        file.starts_with("644 ") && file.contains("installed by kairos-agent install"),
        "the --config file was not applied: {file}"
    );
}
