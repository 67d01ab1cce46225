//! The live installer ISO (issue 14) in QEMU, firmware and GRUB from the medium (no `-kernel`).
//! One busybox image tree (kairos-init as PID 1, kairos-agent, the installer's host tools; its
//! own cos-layout.env naming COS_PERSISTENT) made into two ISOs by `kairos-build iso`: one
//! with an `install.auto` config, one without (pairing).
//! - CD under SeaBIOS: live (squashfs read-only, tmpfs overlays, `/run/cos/live_mode`, the
//!   medium's config read), install.auto installs onto the blank disk and powers off; the GPT
//!   is the one install.partitions and install.extra-partitions ask for (sgdisk, blkid) and
//!   the after-install-chroot stage's file is in the installed active.img; the disk alone
//!   boots BIOS into active with the config applied (the hostname rendered from the machine
//!   id, install.grub_options on the kernel command line); then the same ISO file as a USB
//!   stick next to that disk: live again, nothing installed and the console says why,
//!   COS_PERSISTENT byte for byte the same.
//! - CD under OVMF: the same install; the same ISO file as a USB stick next to the disk changes
//!   nothing there either; the disk alone boots UEFI; `kairos-agent bootentry
//!   --select statereset` there leads, with no other input, through recovery's unattended
//!   reset back to active with an empty COS_PERSISTENT and COS_OEM kept.
//! - The pairing ISO as a USB stick under OVMF on a tap LAN in a network namespace: the
//!   console shows the install instructions and a QR code; the test reads the code from the
//!   serial log and `kairos-agent register` with it, run on the LAN's host side, installs the
//!   node with the config it sends.
//! - The ISO without a config as a CD under SeaBIOS, its "Install Kairos to disk
//!   (unattended)" menu entry picked by key presses at GRUB (QMP send-key): installs onto the
//!   blank disk.
//! - The Debian systemd image made into an ISO (build only; size and time figures).
//!
//! The tree and the ISOs are built once per test process and shared. Run as root:
//! `cargo test --release -p kairos-tests --test iso`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kairos_qemu::boot::{BootExit, BootResult, BootSpec};
use kairos_tests::diskimg::{Mounted, part_by_name};
use kairos_tests::iso::{Firmware, Medium, build_iso, live_boot_spec, live_source_tree};
use kairos_tests::tapnet::TapLan;
use kairos_tests::{artifacts, driver_lines, driver_value, require_root};

/// The image's own layout, as a Kairos image ships it (SPEC §3): a live boot must leave its
/// COS_PERSISTENT volume alone (it would be the installed disk's).
const LAYOUT: &str = "VOLUMES=\"LABEL=COS_PERSISTENT:/usr/local\"\nOVERLAY=\"tmpfs:25%\"\nRW_PATHS=\"/var /etc /srv\"\nPERSISTENT_STATE_PATHS=\"/etc/ssh /home /root /var/log\"\n";

/// Run by a network stage on every live boot (before the agent installs anything): what the
/// live system is, as `KAIROS-T:` lines.
const LIVE_REPORT: &str = r#"#!/bin/sh
say() { echo "KAIROS-T: $*"; }
say "live_mode $([ -e /run/cos/live_mode ] && echo yes || echo no)"
say "medium $(grep ' /run/initramfs/live ' /proc/mounts | cut -d' ' -f1,3,4)"
say "medium-config $(stat -c '%a %U' /run/initramfs/live/config.yaml 2>&1)"
say "root $(grep ' / ' /proc/mounts | tail -n1 | cut -d' ' -f3,4)"
say "etc $(grep ' /etc ' /proc/mounts | cut -d' ' -f3)"
say "disk-mounts $(grep -c '^/dev/vd' /proc/mounts)"
say "live-firmware $([ -d /sys/firmware/efi ] && echo efi || echo bios)"
"#;

/// On an installed system (active boots only), once per boot: what the tests check, then
/// power off. With `/oem/kt-statereset` (dropped by the statereset test) the first run leaves
/// a file on COS_PERSISTENT, selects the statereset entry and reboots; COS_OEM's step file
/// (kept by the reset) makes the next active boot report and power off.
const INSTALLED_DRIVER: &str = r#"#!/bin/sh
mkdir /run/kt-iso 2>/dev/null || exit 0
say() { echo "KAIROS-T: $*"; }
n=0
while [ ! -e /run/kairos/agent-ready ] && [ $n -lt 480 ]; do sleep 0.25; n=$((n+1)); done
say "state $(kairos-agent state 2>&1 | tr '\n' ' ')"
say "firmware $([ -d /sys/firmware/efi ] && echo efi || echo bios)"
f=/etc/kairos-test/hello.txt
[ -f $f ] && say "config-file $(stat -c '%a' $f) $(cat $f)"
say "persistent $(ls -A /usr/local | tr '\n' ' ')"
say "hostname $(hostname) $(cut -c1-4 /etc/machine-id 2>&1)"
say "cmdline $(cat /proc/cmdline)"
step=$(cat /oem/kt-step 2>/dev/null || echo 0)
if [ -e /oem/kt-statereset ] && [ "$step" = 0 ]; then
  echo "written before the reset" > /usr/local/kt-before-reset
  echo 1 > /oem/kt-step
  sync
  say "wrote $(cat /usr/local/kt-before-reset)"
  say "select $(kairos-agent bootentry --select statereset 2>&1 | tr '\n' ' ')"
  say "rebooting"
  kill -TERM 1
  exit 0
fi
say "driver done"
kill -USR2 1
"#;

/// The test LAN: the host side and the live node's address.
const LAN_HOST: &str = "10.77.0.1";
const LAN_NODE: &str = "10.77.0.15";

/// The image's own config (/etc/kairos): the LAN address on live boots with a NIC, the live
/// report, and the installed driver's start on active boots.
fn image_config() -> String {
    format!(
        "#cloud-config\nstages:\n  initramfs:\n    - name: a machine id when the image has none (as systemd makes one on boot)\n      commands:\n        - '[ -s /etc/machine-id ] || (cat /proc/sys/kernel/random/uuid | tr -d - > /etc/machine-id)'\n  network:\n    - name: test LAN address (live media with a NIC)\n      if: '[ -e /run/cos/live_mode ] && [ -e /sys/class/net/eth0 ]'\n      commands:\n        - ip link set eth0 up && ip addr add {LAN_NODE}/24 dev eth0 && ip route add 224.0.0.0/4 dev eth0\n    - name: live report\n      if: '[ -e /run/cos/live_mode ]'\n      commands:\n        - sh /usr/libexec/kt-live-report >/dev/console 2>&1\n    - name: start the installed driver\n      if: '[ -e /run/cos/active_mode ]'\n      commands:\n        - setsid /usr/libexec/kt-iso-driver </dev/null >/dev/console 2>&1 &\n"
    )
}

/// `--config` of the install.auto ISO: it goes to the installed COS_OEM with everything else
/// the live system merged. Issue 19: the partitions' sizes and an extra partition, a grubenv
/// option, an after-install-chroot stage (a marker, and this machine's id kept by the
/// installed system, both written inside the new active.img) and a hostname rendered from
/// the machine id. The installed COS_OEM keeps the templates as written and the installed
/// node renders them on each boot; the busybox image has no systemd to make a machine id
/// before its first stage, hence the one kept from the live boot.
const AUTO_CONFIG: &str = "#cloud-config\nhostname: \"kairos-{{ trunc 4 .MachineID }}\"\ninstall:\n  auto: true\n  device: auto\n  poweroff: true\n  partitions:\n    oem:\n      size: 96\n      fs: ext4\n    state:\n      size: 1400\n  extra-partitions:\n    - name: kt_extra\n      size: 64\n      fs: ext4\n      label: KT_EXTRA\n  grub_options:\n    extra_active_cmdline: kt.grub_option=active\nstages:\n  after-install-chroot:\n    - name: marker and machine id in the new image\n      commands:\n        - echo written in the new image > /etc/kt-chroot-marker\n      files:\n        - path: /etc/machine-id\n          permissions: 0444\n          content: \"{{ .MachineID }}\\n\"\n  boot:\n    - name: iso test marker\n      if: '[ ! -e /run/cos/live_mode ]'\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0644\n          content: applied from kairos-build iso --config\n";

/// `sgdisk -p` of `disk`: (number, GPT name, MiB) of every partition.
fn gpt_table(disk: &Path) -> Vec<(u32, String, u64)> {
    let out = Command::new("sgdisk")
        .arg("-p")
        .arg(disk)
        .output()
        .expect("sgdisk");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let n: u32 = w.first()?.parse().ok()?;
            let first: u64 = w.get(1)?.parse().ok()?;
            let last: u64 = w.get(2)?.parse().ok()?;
            Some((n, w.last()?.to_string(), ((last - first + 1) * 512) >> 20))
        })
        .collect()
}

/// install.partitions and install.extra-partitions of AUTO_CONFIG made that GPT (read back
/// with sgdisk), the extra partition is ext4 labelled KT_EXTRA (blkid -p), and the
/// after-install-chroot stage's file is inside the installed active.img.
fn assert_configured_install(target: &Path, boot: &[&str]) {
    let table = gpt_table(target);
    println!("GPT of {}: {table:?}", target.display());
    let names: Vec<&str> = table.iter().map(|p| p.1.as_str()).collect();
    let mut want = boot.to_vec();
    want.extend(["oem", "recovery", "state", "persistent", "kt_extra"]);
    assert_eq!(names, want, "install.extra-partitions: the GPT");
    let mib = |name: &str| table.iter().find(|p| p.1 == name).map(|p| p.2);
    assert_eq!(mib("oem"), Some(96), "install.partitions.oem.size");
    assert_eq!(mib("state"), Some(1400), "install.partitions.state.size");
    assert_eq!(
        mib("kt_extra"),
        Some(64),
        "install.extra-partitions[0].size"
    );
    let (offset, size) =
        kairos_qemu::disk::partition_bytes(target, part_by_name(target, "kt_extra"))
            .expect("the extra partition's bytes");
    let probe = Command::new("blkid")
        .args(["-p", "-o", "export", "-O"])
        .arg(offset.to_string())
        .arg("-S")
        .arg(size.to_string())
        .arg(target)
        .output()
        .expect("blkid");
    let probe = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.lines().any(|l| l == "LABEL=KT_EXTRA") && probe.lines().any(|l| l == "TYPE=ext4"),
        "install.extra-partitions[0]: not an ext4 labelled KT_EXTRA:\n{probe}"
    );
    let state = Mounted::part(target, part_by_name(target, "state"));
    let active = Mounted::new(&state.path("cOS/active.img"), None, false);
    assert_eq!(
        std::fs::read_to_string(active.path("etc/kt-chroot-marker")).unwrap_or_default(),
        "written in the new image\n",
        "the after-install-chroot stage's file is not in the installed active.img"
    );
    let mid = std::fs::read_to_string(active.path("etc/machine-id")).unwrap_or_default();
    assert_eq!(mid.trim().len(), 32, "machine id in active.img: {mid:?}");
    drop(active);
    drop(state);
}

/// What `register` sends to the paired node.
const PAIRED_CONFIG: &str = "#cloud-config\ninstall:\n  poweroff: true\nstages:\n  boot:\n    - name: sent by register\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0644\n          content: sent by kairos-agent register\n";

/// Blank target disks, told apart from the medium by being virtio.
const TARGET_SIZE: u64 = 3 << 30;

fn tree() -> &'static Path {
    static TREE: OnceLock<PathBuf> = OnceLock::new();
    TREE.get_or_init(|| {
        let a = artifacts();
        // The generic initramfs plus the NIC's driver: kairos-init loads it for the virtio
        // NIC, so the pairing node has its LAN.
        let initrd = a.work.join("iso-initramfs.img");
        let mut modules = kairos_initramfs::generic_modules();
        modules.push("virtio_net".into());
        kairos_initramfs::build(
            &kairos_initramfs::InitramfsSpec {
                init_binary: a.init_binary.clone(),
                kernel: a.kernel.clone(),
                modules,
                extra_files: Vec::new(),
            },
            &initrd,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", initrd.display()));
        live_source_tree("iso-src", |s| {
            s.initrd = Some(initrd.clone());
            s.layout_file = Some(LAYOUT.into());
            s.image_files.extend([
                (
                    "/usr/libexec/kt-live-report".to_string(),
                    LIVE_REPORT.as_bytes().to_vec(),
                    0o755,
                ),
                (
                    "/usr/libexec/kt-iso-driver".to_string(),
                    INSTALLED_DRIVER.as_bytes().to_vec(),
                    0o755,
                ),
                (
                    "/etc/kairos/20_iso_test.yaml".to_string(),
                    image_config().into_bytes(),
                    0o600,
                ),
            ]);
        })
    })
}

fn auto_iso() -> &'static Path {
    static ISO: OnceLock<PathBuf> = OnceLock::new();
    ISO.get_or_init(|| {
        build_iso(
            "iso-auto",
            tree(),
            Some(AUTO_CONFIG),
            &["--grub-timeout", "1"],
        )
    })
}

fn pairing_iso() -> &'static Path {
    static ISO: OnceLock<PathBuf> = OnceLock::new();
    ISO.get_or_init(|| build_iso("iso-pair", tree(), None, &["--grub-timeout", "1"]))
}

fn blank(name: &str) -> PathBuf {
    let p = artifacts().work.join(format!("{name}.img"));
    let _ = std::fs::remove_file(&p);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(TARGET_SIZE))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

fn run(name: &str, spec: &BootSpec) -> BootResult {
    let r = kairos_qemu::boot::run(spec).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    println!(
        "---- serial log of {name} ({:.1} s, {:?}) ----\n{}\n---- end of {name} ----",
        r.elapsed.as_secs_f64(),
        r.exit,
        r.log
    );
    r
}

fn value(r: &BootResult, key: &str) -> String {
    driver_value(&r.log, key).unwrap_or_default()
}

/// The live report's lines: a live system booted from the medium, nothing of a disk mounted.
fn assert_live(r: &BootResult, firmware: Firmware, config: bool, what: &str) {
    assert_live_entry(r, "live", firmware, config, what);
}

/// [`assert_live`] for the menu entry `entry` (its GRUB id).
fn assert_live_entry(r: &BootResult, entry: &str, firmware: Firmware, config: bool, what: &str) {
    assert!(
        r.log.contains(&format!("KAIROS-GRUB: entry={entry}")),
        "{what}: GRUB from the medium did not boot the {entry} entry"
    );
    assert!(
        r.log.contains("starting: mode=live"),
        "{what}: not a live boot"
    );
    assert!(
        r.log
            .contains("the layout's VOLUMES (LABEL=COS_PERSISTENT:/usr/local) are not mounted"),
        "{what}: the live boot did not say why COS_PERSISTENT is left alone"
    );
    if config {
        assert_eq!(value(r, "medium-config"), "600 root", "{what}");
    }
    assert_eq!(value(r, "live_mode"), "yes", "{what}");
    assert!(
        value(r, "medium").contains("iso9660 ro"),
        "{what}: {}",
        value(r, "medium")
    );
    assert!(
        value(r, "root").starts_with("squashfs ro"),
        "{what}: {}",
        value(r, "root")
    );
    assert_eq!(value(r, "etc"), "overlay", "{what}");
    assert_eq!(value(r, "disk-mounts"), "0", "{what}: a disk was mounted");
    let fw = match firmware {
        Firmware::SeaBios => "bios",
        Firmware::Ovmf => "efi",
    };
    assert_eq!(value(r, "live-firmware"), fw, "{what}");
}

/// Live boot with install.auto onto `target`; asserts the install and the power-off; prints
/// the power-on-to-off figure.
fn auto_install(name: &str, medium: Medium, firmware: Firmware, target: &Path) {
    let spec = live_boot_spec(name, auto_iso(), medium, firmware, &[target], &[], 900);
    let r = run(name, &spec);
    assert_live(&r, firmware, true, name);
    assert!(
        r.log.contains("install: device auto: /dev/vd"),
        "{name}: the agent did not pick the blank disk"
    );
    assert!(
        r.log.contains(
            "install: recovery.squashfs is a copy of /run/initramfs/live/rootfs.squashfs"
        ),
        "{name}: recovery.squashfs was not copied from the medium"
    );
    assert!(
        r.log.contains("install.auto: done; powering off"),
        "{name}: the auto-install did not finish"
    );
    assert!(
        matches!(r.exit, BootExit::Exited(_)),
        "{name}: the VM did not power off: {:?}",
        r.exit
    );
    println!(
        "FIGURE iso {name}: power-on to installed and powered off {:.1} s (TCG)",
        r.elapsed.as_secs_f64()
    );
}

/// The installed disk alone, through its own firmware path and GRUB, until it powers off
/// (reboots reset the machine).
fn installed_boot(name: &str, disk: &Path, firmware: Firmware, timeout_s: u64) -> BootResult {
    let mut s = BootSpec::new(artifacts().work.join(format!("{name}.log")));
    s.disks = vec![disk.to_path_buf()];
    s.memory_mb = 768;
    s.kvm = std::env::var_os("KAIROS_KVM").is_some();
    s.timeout = Duration::from_secs(timeout_s);
    s.until = vec!["end Kernel panic".into()];
    s.extra_args = firmware.qemu_args();
    s.extra_args
        .extend(["-action".to_string(), "reboot=reset".to_string()]);
    run(name, &s)
}

fn assert_installed_active(r: &BootResult, firmware: Firmware, what: &str) {
    let lines = driver_lines(&r.log);
    assert!(
        lines.iter().any(|l| l == "driver done"),
        "{what}: the installed disk did not boot to the driver"
    );
    let state = value(r, "state");
    assert!(state.contains("\"mode\":\"active\""), "{what}: {state}");
    let fw = match firmware {
        Firmware::SeaBios => "bios",
        Firmware::Ovmf => "efi",
    };
    assert_eq!(value(r, "firmware"), fw, "{what}");
}

#[test]
fn cd_under_seabios_installs_the_disk_boots_bios_and_the_iso_again_changes_nothing() {
    require_root();
    let target = blank("iso-bios-target");
    auto_install(
        "iso-cd-seabios-install",
        Medium::Cd,
        Firmware::SeaBios,
        &target,
    );

    assert_configured_install(&target, &["bios"]);

    let r = installed_boot("iso-bios-installed", &target, Firmware::SeaBios, 400);
    assert_installed_active(&r, Firmware::SeaBios, "the BIOS-installed disk");
    // The templated hostname, rendered from the installed system's machine id; the grubenv
    // option on the kernel command line of the active entry.
    let host = value(&r, "hostname");
    let (name, mid4) = host.split_once(' ').unwrap_or_default();
    assert_eq!(mid4.len(), 4, "machine id: {host}");
    assert_eq!(name, format!("kairos-{mid4}"), "hostname: {host}");
    assert!(
        value(&r, "cmdline").contains("kt.grub_option=active"),
        "install.grub_options.extra_active_cmdline: {}",
        value(&r, "cmdline")
    );
    assert_eq!(
        value(&r, "config-file"),
        "644 applied from kairos-build iso --config",
        "the ISO's --config was not applied on the installed system"
    );
    assert!(
        r.log.contains("install.auto ignored: booted active"),
        "install.auto was not ignored on the installed system"
    );

    iso_again_changes_nothing(&target, Firmware::SeaBios);
}

/// The install.auto ISO again, now as a USB stick next to the disk it installed: live, the
/// refusal on the console, no install started, COS_PERSISTENT byte for byte the same.
fn iso_again_changes_nothing(target: &Path, firmware: Firmware) {
    let persistent = part_by_name(target, "persistent");
    let before = kairos_tests::partition_hash(target, persistent);
    let name = format!("iso-usb-{}-again", firmware.name());
    let spec = live_boot_spec(
        &name,
        auto_iso(),
        Medium::Usb,
        firmware,
        &[target],
        &[REFUSED],
        400,
    );
    let r = run(&name, &spec);
    assert_live(&r, firmware, true, &name);
    assert_eq!(
        r.matched.as_deref(),
        Some(REFUSED),
        "{name}: no refusal on the console"
    );
    assert!(
        !r.log.contains("install.auto: installing"),
        "{name}: the live system started an install"
    );
    drop(r);
    let after = kairos_tests::partition_hash(target, persistent);
    assert_eq!(before, after, "{name}: COS_PERSISTENT changed");
}

/// The console line of a refused install.auto (agent/src/install/mod.rs).
const REFUSED: &str = "not installing over it without install.force: true";

#[test]
fn cd_under_ovmf_installs_usb_again_changes_nothing_the_disk_boots_uefi_and_statereset_resets_it() {
    require_root();
    let target = blank("iso-uefi-target");
    auto_install("iso-cd-ovmf-install", Medium::Cd, Firmware::Ovmf, &target);
    // Booted UEFI, the installer made an ESP in front of COS_OEM, and the config's layout.
    assert_configured_install(&target, &["efi"]);
    iso_again_changes_nothing(&target, Firmware::Ovmf);
    // The statereset scenario's switch, on COS_OEM (kept by the reset).
    {
        let oem = Mounted::part_rw(&target, part_by_name(&target, "oem"));
        std::fs::write(oem.root().join("kt-statereset"), "1\n").expect("writing the switch");
    }
    let r = installed_boot("iso-uefi-installed", &target, Firmware::Ovmf, 900);
    let boots: Vec<&str> = r.log.split("Linux version").skip(1).collect();
    // Active (selects statereset), recovery (resets unattended), active again.
    assert_eq!(
        boots.len(),
        3,
        "expected 3 kernel boots, saw {}",
        boots.len()
    );
    // The first boot of the disk alone: active through its ESP, the ISO's --config applied.
    let first = BootResult {
        log: boots[0].to_string(),
        ..r.clone()
    };
    // (Its driver selects statereset instead of saying "driver done".)
    assert!(
        value(&first, "state").contains("\"mode\":\"active\""),
        "the UEFI-installed disk: {}",
        value(&first, "state")
    );
    assert_eq!(value(&first, "firmware"), "efi", "the UEFI-installed disk");
    assert_eq!(
        value(&first, "config-file"),
        "644 applied from kairos-build iso --config",
        "the ISO's --config was not applied on the UEFI-installed system"
    );
    assert!(
        boots[1].contains("kairos-agent: booted with kairos.reset: resetting the node unattended")
            && boots[1].contains("kairos-agent: reset done from recovery:"),
        "the second boot did not reset unattended"
    );
    assert_eq!(
        value(&r, "wrote"),
        "written before the reset",
        "the first active boot did not leave its file on COS_PERSISTENT"
    );
    assert!(
        value(&r, "select").contains("statereset"),
        "bootentry --select statereset: {}",
        value(&r, "select")
    );
    assert!(
        r.log.contains("kairos.reset"),
        "recovery was not booted for the reset"
    );
    // What the last boot (after the reset) says, not the first one's lines.
    let last = BootResult {
        log: boots[2].to_string(),
        ..r.clone()
    };
    assert_installed_active(&last, Firmware::Ovmf, "after the statereset");
    let persistent = driver_lines(&r.log)
        .into_iter()
        .filter_map(|l| l.strip_prefix("persistent ").map(str::to_string))
        .collect::<Vec<_>>();
    assert_eq!(persistent.len(), 2, "{persistent:?}");
    // Empty but for what every boot makes: the history and the bind stores' directory.
    let left: Vec<&str> = persistent[1]
        .split_whitespace()
        .filter(|e| ![".kairos-state", ".state", "lost+found"].contains(e))
        .collect();
    assert!(
        left.is_empty(),
        "COS_PERSISTENT was not wiped: {}",
        persistent[1]
    );
    assert_eq!(
        value(&last, "config-file"),
        "644 applied from kairos-build iso --config",
        "COS_OEM's config is gone after the reset"
    );
    let oem = Mounted::part(&target, part_by_name(&target, "oem"));
    assert_eq!(
        std::fs::read_to_string(oem.root().join("kt-step")).unwrap_or_default(),
        "1\n",
        "COS_OEM was not kept"
    );
    let p = Mounted::part(&target, part_by_name(&target, "persistent"));
    assert!(
        !p.root().join("kt-before-reset").exists(),
        "the file written before the reset is still on COS_PERSISTENT"
    );
}

/// The live console's pairing screen (agent/src/p2p.rs).
const QR_SHOWN: &str = "kairos-agent: install mode: waiting for `kairos-agent register`";

#[test]
fn without_install_auto_the_console_shows_a_qr_and_register_installs_the_node() {
    require_root();
    let agent = kairos_tests::build_agent().expect("kairos-agent for the host side");
    let lan = TapLan::new("iso", LAN_HOST).expect("the tap LAN");
    let target = blank("iso-pair-target");
    let name = "iso-usb-ovmf-pair";
    let mut spec = live_boot_spec(
        name,
        pairing_iso(),
        Medium::Usb,
        Firmware::Ovmf,
        &[&target],
        &[],
        900,
    );
    spec.netns = Some(lan.ns.clone());
    spec.extra_args.extend(lan.qemu_args());
    let log = spec.serial_log.clone();
    // A log of an earlier run must not be read as this one's.
    let _ = std::fs::remove_file(&log);
    let sent = artifacts().work.join("iso-pair-sent.yaml");
    std::fs::write(&sent, PAIRED_CONFIG).expect("writing the config to send");
    // The host side: wait for the QR on the serial console, then register with it.
    let mut cmd = lan.command(agent.to_str().expect("agent path"));
    let qr_file = artifacts().work.join("iso-pair-console.txt");
    let host = std::thread::spawn(move || {
        let t = Instant::now();
        let console = loop {
            // Lossy: GRUB's screen output is not all UTF-8.
            let read =
                || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
            if read().contains(QR_SHOWN) {
                // The code is drawn before that line; give the console a moment to finish.
                std::thread::sleep(Duration::from_millis(500));
                break read();
            }
            if t.elapsed() > Duration::from_secs(600) {
                return Err("no QR code on the console after 600 s".to_string());
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        std::fs::write(&qr_file, console.replace('\r', "")).map_err(|e| e.to_string())?;
        let o = cmd
            .args(["register", "--config"])
            .arg(&sent)
            .args(["--timeout", "300"])
            .arg(&qr_file)
            .output()
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "{}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    });
    let r = run(name, &spec);
    let registered = host.join().expect("the register thread");
    println!("---- kairos-agent register ----\n{registered:?}");
    assert_live(&r, Firmware::Ovmf, false, name);
    let registered = registered.unwrap_or_else(|e| panic!("register: {e}"));
    assert!(registered.contains("registered with node"), "{registered}");
    for needle in [
        "kairos-agent install --device",
        "kairos-agent manual-install",
    ] {
        assert!(r.log.contains(needle), "the console lacks {needle:?}");
    }
    assert!(
        matches!(r.exit, BootExit::Exited(_)),
        "the paired node did not power off: {:?}",
        r.exit
    );
    let oem = Mounted::part(&target, part_by_name(&target, "oem"));
    let cfg = std::fs::read_to_string(oem.root().join("90_custom.yaml"))
        .expect("the paired config on COS_OEM");
    assert!(cfg.contains("sent by kairos-agent register"), "{cfg}");
}

/// Presses `keys` (QEMU key codes) on the machine's keyboard through its QMP socket, once the
/// serial log shows GRUB's live menu; the socket is retried until QEMU has made it.
fn press_at_menu(qmp: PathBuf, log: PathBuf, keys: &'static [&'static str]) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let t = Instant::now();
    loop {
        let seen = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default())
            .contains("KAIROS-GRUB: live medium");
        if seen {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err("GRUB's live menu not on the serial log after 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = std::os::unix::net::UnixStream::connect(&qmp)
        .map_err(|e| format!("{}: {e}", qmp.display()))?;
    let mut reader = BufReader::new(sock.try_clone().map_err(|e| e.to_string())?);
    let mut w = sock;
    let mut line = String::new();
    // The greeting, then capabilities negotiation, then one send-key per key.
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let mut cmd = |json: String| -> Result<(), String> {
        w.write_all(json.as_bytes()).map_err(|e| e.to_string())?;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("QMP closed".into());
            }
            if line.contains("\"return\"") {
                return Ok(());
            }
            if line.contains("\"error\"") {
                return Err(format!("QMP: {line}"));
            }
        }
    };
    cmd(r#"{"execute":"qmp_capabilities"}"#.to_string())?;
    for key in keys {
        cmd(format!(
            r#"{{"execute":"send-key","arguments":{{"keys":[{{"type":"qcode","data":"{key}"}}]}}}}"#
        ))?;
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The menu's "Install Kairos to disk (unattended)" entry of the ISO built without a config:
/// picked by key presses at GRUB (End, Enter), it installs onto the blank disk with nothing
/// but that entry's command line (install.device unset means auto, as upstream).
#[test]
fn the_install_entry_of_an_iso_without_config_installs_the_blank_disk() {
    require_root();
    let target = blank("iso-entry-target");
    let name = "iso-cd-seabios-install-entry";
    let qmp = artifacts().work.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&qmp);
    let mut spec = live_boot_spec(
        name,
        pairing_iso(),
        Medium::Cd,
        Firmware::SeaBios,
        &[&target],
        &[INSTALLED_NO_FINISH],
        600,
    );
    spec.extra_args.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    let log = spec.serial_log.clone();
    let _ = std::fs::remove_file(&log);
    let keys = std::thread::spawn(move || press_at_menu(qmp, log, &["end", "ret"]));
    let r = run(name, &spec);
    keys.join()
        .expect("the key thread")
        .unwrap_or_else(|e| panic!("{name}: pressing keys at GRUB: {e}"));
    assert_live_entry(&r, "install", Firmware::SeaBios, false, name);
    assert!(
        r.log.contains("install: device auto: /dev/vd"),
        "{name}: the agent did not pick the blank disk"
    );
    assert_eq!(
        r.matched.as_deref(),
        Some(INSTALLED_NO_FINISH),
        "{name}: the install did not finish"
    );
    drop(r);
    let names: Vec<String> = gpt_table(&target).into_iter().map(|p| p.1).collect();
    assert_eq!(
        names,
        ["bios", "oem", "recovery", "state", "persistent"],
        "{name}: the installed GPT"
    );
    let state = Mounted::part(&target, part_by_name(&target, "state"));
    assert!(
        state.path("cOS/active.img").is_file(),
        "{name}: no active.img on COS_STATE"
    );
}

/// install.auto's last line when the config asks for neither reboot nor power-off.
const INSTALLED_NO_FINISH: &str = "install.auto: done; reboot to use the new system";

/// The figure for a real distribution: the Debian 12 systemd tree with Debian's kernel (the
/// artifacts test's user image, cached) made Kairos-ready by `kairos-build image` into a
/// `dir:`, then `kairos-build iso` from it. Build only; the ISO's parts are checked with
/// xorriso's listing.
#[test]
fn the_debian_systemd_image_makes_an_iso() {
    require_root();
    let a = artifacts();
    let kt = kairos_qemu::debian::cached_or_build_with_kernel()
        .unwrap_or_else(|e| panic!("the Debian tree with its kernel: {e}"));
    let src = a.work.join("iso-debian-src.tree");
    kairos_qemu::debian::copy_tree(&kt.tree, &src).unwrap_or_else(|e| panic!("{e}"));
    let ready = a.work.join("iso-debian-ready.tree");
    let _ = std::fs::remove_dir_all(&ready);
    let t = Instant::now();
    let o = Command::new(kairos_tests::iso::kairos_build_bin())
        .args(["image", "--source"])
        .arg(format!("dir:{}", src.display()))
        .arg("--out")
        .arg(format!("dir:{}", ready.display()))
        .arg("--init")
        .arg(&a.init_binary)
        .output()
        .expect("kairos-build image");
    println!(
        "--- kairos-build image: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "kairos-build image failed");
    println!(
        "FIGURE iso debian: kairos-build image (dir: -> dir:) {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&src);
    let iso = build_iso("iso-debian", &ready, Some(AUTO_CONFIG), &[]);
    let _ = std::fs::remove_dir_all(&ready);
    let o = Command::new("xorriso")
        .args(["-indev"])
        .arg(&iso)
        .args(["-find", "/", "-type", "f"])
        .output()
        .expect("xorriso");
    let files = String::from_utf8_lossy(&o.stdout);
    for f in [
        "/boot/kernel",
        "/boot/initrd",
        "/rootfs.squashfs",
        "/boot/grub2/grub.cfg",
        "/config.yaml",
        "/EFI/BOOT/BOOTX64.EFI",
    ] {
        assert!(
            files.lines().any(|l| l.trim_matches('\'') == f),
            "{f} not in the ISO:\n{files}"
        );
    }
    let _ = std::fs::remove_file(&iso);
}
