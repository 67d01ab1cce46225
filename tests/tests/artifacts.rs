//! `kairos-build` end to end (issue "turn a user's OS image into bootable raw and qcow2
//! disks"): the Debian 12 systemd tree with Debian's kernel, kmod and udev installed in it (a
//! user's image, `kairos_qemu::debian::cached_or_build_with_kernel`) goes through
//! `kairos-build image` into the local registry as v1 and v2; `kairos-build raw` makes disks
//! from `oci:` v1, which boot in QEMU:
//! - one hybrid raw file, copied onto a disk four times larger: SeaBIOS -> GRUB -> systemd with
//!   the agent's daemon and the `--config` applied, growing COS_PERSISTENT on that first boot
//!   (the host reads the GPT entry and the ext4 size back); the same file under OVMF on the
//!   second boot, with no second grow and the first boot's file still there;
//! - power cuts during the grow (QEMU killed where kairos-init pauses, direct kernel boots with
//!   the image's own kernel, initrd and GRUB command line), then a GRUB boot that finishes it;
//! - USB storage behind xhci (SeaBIOS, GRUB) and an SD card (direct kernel boot);
//! - the qcow2 output as a node that upgrades to v2 from the registry and reboots into it;
//! - bad input: named errors (exit 2), nothing written.
//!
//! Everything is built once per test process and shared; disks are sparse copies. Run as
//! root: `cargo test --release -p kairos-tests --test artifacts`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kairos_qemu::boot::{BootExit, BootResult, BootSpec};
use kairos_tests::diskimg::{Mounted, part_by_name};
use kairos_tests::registry::Registry;
use kairos_tests::{
    Bus, DRIVER_DONE, boots, build_init, cargo_build_bin, driver_value, grow_for_sd, require_root,
    work_dir,
};

const REPO: &str = "kairos/debian";
const VERSION_FILE: &str = "etc/kairos-version";
/// OVMF as one flash image (the ovmf package), given to QEMU with -bios.
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// kairos-init's lines when it grows the GPT entry, then the ext4 in it (grow.rs).
const GREW: &str = "kairos-init: grew COS_PERSISTENT";
const GREW_FS: &str = "kairos-init: grew the filesystem on COS_PERSISTENT";
/// Any grow at all (GPT, interrupted GPT grow, filesystem).
const GREW_ANY: &[&str] = &[
    "kairos-init: grew ",
    "kairos-init: finished an interrupted GPT grow",
];
const SWITCH_ROOT: &str = "kairos-init: switch_root to /sysroot";

/// The image's own test program (a user's image has its own software): started by the
/// `--config`'s network stage, once per boot. It prints what the tests check as `KAIROS-T:`
/// lines: the version, the firmware, the config's effect, the agent's daemon, a file on
/// COS_PERSISTENT written on the first boot and found on later ones. On a machine with a NIC
/// it is the upgrade node: the first boot upgrades from the registry and reboots (a step
/// counter on COS_PERSISTENT, synced first, keeps it to once). Then it powers off.
const DRIVER: &str = r#"#!/bin/sh
mkdir /run/kairos-test-driver 2>/dev/null || exit 0
say() { echo "KAIROS-T: $*"; }
n=0
while [ ! -e /run/kairos/boot-stage-ok ] && [ $n -lt 240 ]; do sleep 0.25; n=$((n+1)); done
if [ -e /run/kairos/boot-stage-ok ]; then say "boot-stage-ok"; else say "no boot-stage-ok after 60 s"; fi
say "uptime $(cut -d' ' -f1 /proc/uptime)"
say "pid1 $(cat /proc/1/comm)"
say "version $(cat /etc/kairos-version)"
if [ -d /sys/firmware/efi ]; then say "firmware efi"; else say "firmware bios"; fi
f=/etc/kairos-test/hello.txt
[ -f $f ] && say "config-file $(stat -c '%a' $f) $(cat $f)"
say "oem-config $(stat -c '%a %U' /oem/90_custom.yaml 2>&1)"
n=0
while [ ! -e /run/kairos/agent-ready ] && [ $n -lt 240 ]; do sleep 0.25; n=$((n+1)); done
pid=$(systemctl show -p MainPID --value kairos-agent.service)
say "daemon $(systemctl is-active kairos-agent.service) ready=$([ -e /run/kairos/agent-ready ] && echo yes || echo no) cmdline=$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null)"
say "state $(kairos-agent state 2>&1 | tr '\n' ' ')"
say "persistent $(df -k /usr/local | tail -n1)"
s=/usr/local/kt-survive
if [ -f $s ]; then
  say "survived $(cat $s)"
else
  echo "boot $(cat /proc/sys/kernel/random/boot_id)" > $s; sync
  say "wrote $(cat $s)"
fi
if grep -qs '^0x0200' /sys/bus/pci/devices/*/class; then
  nic=; n=0
  while [ -z "$nic" ] && [ $n -lt 80 ]; do
    nic=$(ls /sys/class/net | grep -v '^lo$' | head -n1); [ -n "$nic" ] || sleep 0.25; n=$((n+1))
  done
  m=/usr/local/kt-step
  step=$(cat $m 2>/dev/null || echo 0)
  say "step $step nic $nic"
  if [ "$step" = 0 ]; then
    echo 1 > $m; sync
    bb=/usr/libexec/kt/busybox
    $bb ip link set $nic up && $bb ip addr add 10.0.2.15/24 dev $nic && $bb ip route add default via 10.0.2.2
    say "net $($bb ip -4 addr show $nic | grep -c 10.0.2.15)"
    t0=$(cut -d' ' -f1 /proc/uptime)
    kairos-agent upgrade --allow-insecure-registries --source "$(cat /etc/kairos-test/upgrade-source)" >/dev/console 2>&1
    rc=$?
    say "upgrade-exit $rc from $t0 to $(cut -d' ' -f1 /proc/uptime)"
    if [ $rc = 0 ]; then say "rebooting"; systemctl reboot; exit 0; fi
  fi
fi
say "driver done"
systemctl poweroff
"#;

/// The `--config` of every disk: a file from the boot stage (the proof it was applied), the
/// upgrade source for the node, and the driver's start.
fn config_text(port: &str) -> String {
    format!(
        "#cloud-config\nstages:\n  boot:\n    - name: artifacts test\n      files:\n        - path: /etc/kairos-test/hello.txt\n          permissions: 0644\n          content: applied from kairos-build raw --config\n        - path: /etc/kairos-test/upgrade-source\n          permissions: 0644\n          content: oci:10.0.2.2:{port}/{REPO}:v2\n  network:\n    - name: start the test driver\n      commands:\n        - setsid /usr/libexec/kairos-test-driver </dev/null >/dev/console 2>&1 &\n"
    )
}

fn figure(what: &str, t: Duration) {
    println!("FIGURE artifacts {what}: {:.1} s", t.as_secs_f64());
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

// ---- The tools and the shared artifacts, built once per test process ----

/// kairos-build, with kairos-agent next to it (where it looks by default), both in the test
/// profile; and kairos-init as it ships (`build_init`, shared with the other tests), which
/// `image` gets with `--init`.
struct Bins {
    build: PathBuf,
    init: PathBuf,
}

fn bins() -> &'static Bins {
    static BINS: OnceLock<Result<Bins, String>> = OnceLock::new();
    let r = BINS.get_or_init(|| {
        let t = Instant::now();
        let init = build_init().map_err(|e| format!("{e:#}"))?;
        cargo_build_bin("kairos-agent").map_err(|e| format!("{e:#}"))?;
        let build = cargo_build_bin("kairos-build").map_err(|e| format!("{e:#}"))?;
        figure(
            "cargo build of kairos-init, kairos-agent, kairos-build",
            t.elapsed(),
        );
        Ok(Bins { build, init })
    });
    match r {
        Ok(b) => b,
        Err(e) => panic!("building kairos-build: {e}"),
    }
}

/// Runs `kairos-build ARGS`, echoing its output.
fn kairos_build(args: &[&str]) -> Output {
    let out = Command::new(&bins().build)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running kairos-build");
    println!(
        "--- kairos-build {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `kairos-build ARGS`, which must succeed; prints its time as the figure `what`. An error
/// (not a panic) so a shared build that fails is not retried by every waiting test.
fn kairos_build_ok(what: &str, args: &[&str]) -> Result<(), String> {
    let t = Instant::now();
    let out = kairos_build(args);
    if !out.status.success() {
        return Err(format!(
            "kairos-build {what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    figure(what, t.elapsed());
    Ok(())
}

/// The local registry for the whole process. A static is never dropped, so a watcher stops
/// the registry and removes its storage once this process is gone.
fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let r = Registry::start().expect("starting the registry");
        // Started in the background by a shell that exits at once (nothing left to reap).
        let watch = format!(
            "(while kill -0 {me} 2>/dev/null; do sleep 1; done; kill {pid}; sleep 1; rm -rf '{dir}') >/dev/null 2>&1 &",
            me = std::process::id(),
            pid = r.pid(),
            dir = r.dir().display()
        );
        let st = Command::new("sh")
            .args(["-c", &watch])
            .stdin(Stdio::null())
            .status()
            .expect("starting the registry's watcher");
        assert!(st.success(), "starting the registry's watcher");
        r
    })
}

fn port() -> String {
    let addr = &registry().addr;
    addr.rsplit(':').next().unwrap_or(addr).to_string()
}

/// `oci:` reference of the image `tag` as the host sees the registry.
fn host_ref(tag: &str) -> String {
    format!("oci:{}/{REPO}:{tag}", registry().addr)
}

/// v1 and v2 of the user's image, made Kairos-ready by `kairos-build image` and pushed.
fn images() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let init = bins().init.to_str().ok_or("kairos-init path")?;
        let t = Instant::now();
        let kt = kairos_qemu::debian::cached_or_build_with_kernel()
            .map_err(|e| format!("the Debian tree with its kernel: {e}"))?;
        figure(
            "Debian tree with kernel, kmod, udev (cached after the first run)",
            t.elapsed(),
        );
        println!(
            "FIGURE artifacts Debian+kernel tree: {} ({} bytes), kernel {}",
            mb(kt.bytes),
            kt.bytes,
            kt.kver
        );
        let tree = work_dir().join("artifacts-src.tree");
        kairos_qemu::debian::copy_tree(&kt.tree, &tree).map_err(|e| e.to_string())?;
        user_files(&tree).map_err(|e| format!("{e:#}"))?;
        for tag in ["v1", "v2"] {
            std::fs::write(tree.join(VERSION_FILE), format!("{tag}\n"))
                .map_err(|e| e.to_string())?;
            let src = format!("dir:{}", tree.display());
            kairos_build_ok(
                &format!("image {tag} (dir: -> oci: push)"),
                &[
                    "image",
                    "--source",
                    &src,
                    "--out",
                    &host_ref(tag),
                    "--init",
                    init,
                ],
            )?;
        }
        let _ = std::fs::remove_dir_all(&tree);
        Ok(())
    });
    if let Err(e) = r {
        panic!("building the images: {e}");
    }
}

/// What the user's image carries for these tests: the driver, a static busybox for `ip` on
/// the upgrade node, the host's CA bundle (the agent's HTTP client wants one).
fn user_files(tree: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let put = |rel: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        let p = tree.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, data)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    kairos_qemu::apt::ensure_packages(&["busybox-static"])?;
    put("usr/libexec/kairos-test-driver", DRIVER.as_bytes(), 0o755)?;
    put(
        "usr/libexec/kt/busybox",
        &std::fs::read(kairos_qemu::rootfs::HOST_BUSYBOX)?,
        0o755,
    )?;
    put(
        "etc/ssl/certs/ca-certificates.crt",
        &std::fs::read("/etc/ssl/certs/ca-certificates.crt")?,
        0o644,
    )?;
    Ok(())
}

/// The hybrid raw disk from `oci:` v1 and what the direct boots need from it.
struct Raw {
    path: PathBuf,
    bytes: u64,
    /// `/boot/vmlinuz` and `/boot/initrd` read out of its active.img.
    kernel: PathBuf,
    initrd: PathBuf,
    /// The active entry's command line from its grub.cfg.
    cmdline: String,
    persistent: u32,
    config: PathBuf,
}

fn write_config() -> PathBuf {
    let p = work_dir().join("artifacts-config.yaml");
    std::fs::write(&p, config_text(&port())).expect("writing the config");
    p
}

fn raw() -> &'static Raw {
    static RAW: OnceLock<Result<Raw, String>> = OnceLock::new();
    let r = RAW.get_or_init(|| {
        images();
        let path = work_dir().join("artifacts.raw");
        let _ = std::fs::remove_file(&path);
        let config = write_config();
        kairos_build_ok(
            "raw --firmware hybrid (oci: pull, images, GRUB)",
            &[
                "raw",
                "--source",
                &host_ref("v1"),
                "--out",
                path.to_str().ok_or("path")?,
                "--firmware",
                "hybrid",
                "--config",
                config.to_str().ok_or("path")?,
            ],
        )?;
        let bytes = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
        println!(
            "FIGURE artifacts raw disk: {} apparent, {} allocated",
            mb(bytes),
            mb(allocated(&path))
        );
        println!("{}", sgdisk(&["-p"], &path));
        let state = part_by_name(&path, "state");
        let persistent = part_by_name(&path, "persistent");
        let (kernel, initrd, cmdline) = boot_files(&path, state);
        Ok(Raw {
            path,
            bytes,
            kernel,
            initrd,
            cmdline,
            persistent,
            config,
        })
    });
    match r {
        Ok(r) => r,
        Err(e) => panic!("building the raw disk: {e}"),
    }
}

// ---- Reading disks on the host ----

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn sgdisk(args: &[&str], disk: &Path) -> String {
    let out = Command::new("sgdisk")
        .args(args)
        .arg(disk)
        .output()
        .expect("sgdisk");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// (first, last) sector of partition `n` from the GPT.
fn extent(disk: &Path, n: u32) -> (u64, u64) {
    let (at, len) = kairos_qemu::disk::partition_bytes(disk, n)
        .unwrap_or_else(|e| panic!("{}: partition {n}: {e}", disk.display()));
    (at / SECTOR, (at + len) / SECTOR - 1)
}

/// The ext4 superblock of partition `n`: (label, blocks, block size).
fn ext4_size(disk: &Path, n: u32) -> (String, u64, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let (first, _) = extent(disk, n);
    let mut sb = [0u8; 1024];
    let mut f = std::fs::File::open(disk).expect("open disk");
    f.seek(SeekFrom::Start(first * SECTOR + 1024))
        .expect("seek");
    f.read_exact(&mut sb).expect("read superblock");
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]) as u64;
    assert_eq!(
        &sb[0x38..0x3a],
        &[0x53, 0xef],
        "partition {n}: no ext4 magic"
    );
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let blocks = u32_at(0x04)
        | if incompat_64bit {
            u32_at(0x150) << 32
        } else {
            0
        };
    let block_size = 1024u64 << u32_at(0x18);
    let label = String::from_utf8_lossy(&sb[0x78..0x88])
        .trim_end_matches('\0')
        .to_string();
    (label, blocks, block_size)
}

/// COS_PERSISTENT fills the disk: its GPT entry ends at the last usable sector (within the
/// 1 MiB alignment), the ext4 in it spans the partition, and the GPT checks out.
fn assert_grown(disk: &Path, n: u32, before_last: u64, when: &str) {
    let sectors = std::fs::metadata(disk).expect("disk").len() / SECTOR;
    let (first, last) = extent(disk, n);
    let last_usable = sectors - 34;
    assert!(
        last > before_last && last <= last_usable && last + 2048 > last_usable,
        "{when}: COS_PERSISTENT ends at sector {last} (was {before_last}), the disk's last usable is {last_usable}"
    );
    let (label, blocks, bs) = ext4_size(disk, n);
    let part_bytes = (last - first + 1) * SECTOR;
    assert_eq!(label, "COS_PERSISTENT", "{when}");
    assert!(
        blocks * bs <= part_bytes && blocks * bs + 8 * MIB > part_bytes,
        "{when}: the ext4 has {blocks} blocks of {bs} bytes in a {part_bytes}-byte partition"
    );
    let verify = sgdisk(&["-v"], disk);
    assert!(verify.contains("No problems found"), "{when}: {verify}");
    println!(
        "{when}: COS_PERSISTENT sectors {first}-{last} of {sectors}; ext4 {blocks} x {bs} bytes ({})",
        mb(blocks * bs)
    );
}

/// The active image's `/boot/vmlinuz` and `/boot/initrd` (copied out next to the disk) and
/// the command line of grub.cfg's active entry, with GRUB's variables left out.
fn boot_files(disk: &Path, state: u32) -> (PathBuf, PathBuf, String) {
    let st = Mounted::part(disk, state);
    let cfg =
        std::fs::read_to_string(st.path("grub2/grub.cfg")).expect("COS_STATE:/grub2/grub.cfg");
    let cmdline = active_cmdline(&cfg);
    let active = Mounted::new(&st.path("cOS/active.img"), None, false);
    let kernel = disk.with_extension("vmlinuz");
    let initrd = disk.with_extension("initrd");
    for (rel, to) in [("boot/vmlinuz", &kernel), ("boot/initrd", &initrd)] {
        std::fs::copy(active.resolve(rel), to).unwrap_or_else(|e| panic!("active.img:/{rel}: {e}"));
    }
    drop(active);
    drop(st);
    println!(
        "active.img: kernel {}, initrd {}; active command line: {cmdline}",
        mb(std::fs::metadata(&kernel).map(|m| m.len()).unwrap_or(0)),
        mb(std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0))
    );
    (kernel, initrd, cmdline)
}

/// The `linux` line of the `--id cos` entry, without the kernel path and `${...}` words.
fn active_cmdline(cfg: &str) -> String {
    let entry = cfg
        .split("menuentry ")
        .find(|e| e.contains("--id cos "))
        .expect("grub.cfg has an entry with --id cos");
    let linux = entry
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("linux "))
        .expect("the cos entry has a linux line");
    linux
        .split_whitespace()
        .skip(2)
        .filter(|w| !w.contains("${"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A sparse copy of `from` at `to`, extended to `size` bytes when given.
fn copy_disk(from: &Path, to: &Path, size: Option<u64>) {
    let _ = std::fs::remove_file(to);
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "copying {}", from.display());
    if let Some(size) = size {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(to)
            .expect("open copy");
        f.set_len(size).expect("extending the copy");
    }
}

// ---- Boots ----

fn spec(name: &str, until: &[&str], timeout_s: u64) -> BootSpec {
    let mut s = BootSpec::new(work_dir().join(format!("artifacts-{name}.log")));
    s.memory_mb = 1024;
    s.kvm = std::env::var_os("KAIROS_KVM").is_some();
    s.until = until.iter().map(|u| u.to_string()).collect();
    s.timeout = Duration::from_secs(timeout_s);
    s
}

fn boot(name: &str, s: BootSpec) -> BootResult {
    let r = kairos_qemu::boot::run(&s).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    println!(
        "---- serial log of {name} ({:.1} s, {:?}) ----\n{}\n---- end of {name} ----",
        r.elapsed.as_secs_f64(),
        r.exit,
        r.log
    );
    if !r.qemu_stderr.trim().is_empty() {
        println!("qemu stderr of {name}: {}", r.qemu_stderr);
    }
    figure(&format!("boot {name}"), r.elapsed);
    r
}

/// The image's kernel and initrd started by QEMU with grub.cfg's active command line plus
/// `extra`, the disk given as `drive` arguments.
fn direct(r: &Raw, s: &mut BootSpec, extra: &str) {
    s.kernel = Some(r.kernel.clone());
    s.initrd = Some(r.initrd.clone());
    s.append = Some(format!("{} {extra}", r.cmdline).trim().to_string());
}

fn said(r: &BootResult, key: &str) -> String {
    driver_value(&r.log, key)
        .unwrap_or_else(|| panic!("the driver did not say {key:?}"))
        .trim()
        .to_string()
}

fn has(log: &str, needle: &str) -> bool {
    log.contains(needle)
}

#[track_caller]
fn assert_has(log: &str, needle: &str, what: &str) {
    assert!(has(log, needle), "{what}: the serial log lacks {needle:?}");
}

#[track_caller]
fn assert_lacks(log: &str, needle: &str, what: &str) {
    assert!(!has(log, needle), "{what}: the serial log has {needle:?}");
}

/// What every full boot of these disks shows: GRUB's active entry, systemd as PID 1, the
/// config applied (file and the 0600 OEM copy), the agent's daemon running.
#[track_caller]
fn assert_node(r: &BootResult, what: &str, version: &str) {
    assert_has(&r.log, "KAIROS-GRUB: entry=cos", what);
    assert_has(&r.log, "starting: mode=active image=/cOS/active.img", what);
    assert_has(&r.log, SWITCH_ROOT, what);
    assert_eq!(said(r, "pid1"), "systemd", "{what}");
    assert_eq!(said(r, "version"), version, "{what}");
    assert_eq!(
        said(r, "config-file"),
        "644 applied from kairos-build raw --config",
        "{what}"
    );
    assert_eq!(said(r, "oem-config"), "600 root", "{what}");
    let daemon = said(r, "daemon");
    assert!(
        daemon.starts_with("active ready=yes cmdline=/usr/bin/kairos-agent daemon"),
        "{what}: daemon {daemon}"
    );
    let state = said(r, "state");
    assert!(state.contains("\"active\""), "{what}: state {state}");
}

// ---- Tests ----

fn status_code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// A refusal: exit code 2, stderr naming `names` (each), and no `out` afterwards.
#[track_caller]
fn assert_refused(o: &Output, names: &[&str], out: &Path, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        status_code(o),
        Some(2),
        "{what}: exit status; stderr:\n{err}"
    );
    for n in names {
        assert!(
            err.to_lowercase().contains(&n.to_lowercase()),
            "{what}: the error does not name {n:?}:\n{err}"
        );
    }
    assert!(
        out.symlink_metadata().is_err(),
        "{what}: {} was written",
        out.display()
    );
    println!("refused as expected ({what}): {}", err.trim());
}

/// No QEMU and no image: a source without a kernel, an unknown `--format`.
#[test]
fn bad_input_needing_no_image_is_named_and_writes_nothing() {
    require_root();
    let init = bins().init.to_str().expect("path");
    let t = tempfile::tempdir().expect("temp dir");
    let tree = t.path().join("no-kernel");
    for d in ["etc", "usr/bin", "boot", "sbin"] {
        std::fs::create_dir_all(tree.join(d)).expect("tree");
    }
    std::fs::write(tree.join("etc/os-release"), "ID=debian\nVERSION_ID=12\n").expect("os-release");
    let src = format!("dir:{}", tree.display());

    let out = t.path().join("image-out");
    let o = kairos_build(&[
        "image",
        "--source",
        &src,
        "--out",
        &format!("dir:{}", out.display()),
        "--init",
        init,
    ]);
    assert_refused(
        &o,
        &["kernel"],
        &out,
        "image from a source without a kernel",
    );

    let archive = t.path().join("image.tar");
    let o = kairos_build(&[
        "image",
        "--source",
        &src,
        "--out",
        &format!("ocifile:{}", archive.display()),
        "--init",
        init,
    ]);
    assert_refused(
        &o,
        &["kernel"],
        &archive,
        "image (ocifile:) without a kernel",
    );

    let disk = t.path().join("disk.raw");
    let o = kairos_build(&[
        "raw",
        "--source",
        &src,
        "--out",
        disk.to_str().expect("path"),
        "--format",
        "vmdk",
    ]);
    assert_refused(&o, &["--format", "vmdk"], &disk, "unknown --format");

    let o = kairos_build(&[
        "raw",
        "--source",
        &src,
        "--out",
        disk.to_str().expect("path"),
    ]);
    assert_refused(&o, &["kernel"], &disk, "raw from a source without a kernel");
}

/// With a good source (v1 from the registry): a `--size` below what the images need, a
/// `--config` that cannot be read.
#[test]
fn bad_size_or_config_is_named_and_writes_nothing() {
    require_root();
    images();
    let t = tempfile::tempdir().expect("temp dir");
    let disk = t.path().join("disk.raw");
    let disk_s = disk.to_str().expect("path");
    let src = host_ref("v1");

    let o = kairos_build(&["raw", "--source", &src, "--out", disk_s, "--size", "300M"]);
    assert_refused(
        &o,
        &["--size", "300M"],
        &disk,
        "--size below what the images need",
    );

    let missing = t.path().join("no-such-config.yaml");
    let o = kairos_build(&[
        "raw",
        "--source",
        &src,
        "--out",
        disk_s,
        "--config",
        missing.to_str().expect("path"),
    ]);
    assert_refused(
        &o,
        &["--config", missing.to_str().expect("path")],
        &disk,
        "unreadable --config",
    );
    // A directory is not a readable config either.
    let o = kairos_build(&[
        "raw",
        "--source",
        &src,
        "--out",
        disk_s,
        "--config",
        t.path().to_str().expect("path"),
    ]);
    assert_refused(&o, &["--config"], &disk, "--config naming a directory");
}

/// The qcow2 output as a node: grown to 4 GiB more with `qemu-img resize`, it boots through
/// GRUB (first boot: grows COS_PERSISTENT), upgrades from the registry to v2 in the guest,
/// reboots (same QEMU, a reset) into v2 and powers off.
#[test]
fn qcow2_node_upgrades_from_the_registry_and_reboots_into_v2() {
    require_root();
    // kairos-build converts with qemu-img; `kairos-qemu setup` installs it.
    kairos_qemu::apt::ensure_packages(&["qemu-utils"]).expect("qemu-utils");
    images();
    let config = write_config();
    let node = work_dir().join("artifacts-node.qcow2");
    let _ = std::fs::remove_file(&node);
    kairos_build_ok(
        "raw --format qcow2 (oci: pull, images, GRUB, convert)",
        &[
            "raw",
            "--source",
            &host_ref("v1"),
            "--out",
            node.to_str().expect("path"),
            "--format",
            "qcow2",
            "--config",
            config.to_str().expect("path"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&node)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img info JSON");
    assert_eq!(info["format"], "qcow2", "{info}");
    let virtual_size = info["virtual-size"].as_u64().expect("virtual-size");
    println!(
        "FIGURE artifacts qcow2 disk: {} virtual, {} file",
        mb(virtual_size),
        mb(std::fs::metadata(&node).map(|m| m.len()).unwrap_or(0))
    );
    // Room on COS_PERSISTENT for the upgrade's download and unpack (its default work dir).
    let st = Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&node)
        .arg(format!("{}", virtual_size + 4 * GIB))
        .status()
        .expect("qemu-img resize");
    assert!(st.success(), "qemu-img resize");

    let mut s = spec("qcow2-upgrade", &[DRIVER_DONE], 1500);
    s.disks = vec![node.clone()];
    // Parsed after -no-reboot, so it wins: the guest's reboot is a reset, as on a machine.
    s.extra_args = [
        "-nic",
        "user,model=virtio-net-pci",
        "-action",
        "reboot=reset",
    ]
    .map(String::from)
    .to_vec();
    let r = boot("qcow2-upgrade", s);
    let b = boots(&r.log);
    assert!(
        b.len() >= 2,
        "expected two boots (upgrade, reboot), got {}",
        b.len()
    );
    let first = &b[0];
    assert_has(first, GREW, "first boot of the qcow2 node");
    assert_has(first, "KAIROS-T: version v1", "first boot");
    assert_has(first, "KAIROS-T: net 1", "first boot: the guest's address");
    assert_has(
        first,
        "KAIROS-T: upgrade-exit 0 ",
        "first boot: the upgrade",
    );
    assert_has(first, "KAIROS-T: rebooting", "first boot");
    let last = &b[b.len() - 1];
    assert_has(last, "KAIROS-GRUB: entry=cos", "after the reboot");
    assert_has(last, "KAIROS-T: version v2", "after the reboot");
    assert_has(last, "KAIROS-T: step 1 ", "after the reboot");
    assert_has(last, DRIVER_DONE, "after the reboot");
    for g in GREW_ANY {
        assert!(!has(last, g), "the reboot grew again: {g:?}");
    }
    let daemon = driver_value(last, "daemon").unwrap_or_default();
    assert!(
        daemon.starts_with("active ready=yes"),
        "after the reboot: daemon {daemon}"
    );
    let state = driver_value(last, "state").unwrap_or_default();
    assert!(state.contains("\"active\""), "after the reboot: {state}");
    if let Some(up) = driver_value(first, "upgrade-exit") {
        let t: Vec<f64> = up
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if let [_, t0, t1] = t[..] {
            println!(
                "FIGURE artifacts in-guest upgrade to v2 (TCG): {:.1} s",
                t1 - t0
            );
        }
    }
    let _ = std::fs::remove_file(&node);
}

/// One hybrid raw file on a disk four times its size: SeaBIOS boot (grows COS_PERSISTENT,
/// writes a file there, powers off cleanly), then OVMF boot of the same file (no second grow,
/// the file is still there). Both reach systemd with the agent's daemon and the config.
#[test]
fn raw_hybrid_boots_seabios_then_ovmf_and_grows_persistent_once() {
    require_root();
    kairos_qemu::apt::ensure_packages(&["ovmf"]).expect("OVMF");
    let raw = raw();
    let disk = work_dir().join("artifacts-4x.raw");
    copy_disk(&raw.path, &disk, Some(raw.bytes * 4));
    let (_, before_last) = extent(&raw.path, raw.persistent);

    let mut s = spec("seabios-grow", &[], 600);
    s.disks = vec![disk.clone()];
    let r1 = boot("seabios-grow", s);
    assert!(
        matches!(r1.exit, BootExit::Exited(_)),
        "the first boot did not power off: {:?}",
        r1.exit
    );
    assert_node(&r1, "SeaBIOS boot", "v1");
    assert_eq!(said(&r1, "firmware"), "bios");
    assert_has(&r1.log, GREW, "SeaBIOS boot");
    assert_has(&r1.log, GREW_FS, "SeaBIOS boot");
    assert!(said(&r1, "wrote").starts_with("boot "), "SeaBIOS boot");
    assert_has(&r1.log, DRIVER_DONE, "SeaBIOS boot");
    assert_grown(&disk, raw.persistent, before_last, "after the first boot");
    let grown = extent(&disk, raw.persistent);

    let mut s = spec("ovmf-second", &[DRIVER_DONE], 600);
    s.disks = vec![disk.clone()];
    s.extra_args = vec!["-bios".into(), OVMF.into()];
    let r2 = boot("ovmf-second", s);
    assert_node(&r2, "OVMF boot", "v1");
    assert_eq!(said(&r2, "firmware"), "efi");
    for g in GREW_ANY {
        assert!(!has(&r2.log, g), "the second boot grew again: {g:?}");
    }
    assert_eq!(
        said(&r2, "survived"),
        said(&r1, "wrote"),
        "the first boot's file"
    );
    assert_eq!(extent(&disk, raw.persistent), grown, "the GPT entry moved");
    // The host reads the file back from the grown partition.
    let p = Mounted::part(&disk, raw.persistent);
    let on_disk =
        std::fs::read_to_string(p.path("kt-survive")).expect("COS_PERSISTENT:/kt-survive");
    assert_eq!(on_disk.trim(), said(&r1, "wrote"));
    drop(p);
    let _ = std::fs::remove_file(&disk);
}

/// Power cuts during the grow: QEMU killed where kairos-init pauses (the entries staged, the
/// GPT switched), then a GRUB boot must still reach the active image and finish the grow.
#[test]
fn raw_power_cut_during_the_grow_leaves_a_disk_that_boots_and_grows() {
    require_root();
    let raw = raw();
    let (_, before_last) = extent(&raw.path, raw.persistent);
    for point in ["grow-entries", "grow-gpt"] {
        let disk = work_dir().join(format!("artifacts-cut-{point}.raw"));
        copy_disk(&raw.path, &disk, Some(raw.bytes * 4));
        let needle = format!("kairos-init: paused at {point} (rd.kairos.pause)");
        let name = format!("cut-{point}");
        let mut s = spec(&name, &[&needle], 300);
        s.disks = vec![disk.clone()];
        direct(raw, &mut s, &format!("rd.kairos.pause={point}"));
        let r = boot(&name, s);
        assert_eq!(
            r.matched.as_deref(),
            Some(needle.as_str()),
            "kairos-init never paused at {point}"
        );
        assert_eq!(r.exit, BootExit::MarkerSeen);

        let name = format!("after-cut-{point}");
        let mut s = spec(&name, &[SWITCH_ROOT], 300);
        s.disks = vec![disk.clone()];
        let r = boot(&name, s);
        assert_eq!(
            r.matched.as_deref(),
            Some(SWITCH_ROOT),
            "after a cut at {point}: no switch_root"
        );
        assert_has(&r.log, "KAIROS-GRUB: entry=cos", &name);
        assert_has(&r.log, "starting: mode=active", &name);
        // The GPT may be done (cut at grow-gpt) or finished now; the filesystem grows now.
        assert_has(&r.log, GREW_FS, &name);
        assert_lacks(&r.log, "not grown", &name);
        assert_grown(&disk, raw.persistent, before_last, &name);
        let _ = std::fs::remove_file(&disk);
    }
}

/// The raw file as the only disk on USB storage behind xhci (SeaBIOS -> GRUB -> active), and
/// on an SD card (grown to a size QEMU's sd-card takes; the image's kernel and initrd given
/// directly: no firmware here boots from SD).
#[test]
fn raw_boots_from_usb_storage_and_from_an_sd_card() {
    require_root();
    let raw = raw();
    let usb = work_dir().join("artifacts-usb.raw");
    copy_disk(&raw.path, &usb, None);
    let mut s = spec("usb", &[SWITCH_ROOT], 400);
    s.extra_args = Bus::Usb.qemu_args(&usb);
    let r = boot("usb", s);
    assert_eq!(
        r.matched.as_deref(),
        Some(SWITCH_ROOT),
        "USB: no switch_root"
    );
    assert_has(&r.log, "KAIROS-GRUB: entry=cos", "USB");
    assert_has(&r.log, "starting: mode=active image=/cOS/active.img", "USB");
    assert_has(
        &r.log,
        "usb-storage",
        "USB: the kernel's usb-storage driver",
    );
    let _ = std::fs::remove_file(&usb);

    let sd = work_dir().join("artifacts-sd.raw");
    copy_disk(&raw.path, &sd, None);
    grow_for_sd(&sd);
    let mut s = spec("sd", &[SWITCH_ROOT], 300);
    s.extra_args = Bus::Sd.qemu_args(&sd);
    direct(raw, &mut s, "");
    let r = boot("sd", s);
    assert_eq!(
        r.matched.as_deref(),
        Some(SWITCH_ROOT),
        "SD: no switch_root"
    );
    assert_has(&r.log, "starting: mode=active image=/cOS/active.img", "SD");
    assert_has(&r.log, "mmcblk0", "SD: the kernel's MMC disk");
    let _ = std::fs::remove_file(&sd);
}

/// The config given to every raw disk is what the OEM copy holds (read back on the host).
#[test]
fn raw_disk_carries_the_config_and_the_kairos_layout() {
    require_root();
    let raw = raw();
    let table = sgdisk(&["-p"], &raw.path);
    let names: Vec<&str> = table
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first()?.parse::<u32>().ok()?;
            w.last().copied()
        })
        .collect();
    assert_eq!(
        names,
        ["bios", "efi", "oem", "recovery", "state", "persistent"],
        "{table}"
    );
    let oem = Mounted::part(&raw.path, part_by_name(&raw.path, "oem"));
    let cfg = oem.path("90_custom.yaml");
    let meta = std::fs::metadata(&cfg).expect("COS_OEM:/90_custom.yaml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        std::fs::read(&cfg).expect("config"),
        std::fs::read(&raw.config).expect("config")
    );
    drop(oem);
    for (n, label) in [
        ("oem", "COS_OEM"),
        ("state", "COS_STATE"),
        ("recovery", "COS_RECOVERY"),
        ("persistent", "COS_PERSISTENT"),
    ] {
        assert_eq!(ext4_size(&raw.path, part_by_name(&raw.path, n)).0, label);
    }
}
