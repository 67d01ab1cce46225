//! `kairos-agent upgrade` on temp directories, no QEMU (issue 6): a COS_STATE directory with
//! an active.img and a passive.img made by `mkfs.ext4 -d` from tiny rootfs trees, a grubenv
//! made with the library, a root with a cloud-config whose before-/after-upgrade stages leave
//! marks; the new image comes from a local `docker-registry`, an `ocifile:` archive, a `dir:`
//! or a `file:`. Refusals (bad digests, registry errors, missing sources, no space) must leave
//! active.img and passive.img byte-identical; a crash (`KAIROS_AGENT_CRASH_AT`) at every step
//! must leave a valid active and passive image with a known content.
//!
//! Run as root (mkfs, mounts, the registry package): `cargo test --release -p kairos-tests
//! --test lifecycle`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kairos_init::grubenv::{self, GrubEnv};
use kairos_tests::registry::{self, Registry};
use kairos_tests::run_ok;

const MARKER: &str = "etc/kairos-marker";
const OLD_ACTIVE: &str = "old-active";
const OLD_PASSIVE: &str = "old-passive";
const NEW: &str = "new-v2";

/// A test that cannot run fails with the reason; it never passes silently.
fn need_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the lifecycle tests need root (mkfs images, mounts, the registry package)"
    );
}

fn agent() -> PathBuf {
    kairos_tests::build_agent().expect("building kairos-agent")
}

/// A tiny root filesystem whose marker file says `marker`, with what an upgrade requires of
/// a bootable image: /boot/vmlinuz, /boot/initrd and an init (stand-ins: nothing boots them).
fn rootfs(dir: &Path, marker: &str) {
    for d in ["etc", "bin", "sbin", "boot", "usr/lib", "var/empty"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("boot/vmlinuz-6.1"), "kernel").unwrap();
    let _ = std::os::unix::fs::symlink("vmlinuz-6.1", dir.join("boot/vmlinuz"));
    std::fs::write(dir.join("boot/initrd"), "initramfs").unwrap();
    let _ = std::os::unix::fs::symlink("/bin/tool", dir.join("sbin/init"));
    std::fs::write(dir.join(MARKER), marker).unwrap();
    std::fs::write(
        dir.join("usr/lib/os-release"),
        format!("NAME=kairos-test\nVERSION={marker}\n"),
    )
    .unwrap();
    std::fs::write(dir.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::os::unix::fs::symlink("../usr/lib/os-release", dir.join("etc/os-release"));
}

fn ext4_image(tree: &Path, out: &Path, label: &str, size: &str) {
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-d"])
            .arg(tree)
            .arg(out)
            .arg(size),
    );
}

/// The marker file inside an ext image, read with debugfs (no mount).
fn marker(img: &Path) -> String {
    run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{MARKER}"))
            .arg(img),
    )
    .trim()
    .to_string()
}

fn label(img: &Path) -> String {
    run_ok(Command::new("e2label").arg(img)).trim().to_string()
}

fn fsck_clean(img: &Path) -> bool {
    Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn hash(p: &Path) -> String {
    registry::sha256(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

/// A node on temp directories: `root` (the agent's --root: /oem/grubenv, /oem/hooks.yaml,
/// /usr/local), `state` (COS_STATE: cOS/active.img, cOS/passive.img), and the new rootfs.
struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    new_rootfs: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_state(None)
    }

    /// `state`: an existing directory to use as COS_STATE (a small tmpfs).
    fn with_state(state: Option<&Path>) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("kairos-lifecycle-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let root = d.join("root");
        let state = state.map_or_else(|| d.join("state"), Path::to_path_buf);
        std::fs::create_dir_all(state.join("cOS")).unwrap();
        for (name, m) in [
            ("old-active", OLD_ACTIVE),
            ("old-passive", OLD_PASSIVE),
            ("new", NEW),
        ] {
            rootfs(&d.join("trees").join(name), m);
        }
        ext4_image(
            &d.join("trees/old-active"),
            &state.join("cOS/active.img"),
            "COS_ACTIVE",
            "8M",
        );
        ext4_image(
            &d.join("trees/old-passive"),
            &state.join("cOS/passive.img"),
            "COS_PASSIVE",
            "8M",
        );
        for sub in ["oem", "usr/local", "proc"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let mut env = GrubEnv::default();
        env.set("saved_entry", "cos").unwrap();
        env.set("next_entry", "fallback").unwrap();
        grubenv::write(&root.join("oem/grubenv"), &env).unwrap();
        let marks = d.join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        std::fs::write(
            root.join("oem/hooks.yaml"),
            format!(
                "#cloud-config\nstages:\n  before-upgrade:\n    - commands:\n        - touch {m}/before-upgrade\n  after-upgrade:\n    - commands:\n        - touch {m}/after-upgrade\n",
                m = marks.display()
            ),
        )
        .unwrap();
        let fx = Fixture {
            new_rootfs: d.join("trees/new"),
            dir,
            root,
            state,
        };
        fx.boot_from("active.img");
        fx
    }

    /// What kairos-init leaves for the agent to identify the running image: the root mounted
    /// from a loop device. The "device" here is a copy of the image file as it is now (the same
    /// ext4 superblock, so the same UUID), at `/dev/loop7` under the agent's --root.
    fn boot_from(&self, image: &str) {
        let dev = self.root.join("dev/loop7");
        std::fs::create_dir_all(dev.parent().unwrap()).unwrap();
        std::fs::copy(self.cos(image), &dev).unwrap();
        std::fs::create_dir_all(self.root.join("proc/self")).unwrap();
        std::fs::write(
            self.root.join("proc/self/mounts"),
            "/dev/loop7 / ext4 ro,relatime 0 0\ntmpfs /run tmpfs rw 0 0\n",
        )
        .unwrap();
    }

    /// No identity for the running root (not a loop-mounted image).
    fn boot_from_nothing_known(&self) {
        std::fs::remove_file(self.root.join("proc/self/mounts")).unwrap();
    }

    fn cos(&self, name: &str) -> PathBuf {
        self.state.join("cOS").join(name)
    }

    fn mark(&self, hook: &str) -> bool {
        self.dir.path().join("marks").join(hook).exists()
    }

    fn upgrade(&self, source: &str, args: &[&str], crash_at: Option<&str>) -> Output {
        let mut all = vec!["--source", source];
        all.extend_from_slice(args);
        self.upgrade_with(&all, crash_at)
    }

    fn upgrade_with(&self, args: &[&str], crash_at: Option<&str>) -> Output {
        let mut cmd = Command::new(agent());
        cmd.arg("--root")
            .arg(&self.root)
            .args(["upgrade", "--state-dir"])
            .arg(&self.state)
            .args(args);
        match crash_at {
            Some(p) => cmd.env("KAIROS_AGENT_CRASH_AT", p),
            None => cmd.env_remove("KAIROS_AGENT_CRASH_AT"),
        };
        let out = cmd.output().expect("running kairos-agent upgrade");
        eprintln!(
            "--- kairos-agent upgrade {args:?} (crash at {crash_at:?}): {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The archive the new rootfs makes, for `ocifile:`.
    fn archive(&self) -> PathBuf {
        let p = self.dir.path().join("new.oci.tar");
        if !p.exists() {
            let img = registry::image_from_rootfs(&self.new_rootfs).unwrap();
            registry::write_oci_archive(&img, &p).unwrap();
        }
        p
    }

    fn hashes(&self) -> (String, String) {
        (
            hash(&self.cos("active.img")),
            hash(&self.cos("passive.img")),
        )
    }

    fn history(&self) -> String {
        std::fs::read_to_string(self.root.join("usr/local/.kairos-state")).unwrap_or_default()
    }

    fn env(&self) -> GrubEnv {
        grubenv::read(&self.root.join("oem/grubenv")).unwrap()
    }

    /// What every completed upgrade from active leaves.
    fn assert_upgraded_from_active(&self, out: &Output, source: &str) {
        assert!(out.status.success(), "upgrade failed: {}", out.status);
        assert_eq!(marker(&self.cos("active.img")), NEW);
        assert_eq!(marker(&self.cos("passive.img")), OLD_ACTIVE);
        assert_eq!(label(&self.cos("active.img")), "COS_ACTIVE");
        assert_eq!(label(&self.cos("passive.img")), "COS_PASSIVE");
        assert!(
            fsck_clean(&self.cos("active.img")),
            "new active.img not clean"
        );
        assert!(
            fsck_clean(&self.cos("passive.img")),
            "passive.img not clean"
        );
        assert!(!self.cos("transition.img").exists());
        assert!(
            !self.state.join(".kairos-upgrade").exists(),
            "work dir left"
        );
        assert_bootable(&self.cos("active.img"), "COS_ACTIVE");
        assert_bootable(&self.cos("passive.img"), "COS_PASSIVE");
        let env = self.env();
        assert_eq!(env.get("enable_boot_assessment"), Some("yes"));
        assert_eq!(env.get("kairos_tries_cos"), Some("3"));
        assert_eq!(env.get("kairos_tries_fallback"), Some("3"));
        assert_eq!(
            env.get("next_entry"),
            None,
            "a pending next_entry is dropped"
        );
        assert_eq!(env.get("saved_entry"), Some("cos"));
        let h = self.history();
        let line = h.lines().last().unwrap_or_default();
        assert!(line.starts_with("- {"), "{h}");
        assert!(line.contains(&format!("\"source\":\"{source}\"")), "{h}");
        assert!(line.contains("\"action\":\"upgrade\""), "{h}");
        assert!(self.mark("before-upgrade") && self.mark("after-upgrade"));
    }
}

/// What kairos-init's probe sees (the boot path finds images by it), and no ext4 feature
/// GRUB 2.06 cannot read (it loads the kernel from inside the image).
fn assert_bootable(img: &Path, want_label: &str) {
    let fs = kairos_init::probe::probe_path(img)
        .unwrap()
        .unwrap_or_else(|| panic!("{}: no filesystem", img.display()));
    assert_eq!(fs.label.as_deref(), Some(want_label));
    assert!(
        matches!(
            fs.fstype,
            kairos_init::probe::FsType::Ext2
                | kairos_init::probe::FsType::Ext3
                | kairos_init::probe::FsType::Ext4
        ),
        "{:?}",
        fs.fstype
    );
    let head = run_ok(Command::new("dumpe2fs").arg("-h").arg(img));
    let features = head
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_default()
        .to_string();
    for f in kairos_init::grubcfg::EXT4_FEATURES_GRUB_CANNOT_READ {
        assert!(!features.contains(f), "{}: {features}", img.display());
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refusal: exit 2, the named error, and active/passive exactly as before.
fn assert_refused(fx: &Fixture, out: &Output, before: &(String, String), needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "expected a refusal");
    let e = stderr(out);
    for n in needles {
        assert!(e.contains(n), "{n:?} not in:\n{e}");
    }
    assert_eq!(
        &fx.hashes(),
        before,
        "active/passive changed by a refused upgrade"
    );
    assert!(!fx.cos("transition.img").exists());
    assert!(!fx.state.join(".kairos-upgrade").exists(), "work dir left");
    assert_eq!(fx.env().get("enable_boot_assessment"), None, "armed anyway");
    assert_eq!(fx.history(), "");
}

#[test]
fn upgrade_from_a_local_registry_rotates_relabels_and_arms() {
    need_root();
    let reg = Registry::start().unwrap();
    let fx = Fixture::new();
    let img = reg.push_rootfs("kairos/os", "v2", &fx.new_rootfs).unwrap();
    let source = format!("oci:{}/kairos/os:v2", reg.addr);
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    fx.assert_upgraded_from_active(&out, &source);
    assert!(
        fx.history().contains(&img.manifest_digest),
        "{}",
        fx.history()
    );
    assert!(stderr(&out).contains(img.layer_digest()));
    // A bare reference is OCI too, and a pinned digest is checked.
    let fx = Fixture::new();
    let pinned = format!("{}/kairos/os:v2@{}", reg.addr, img.manifest_digest);
    fx.assert_upgraded_from_active(&fx.upgrade(&pinned, &["--booted", "active"], None), &pinned);
}

/// Whether `path` exists inside the ext image (debugfs, no mount).
fn exists_in(img: &Path, path: &str) -> bool {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("Inode:")
}

#[test]
fn an_index_and_stacked_layers_from_the_registry() {
    need_root();
    let reg = Registry::start().unwrap();
    let fx = Fixture::new();
    let d = fx.dir.path();
    // Base layer: a rootfs with files the top layer removes; top layer: the new marker, a
    // whiteout, an opaque directory.
    let base = d.join("layers/base");
    rootfs(&base, "base");
    std::fs::write(base.join("etc/obsolete"), "x").unwrap();
    std::fs::create_dir_all(base.join("opt")).unwrap();
    std::fs::write(base.join("opt/a"), "a").unwrap();
    let top = d.join("layers/top");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::create_dir_all(top.join("opt")).unwrap();
    std::fs::write(top.join(MARKER), NEW).unwrap();
    std::fs::write(top.join("etc/.wh.obsolete"), "").unwrap();
    std::fs::write(top.join("opt/.wh..wh..opq"), "").unwrap();
    std::fs::write(top.join("opt/c"), "c").unwrap();
    let amd = registry::image_from_layers(&[&base, &top], "amd64").unwrap();
    let other = d.join("layers/arm");
    rootfs(&other, "arm64-image");
    let arm = registry::image_from_layers(&[&other], "arm64").unwrap();
    reg.push_index(
        "kairos/multi",
        "v2",
        &[(&arm, "linux/arm64"), (&amd, "linux/amd64")],
    )
    .unwrap();
    let source = format!("oci:{}/kairos/multi:v2", reg.addr);
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    fx.assert_upgraded_from_active(&out, &source);
    let active = fx.cos("active.img");
    assert!(
        fx.history().contains(&amd.manifest_digest),
        "{}",
        fx.history()
    );
    assert!(exists_in(&active, "/usr/lib/os-release"));
    assert!(!exists_in(&active, "/etc/obsolete"), "whiteout not applied");
    assert!(
        !exists_in(&active, "/opt/a"),
        "opaque directory not applied"
    );
    assert!(exists_in(&active, "/opt/c"));
    assert!(!exists_in(&active, "/etc/.wh.obsolete"));
    assert!(stderr(&out).contains("applied layer 2/2"));
}

#[test]
fn upgrade_from_an_oci_archive_needs_no_registry() {
    need_root();
    let fx = Fixture::new();
    let source = format!("ocifile:{}", fx.archive().display());
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    fx.assert_upgraded_from_active(&out, &source);
    // The content came through intact: the executable bit, the symlink.
    let listing = run_ok(
        Command::new("debugfs")
            .args(["-R", "stat /bin/tool"])
            .arg(fx.cos("active.img")),
    );
    assert!(listing.contains("Mode:  0755"), "{listing}");
    let link = run_ok(
        Command::new("debugfs")
            .args(["-R", "stat /etc/os-release"])
            .arg(fx.cos("active.img")),
    );
    assert!(
        link.contains("Fast link dest: \"../usr/lib/os-release\""),
        "{link}"
    );
    // Built by the agent: a read-only image needs no journal.
    let head = run_ok(Command::new("dumpe2fs").arg("-h").arg(fx.cos("active.img")));
    assert!(!head.contains("has_journal"), "{head}");
    // An OCI layout directory (`skopeo copy … oci:DIR`) works the same, read in place.
    let fx = Fixture::new();
    let layout = fx.dir.path().join("layout");
    let img = registry::image_from_rootfs(&fx.new_rootfs).unwrap();
    registry::write_oci_layout(&img, &layout).unwrap();
    let source = format!("ocifile:{}", layout.display());
    fx.assert_upgraded_from_active(&fx.upgrade(&source, &["--booted", "active"], None), &source);
    assert!(
        layout.join("index.json").exists(),
        "the layout is left as it was"
    );
}

#[test]
fn booted_from_passive_the_passive_is_left_alone() {
    need_root();
    let fx = Fixture::new();
    let passive = hash(&fx.cos("passive.img"));
    // The source from the cloud-config (upgrade.system.source), what booted from /run/cos.
    let source = format!("ocifile:{}", fx.archive().display());
    std::fs::write(
        fx.root.join("oem/upgrade.yaml"),
        format!("#cloud-config\nupgrade:\n  system:\n    source: \"{source}\"\n"),
    )
    .unwrap();
    std::fs::create_dir_all(fx.root.join("run/cos")).unwrap();
    std::fs::write(fx.root.join("run/cos/passive_mode"), "").unwrap();
    fx.boot_from("passive.img");
    let out = fx.upgrade_with(&[], None);
    assert!(out.status.success());
    assert_eq!(marker(&fx.cos("active.img")), NEW);
    assert_eq!(label(&fx.cos("active.img")), "COS_ACTIVE");
    assert_eq!(hash(&fx.cos("passive.img")), passive);
    assert!(fx.history().contains("\"booted\":\"passive\""));
    assert_eq!(fx.env().get("kairos_tries_cos"), Some("3"));
}

#[test]
fn upgrade_from_a_directory_and_from_an_image_file() {
    need_root();
    let fx = Fixture::new();
    let source = format!("dir:{}", fx.new_rootfs.display());
    fx.assert_upgraded_from_active(&fx.upgrade(&source, &["--booted", "active"], None), &source);

    let fx = Fixture::new();
    let file = fx.dir.path().join("new.img");
    ext4_image(&fx.new_rootfs, &file, "SOMETHING", "8M");
    let source = format!("file:{}", file.display());
    fx.assert_upgraded_from_active(&fx.upgrade(&source, &["--booted", "active"], None), &source);
    // A file that holds no filesystem is refused.
    let fx = Fixture::new();
    let before = fx.hashes();
    let junk = fx.dir.path().join("junk.img");
    std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let out = fx.upgrade(&format!("file:{}", junk.display()), &[], None);
    assert_refused(&fx, &out, &before, &["no known filesystem", "ext2/3/4"]);
}

/// Issue 19: the after-upgrade-chroot stage runs in the new image before it is rotated in
/// (a `files:` step: the test images have no shell), and `upgrade.reboot` is honoured (under
/// --root the agent says it would reboot and does not).
#[test]
fn after_upgrade_chroot_writes_into_the_new_image_and_upgrade_reboot_is_honoured() {
    need_root();
    let fx = Fixture::new();
    std::fs::write(
        fx.root.join("oem/91_chroot.yaml"),
        "#cloud-config\nupgrade:\n  reboot: true\nstages:\n  after-upgrade-chroot:\n    - name: into the new image\n      files:\n        - path: /etc/kt-upgrade-chroot\n          content: written before the rotation\n",
    )
    .unwrap();
    let source = format!("dir:{}", fx.new_rootfs.display());
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    fx.assert_upgraded_from_active(&out, &source);
    let active = fx.cos("active.img");
    let got = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg("cat /etc/kt-upgrade-chroot")
            .arg(&active),
    );
    assert_eq!(
        got.trim(),
        "written before the rotation",
        "in the new active.img"
    );
    // Not in the old image (now passive), nor on the host.
    let old = run_ok(
        Command::new("debugfs")
            .arg("-R")
            .arg("stat /etc/kt-upgrade-chroot")
            .arg(fx.cos("passive.img")),
    );
    assert!(!old.contains("Inode:"), "{old}");
    assert!(!Path::new("/etc/kt-upgrade-chroot").exists());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("rebooting (upgrade.reboot)"), "{stdout}");
    assert!(stderr.contains("not rebooting: the root is"), "{stderr}");
    assert!(
        stderr.contains("stage after-upgrade-chroot: chrooted into"),
        "{stderr}"
    );
}

#[test]
fn recovery_upgrade_rebuilds_the_squashfs() {
    need_root();
    let fx = Fixture::new();
    let recovery = fx.dir.path().join("recovery");
    std::fs::create_dir_all(recovery.join("cOS")).unwrap();
    let old = fx.dir.path().join("trees/old-passive");
    run_ok(
        Command::new("mksquashfs")
            .arg(&old)
            .arg(recovery.join("cOS/recovery.squashfs"))
            .args(["-noappend", "-no-progress"]),
    );
    let state_before = fx.hashes();
    let mut cmd = Command::new(agent());
    cmd.arg("--root").arg(&fx.root).args([
        "upgrade",
        "--recovery",
        "--source",
        &format!("ocifile:{}", fx.archive().display()),
        "--recovery-dir",
    ]);
    cmd.arg(&recovery);
    let out = cmd.output().unwrap();
    eprintln!("{}", stderr(&out));
    assert!(out.status.success());
    let m = run_ok(
        Command::new("unsquashfs")
            .arg("-cat")
            .arg(recovery.join("cOS/recovery.squashfs"))
            .arg(MARKER),
    );
    assert_eq!(m.trim(), NEW);
    assert!(!recovery.join("cOS/recovery.squashfs.new").exists());
    // The system images and the counters are not part of a recovery upgrade.
    assert_eq!(fx.hashes(), state_before);
    assert_eq!(fx.env().get("enable_boot_assessment"), None);
    assert!(fx.history().contains("upgrade-recovery"));
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_changes() {
    need_root();
    let reg = Registry::start().unwrap();
    let fx = Fixture::new();
    let img = reg.push_rootfs("kairos/os", "bad", &fx.new_rootfs).unwrap();
    reg.corrupt_blob(img.layer_digest()).unwrap();
    let before = fx.hashes();
    let source = format!("oci:{}/kairos/os:bad", reg.addr);
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &[
            &source,
            img.layer_digest(),
            "sha256 is",
            "refusing the image",
        ],
    );
    assert!(!fx.mark("after-upgrade"));

    // The same in an archive.
    let fx = Fixture::new();
    let before = fx.hashes();
    let tar = fx.dir.path().join("bad.tar");
    let mut bad = registry::image_from_rootfs(&fx.new_rootfs).unwrap();
    let i = bad.layers[0].len() / 2;
    bad.layers[0][i] ^= 0xff;
    registry::write_oci_archive(&bad, &tar).unwrap();
    // write_oci_archive names the blob by its descriptor digest: the bytes no longer match.
    let source = format!("ocifile:{}", tar.display());
    let out = fx.upgrade(&source, &[], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &[&source, bad.layer_digest(), "sha256 is"],
    );
}

#[test]
fn registry_errors_are_named_and_nothing_changes() {
    need_root();
    let fx = Fixture::new();
    let before = fx.hashes();
    let port = registry::free_port().unwrap();
    let source = format!("oci:127.0.0.1:{port}/kairos/os:v2");
    let out = fx.upgrade(&source, &[], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &[&source, "registry", "onnection refused"],
    );

    let reg = Registry::start().unwrap();
    let source = format!("oci:{}/kairos/os:missing", reg.addr);
    let out = fx.upgrade(&source, &[], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &[&source, "registry", "manifest unknown"],
    );
}

#[test]
fn missing_sources_are_named_and_nothing_changes() {
    need_root();
    let fx = Fixture::new();
    let before = fx.hashes();
    for (source, needle) in [
        (
            "ocifile:/nonexistent/image.tar",
            "/nonexistent/image.tar does not exist",
        ),
        (
            "dir:/nonexistent/rootfs",
            "/nonexistent/rootfs does not exist",
        ),
        (
            "file:/nonexistent/active.img",
            "/nonexistent/active.img does not exist",
        ),
        ("ftp://example.org/x", "unknown scheme"),
    ] {
        let out = fx.upgrade(source, &[], None);
        assert_refused(&fx, &out, &before, &[needle]);
    }
    // One upgrade at a time.
    let lock = std::fs::File::open(fx.state.join("cOS")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let out = fx.upgrade(&format!("ocifile:{}", fx.archive().display()), &[], None);
    assert_refused(&fx, &out, &before, &["is another upgrade running?"]);
    drop(lock);
    let out = fx.upgrade_with(&[], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &["no upgrade source: pass --source or set upgrade.system.source"],
    );
    // Not a tar; a tar that is no OCI layout (`docker save` before Docker 25 wrote these).
    let junk = fx.dir.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar").unwrap();
    let out = fx.upgrade(&format!("ocifile:{}", junk.display()), &[], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &["ocifile:", "not a readable tar archive"],
    );
    let legacy = fx.dir.path().join("legacy.tar");
    let mut t = tar::Builder::new(std::fs::File::create(&legacy).unwrap());
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    h.set_mode(0o644);
    t.append_data(&mut h, "manifest.json", &b"[]"[..]).unwrap();
    t.into_inner().unwrap();
    let out = fx.upgrade(&format!("ocifile:{}", legacy.display()), &[], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &["no index.json: not an OCI image layout"],
    );
}

/// A small tmpfs as COS_STATE, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn not_enough_space_is_refused_before_anything_is_written() {
    need_root();
    let mnt = std::env::temp_dir().join(format!("kairos-small-state-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &mnt,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        Some(c"size=24m"),
    )
    .expect("mounting a tmpfs");
    let guard = Tmpfs(mnt.clone());
    let fx = Fixture::with_state(Some(&mnt));
    let before = fx.hashes();
    let out = fx.upgrade(
        &format!("ocifile:{}", fx.archive().display()),
        &["--booted", "active"],
        None,
    );
    assert_refused(
        &fx,
        &out,
        &before,
        &[
            "not enough space",
            "MiB) needed",
            &mnt.display().to_string(),
        ],
    );
    drop(fx);
    drop(guard);
}

/// A read-write loop device mounted read-only (as kairos-init mounts COS_STATE), unmounted
/// and detached on drop.
struct LoopMount {
    target: PathBuf,
    device: String,
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.target).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// The mount options of `target` in the real mount table.
fn mount_options_of(target: &Path) -> Option<String> {
    let t = target.to_str()?;
    let table = std::fs::read_to_string("/proc/self/mounts").ok()?;
    kairos_init::mountinfo::parse_mounts_lines(&table)
        .into_iter()
        .rfind(|m| m.mountpoint == t)
        .map(|m| m.options)
}

#[test]
fn without_state_dir_the_read_only_cos_state_is_remounted_and_restored() {
    need_root();
    // COS_STATE as kairos-init leaves it: a partition (here an image file) mounted read-only
    // at /run/initramfs/cos-state, listed so in /proc/self/mounts.
    let fx = Fixture::new();
    let part = fx.dir.path().join("state-partition.img");
    ext4_image(&fx.state, &part, "COS_STATE", "400M");
    let mnt = fx.root.join("run/initramfs/cos-state");
    std::fs::create_dir_all(&mnt).unwrap();
    let device = run_ok(
        Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&part),
    )
    .trim()
    .to_string();
    let _guard = LoopMount {
        target: mnt.clone(),
        device: device.clone(),
    };
    run_ok(Command::new("mount").args(["-o", "ro", &device]).arg(&mnt));
    assert!(
        mount_options_of(&mnt)
            .unwrap()
            .split(',')
            .any(|o| o == "ro")
    );
    std::fs::create_dir_all(fx.root.join("proc/self")).unwrap();
    std::fs::write(
        fx.root.join("proc/self/mounts"),
        format!("{device} /run/initramfs/cos-state ext4 ro,relatime 0 0\n"),
    )
    .unwrap();
    std::fs::write(fx.root.join("proc/cmdline"), "root=LABEL=COS_ACTIVE\n").unwrap();
    let source = format!("ocifile:{}", fx.archive().display());
    let out = Command::new(agent())
        .arg("--root")
        .arg(&fx.root)
        .args(["upgrade", "--source", &source])
        .output()
        .unwrap();
    eprintln!("{}", stderr(&out));
    assert!(out.status.success(), "{}", out.status);
    assert!(stderr(&out).contains("remounted"), "{}", stderr(&out));
    assert_eq!(marker(&mnt.join("cOS/active.img")), NEW);
    assert_eq!(marker(&mnt.join("cOS/passive.img")), OLD_ACTIVE);
    assert_eq!(label(&mnt.join("cOS/passive.img")), "COS_PASSIVE");
    assert!(!mnt.join(".kairos-upgrade").exists());
    let opts = mount_options_of(&mnt).unwrap();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "not read-only again: {opts}"
    );
}

/// What each crash point must leave: (active marker, passive marker, transition: None or
/// (marker, label)).
fn expected_after_crash(
    point: &str,
) -> (
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
) {
    match point {
        "pull" | "unpack" => (OLD_ACTIVE, OLD_PASSIVE, None),
        "before-rename-1" => (OLD_ACTIVE, OLD_PASSIVE, Some((NEW, "COS_ACTIVE"))),
        "after-rename-1-before-sync" | "between-renames" => {
            (NEW, OLD_PASSIVE, Some((OLD_ACTIVE, "COS_ACTIVE")))
        }
        "before-rename-2" => (NEW, OLD_PASSIVE, Some((OLD_ACTIVE, "COS_PASSIVE"))),
        "after-rename-2-before-sync" | "done" => (NEW, OLD_ACTIVE, None),
        other => panic!("unknown crash point {other}"),
    }
}

#[test]
fn a_crash_at_every_step_leaves_a_bootable_pair() {
    need_root();
    for point in [
        "pull",
        "unpack",
        "before-rename-1",
        "after-rename-1-before-sync",
        "between-renames",
        "before-rename-2",
        "after-rename-2-before-sync",
        "done",
    ] {
        let fx = Fixture::new();
        let source = format!("ocifile:{}", fx.archive().display());
        let out = fx.upgrade(&source, &["--booted", "active"], Some(point));
        assert_eq!(
            out.status.signal(),
            Some(libc_sigabrt()),
            "{point}: expected an abort, got {}",
            out.status
        );
        assert!(
            stderr(&out).contains(&format!("KAIROS_AGENT_CRASH_AT={point}: aborting here")),
            "{point}"
        );
        let (active, passive, transition) = expected_after_crash(point);
        for (img, want) in [("active.img", active), ("passive.img", passive)] {
            let p = fx.cos(img);
            assert!(fsck_clean(&p), "{point}: {img} is not a clean ext4");
            assert_eq!(marker(&p), want, "{point}: {img}");
        }
        match transition {
            None => assert!(
                !fx.cos("transition.img").exists(),
                "{point}: transition.img"
            ),
            Some((m, l)) => {
                assert_eq!(marker(&fx.cos("transition.img")), m, "{point}");
                assert_eq!(label(&fx.cos("transition.img")), l, "{point}");
            }
        }
        // The next upgrade cleans up whatever the crash left and completes.
        let out = fx.upgrade(&source, &["--booted", "active"], None);
        assert!(
            out.status.success(),
            "{point}: the upgrade after the crash failed"
        );
        assert_eq!(marker(&fx.cos("active.img")), NEW, "{point}");
        assert!(fsck_clean(&fx.cos("passive.img")), "{point}");
        assert!(!fx.cos("transition.img").exists(), "{point}");
        assert!(!fx.state.join(".kairos-upgrade").exists(), "{point}");
        let env = fx.env();
        assert_eq!(env.get("enable_boot_assessment"), Some("yes"), "{point}");
    }
}

fn libc_sigabrt() -> i32 {
    6
}

/// (marker, label) of an image file.
fn marked(img: &Path) -> (String, String) {
    (marker(img), label(img))
}

#[test]
fn a_rotation_cut_between_the_renames_is_finished_and_keeps_the_booted_image() {
    need_root();
    // Booted from active.img (old-active); the power goes between the two renames, so
    // transition.img is the running image.
    let fx = Fixture::new();
    let source = format!("ocifile:{}", fx.archive().display());
    let out = fx.upgrade(&source, &["--booted", "active"], Some("between-renames"));
    assert_eq!(out.status.signal(), Some(libc_sigabrt()), "{}", out.status);
    assert_eq!(marker(&fx.cos("transition.img")), OLD_ACTIVE);
    // Run again, still on the same boot: the booted image must end up as passive.img.
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        marked(&fx.cos("passive.img")),
        (OLD_ACTIVE.into(), "COS_PASSIVE".into()),
        "passive.img must hold the image that booted"
    );
    let e = stderr(&out);
    assert!(e.contains("finished the interrupted rotation"), "{e}");
    assert_eq!(
        marked(&fx.cos("active.img")),
        (NEW.into(), "COS_ACTIVE".into())
    );
    assert!(!fx.cos("transition.img").exists());
    assert!(fsck_clean(&fx.cos("passive.img")) && fsck_clean(&fx.cos("active.img")));
}

#[test]
fn two_upgrades_without_a_reboot_keep_the_booted_image() {
    need_root();
    let fx = Fixture::new();
    let source = format!("ocifile:{}", fx.archive().display());
    fx.assert_upgraded_from_active(&fx.upgrade(&source, &["--booted", "active"], None), &source);
    // No reboot: old-active still runs (now passive.img); active.img never booted.
    let booted = hash(&fx.cos("passive.img"));
    let other = fx.dir.path().join("trees/newer");
    rootfs(&other, "newer-v3");
    let out = fx.upgrade(
        &format!("dir:{}", other.display()),
        &["--booted", "active"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(marker(&fx.cos("active.img")), "newer-v3");
    assert_eq!(
        hash(&fx.cos("passive.img")),
        booted,
        "the booted image was replaced"
    );
    assert_eq!(marker(&fx.cos("passive.img")), OLD_ACTIVE);
    assert!(
        stderr(&out).contains("not the image that booted"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unknown_boot_mode_is_refused_or_decided_by_the_running_root() {
    need_root();
    // No --booted, no /run/cos sentinel, no /proc/cmdline, the root no loop-mounted image.
    let fx = Fixture::new();
    fx.boot_from_nothing_known();
    let before = fx.hashes();
    let source = format!("ocifile:{}", fx.archive().display());
    let out = fx.upgrade(&source, &[], None);
    assert_refused(&fx, &out, &before, &["cannot tell what booted", "--booted"]);
    // The running root identifies passive.img: handled as booted from passive, said so.
    fx.boot_from("passive.img");
    let out = fx.upgrade(&source, &[], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("(booted: passive)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        fx.hashes().1,
        before.1,
        "passive.img (what booted) was replaced"
    );
    assert_eq!(marker(&fx.cos("active.img")), NEW);
}

#[test]
fn an_image_that_cannot_boot_is_refused_before_anything_is_rotated() {
    need_root();
    let fx = Fixture::new();
    let before = fx.hashes();
    // dir: a tree without a kernel or an initramfs.
    let bare = fx.dir.path().join("trees/bare");
    rootfs(&bare, "bare");
    std::fs::remove_file(bare.join("boot/vmlinuz")).unwrap();
    std::fs::remove_file(bare.join("boot/initrd")).unwrap();
    let source = format!("dir:{}", bare.display());
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &[&source, "/boot/vmlinuz, /boot/initrd", "could not boot"],
    );
    // file: an ext4 image whose tree has no init (looked into through a read-only mount).
    let noinit = fx.dir.path().join("trees/noinit");
    rootfs(&noinit, "noinit");
    std::fs::remove_file(noinit.join("sbin/init")).unwrap();
    let img = fx.dir.path().join("noinit.img");
    ext4_image(&noinit, &img, "X", "8M");
    let source = format!("file:{}", img.display());
    let out = fx.upgrade(&source, &["--booted", "active"], None);
    assert_refused(
        &fx,
        &out,
        &before,
        &[&source, "init (an executable /sbin/init"],
    );
    assert!(!fx.state.join(".kairos-upgrade.check").exists());
}

#[test]
fn a_failed_build_leaves_no_transition_image() {
    need_root();
    // A node without e2fsprogs on its PATH: mkfs.ext4 cannot run.
    let fx = Fixture::new();
    let before = fx.hashes();
    let empty = fx.dir.path().join("empty-path");
    std::fs::create_dir_all(&empty).unwrap();
    let source = format!("dir:{}", fx.new_rootfs.display());
    let out = Command::new(agent())
        .arg("--root")
        .arg(&fx.root)
        .args(["upgrade", "--booted", "active", "--state-dir"])
        .arg(&fx.state)
        .arg("--source")
        .arg(&source)
        .env("PATH", &empty)
        .output()
        .expect("running kairos-agent upgrade");
    assert_refused(&fx, &out, &before, &["mkfs.ext4", "not run"]);
}

#[test]
fn two_upgrades_at_once_the_second_is_refused_naming_the_first() {
    need_root();
    use std::io::BufRead;
    let fx = Fixture::new();
    let source = format!("ocifile:{}", fx.archive().display());
    // The first stops just before its first rename (the image built, the counters armed).
    let mut first = Command::new(agent())
        .arg("--root")
        .arg(&fx.root)
        .args(["upgrade", "--booted", "active", "--state-dir"])
        .arg(&fx.state)
        .arg("--source")
        .arg(&source)
        .env("KAIROS_AGENT_CRASH_AT", "pause:before-rename-1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the first upgrade");
    let pid = first.id();
    let mut lines = std::io::BufReader::new(first.stderr.take().expect("stderr")).lines();
    let paused = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("paused here"));
    assert!(paused, "the first upgrade did not pause");
    // A second upgrade, and a recovery upgrade (another partition, the same work directory).
    let recovery = fx.dir.path().join("recovery");
    std::fs::create_dir_all(recovery.join("cOS")).unwrap();
    let second = fx.upgrade(&source, &["--booted", "active"], None);
    let third = fx.upgrade(
        &source,
        &[
            "--recovery",
            "--recovery-dir",
            &recovery.display().to_string(),
        ],
        None,
    );
    let _ = first.kill();
    let _ = first.wait();
    for (out, me) in [(&second, "upgrade"), (&third, "upgrade --recovery")] {
        assert_eq!(out.status.code(), Some(2), "{me}: not refused");
        let e = stderr(out);
        assert!(
            e.contains(&format!("{me} refused: upgrade (pid {pid}) holds")),
            "{me}: the refusal does not name the holder:\n{e}"
        );
    }
    assert!(!recovery.join("cOS/recovery.squashfs").exists());
    // The first one's work is still there, untouched by the refused ones.
    assert_eq!(marker(&fx.cos("transition.img")), NEW);
    assert_eq!(marker(&fx.cos("active.img")), OLD_ACTIVE);
}

#[test]
fn mark_good_waiting_for_k3s_keeps_a_boot_entry_selected_meanwhile() {
    need_root();
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    // A counted boot of cos, the boot stage done, K3s configured: a stand-in k3s that answers
    // /readyz only after `bootentry --select` has run.
    let mut env = GrubEnv::default();
    grubenv::arm(&mut env, 3).unwrap();
    grubenv::grub_boot(&mut env);
    std::fs::create_dir_all(root.join("oem")).unwrap();
    grubenv::write(&root.join("oem/grubenv"), &env).unwrap();
    for (f, c) in [
        (
            "proc/cmdline",
            "root=LABEL=COS_ACTIVE rd.kairos.boot_reason=cos:counted-try\n",
        ),
        ("run/cos/active_mode", ""),
        ("run/kairos/boot-stage-ok", ""),
        ("etc/rancher/k3s/config.yaml", "{}\n"),
    ] {
        std::fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
        std::fs::write(root.join(f), c).unwrap();
    }
    let waiting = root.join("k3s-asked");
    let go = root.join("k3s-go");
    let k3s = root.join("usr/local/bin/k3s");
    std::fs::create_dir_all(k3s.parent().unwrap()).unwrap();
    std::fs::write(
        &k3s,
        format!(
            "#!/bin/sh\ntouch {w}\nwhile [ ! -e {g} ]; do sleep 0.05; done\necho ok\n",
            w = waiting.display(),
            g = go.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&k3s, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent_in = |args: &[&str]| {
        let mut c = Command::new(agent());
        c.arg("--root").arg(root).args(args);
        c
    };
    let mark = agent_in(&["mark-good", "--k3s-timeout", "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting mark-good");
    let t0 = std::time::Instant::now();
    while !waiting.exists() {
        assert!(t0.elapsed().as_secs() < 20, "mark-good never asked k3s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // mark-good is waiting for K3s: a user picks the next boot.
    let out = run_ok(&mut agent_in(&["bootentry", "--select", "recovery"]));
    assert!(out.contains("next boot: recovery"), "{out}");
    std::fs::write(&go, "").unwrap();
    let done = mark.wait_with_output().expect("mark-good");
    assert!(
        done.status.success(),
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let env = grubenv::read(&root.join("oem/grubenv")).unwrap();
    assert_eq!(
        env.get("next_entry"),
        Some("recovery"),
        "mark-good wrote back the block it read before the wait"
    );
    assert_eq!(env.get("kairos_tries_cos"), Some("3"), "not marked good");
    assert_eq!(env.get("boot_assessment_tentative"), None);
    // No temporary file is left beside the grubenv.
    let names: Vec<_> = std::fs::read_dir(root.join("oem"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["grubenv"]);
}

/// `upgrade list-releases` against the real registry: every tag of the repository that
/// `upgrade.system.source` names, newest first (semver), the other tags last.
#[test]
fn list_releases_lists_the_registry_tags_newest_first() {
    need_root();
    let reg = Registry::start().unwrap();
    let fx = Fixture::new();
    let img = registry::image_from_rootfs(&fx.new_rootfs).unwrap();
    for tag in [
        "v1.0.0",
        "latest",
        "v1.10.0",
        "v1.2.0-rc1",
        "v1.2.0",
        "v0.9.0",
    ] {
        reg.push("kairos/releases", tag, &img).unwrap();
    }
    std::fs::write(
        fx.root.join("oem/95_upgrade.yaml"),
        format!(
            "#cloud-config\nupgrade:\n  system:\n    source: oci:{}/kairos/releases:v1.0.0\n",
            reg.addr
        ),
    )
    .unwrap();
    let out = Command::new(agent())
        .arg("--root")
        .arg(&fx.root)
        .args(["upgrade", "list-releases"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let expected: Vec<String> = [
        "v1.10.0",
        "v1.2.0",
        "v1.2.0-rc1",
        "v1.0.0",
        "v0.9.0",
        "latest",
    ]
    .iter()
    .map(|t| format!("{}/kairos/releases:{t}", reg.addr))
    .collect();
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stderr}");
    assert!(stderr.contains("(from upgrade.system.source)"), "{stderr}");
}

// The QEMU parts of issue 6, one module per command.
#[path = "lifecycle/install.rs"]
mod install;
#[path = "lifecycle/reset.rs"]
mod reset;
#[path = "lifecycle/vm_upgrade.rs"]
mod vm_upgrade;
