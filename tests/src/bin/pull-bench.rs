//! Benchmark (not a test): `kairos-agent upgrade` pulling an image of at least 512 MiB from a
//! local registry and writing it as COS_STATE:/cOS/active.img, next to the baseline of
//! `skopeo copy` of the same image to a directory plus `dd` (conv=fsync) of as many bytes as
//! the agent's active.img, in the same run.
//!
//! `cargo run --release -p kairos-tests --bin pull-bench [-- MIB]` as root (it installs
//! docker-registry and skopeo with apt when they are missing, and drops the page cache
//! before each timed step). MIB is the rootfs size, 512 by default; the files are random
//! bytes, so the gzip layer is about as large as the rootfs.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kairos_tests::registry::Registry;

const FILE_MIB: u64 = 16;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `sync`, then drop the page cache so every timed step reads from the registry's disk.
fn cold() -> Result<()> {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

fn timed(what: &str, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    cold()?;
    eprintln!("pull-bench: {what} ...");
    let t = Instant::now();
    f()?;
    let s = t.elapsed().as_secs_f64();
    eprintln!("pull-bench: {what}: {s:.2} s");
    Ok(s)
}

/// `mib` MiB of random files under `dir` (16 MiB each, a few directories).
fn random_rootfs(dir: &Path, mib: u64) -> Result<()> {
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut buf = vec![0u8; (FILE_MIB << 20) as usize];
    for i in 0..mib.div_ceil(FILE_MIB) {
        let d = dir.join(format!("usr/lib/blob{}", i % 8));
        std::fs::create_dir_all(&d)?;
        urandom.read_exact(&mut buf)?;
        std::fs::File::create(d.join(format!("data{i}.bin")))?.write_all(&buf)?;
    }
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::write(dir.join("etc/kairos-marker"), "pull-bench")?;
    // What the agent requires of a bootable image (stand-ins: nothing boots this one).
    std::fs::create_dir_all(dir.join("boot"))?;
    std::fs::create_dir_all(dir.join("sbin"))?;
    std::fs::write(dir.join("boot/vmlinuz"), "kernel")?;
    std::fs::write(dir.join("boot/initrd"), "initramfs")?;
    std::fs::write(dir.join("sbin/init"), "#!/bin/sh\n")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let mib: u64 = match std::env::args().nth(1) {
        Some(a) => a.parse().context("MIB: a number of MiB")?,
        None => 512,
    };
    if mib < 512 {
        eprintln!("pull-bench: note: {mib} MiB is below the 512 MiB the issue asks for");
    }
    if !rustix::process::geteuid().is_root() {
        bail!("pull-bench needs root (apt, mkfs, drop_caches)");
    }
    kairos_qemu::apt::ensure_packages(&["skopeo"]).context("installing skopeo")?;
    let agent = kairos_tests::build_agent()?;
    let tmp = tempfile::Builder::new()
        .prefix("kairos-pull-bench-")
        .tempdir_in("/var/tmp")?;
    let t = tmp.path();

    eprintln!("pull-bench: writing a {mib} MiB random rootfs");
    let rootfs = t.join("rootfs");
    random_rootfs(&rootfs, mib)?;
    let reg = Registry::start()?;
    eprintln!("pull-bench: pushing it to {}", reg.addr);
    let img = reg.push_rootfs("bench/os", "v1", &rootfs)?;
    let layer_bytes: usize = img.layers.iter().map(Vec::len).sum();
    std::fs::remove_dir_all(&rootfs)?;
    let reference = format!("{}/bench/os:v1", reg.addr);

    // The agent: pull, verify, unpack, mkfs.ext4 -d, fsync, rotate into a fresh COS_STATE.
    let root = t.join("root");
    for d in ["oem", "usr/local", "proc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let state = t.join("state");
    std::fs::create_dir_all(state.join("cOS"))?;
    let agent_s = timed("kairos-agent upgrade", || {
        run(Command::new(&agent)
            .arg("--root")
            .arg(&root)
            .args(["upgrade", "--booted", "active", "--state-dir"])
            .arg(&state)
            .arg("--source")
            .arg(format!("oci:{reference}")))
    })?;
    let active = state.join("cOS/active.img");
    let image_bytes = std::fs::metadata(&active)
        .with_context(|| format!("{}", active.display()))?
        .len();

    // The baseline: skopeo to a directory, then dd of as many bytes as active.img.
    let copy = t.join("skopeo");
    let skopeo_s = timed("skopeo copy", || {
        run(Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--quiet"])
            .arg(format!("docker://{reference}"))
            .arg(format!("dir:{}", copy.display())))
    })?;
    let copied = dir_bytes(&copy);
    let dd_out = t.join("dd.img");
    let dd_s = timed("dd", || {
        run(Command::new("dd")
            .arg(format!("if={}", active.display()))
            .arg(format!("of={}", dd_out.display()))
            .args(["bs=4M", "conv=fsync", "status=none"]))
    })?;
    let dd_bytes = std::fs::metadata(&dd_out)?.len();
    drop(reg);

    let mb = |b: u64, s: f64| b as f64 / (1 << 20) as f64 / s;
    let baseline = skopeo_s + dd_s;
    println!();
    println!(
        "pull-bench: rootfs {mib} MiB of random files, one gzip layer of {} MiB, active.img {} MiB",
        layer_bytes >> 20,
        image_bytes >> 20
    );
    println!("| step | time | throughput |");
    println!("| --- | ---: | ---: |");
    println!(
        "| kairos-agent upgrade (pull + verify + unpack + mkfs.ext4 -d + fsync) | {agent_s:.2} s | {:.0} MiB/s of image |",
        mb(image_bytes, agent_s)
    );
    println!(
        "| skopeo copy docker:// → dir: | {skopeo_s:.2} s | {:.0} MiB/s of blobs |",
        mb(copied, skopeo_s)
    );
    println!(
        "| dd of active.img's bytes, conv=fsync | {dd_s:.2} s | {:.0} MiB/s |",
        mb(dd_bytes, dd_s)
    );
    println!(
        "| skopeo + dd (baseline) | {baseline:.2} s | {:.0} MiB/s of image |",
        mb(image_bytes, baseline)
    );
    println!(
        "pull-bench: agent / baseline = {:.2}× the time",
        agent_s / baseline
    );
    Ok(())
}
