//! Benchmark (not a test): `kairos-agent upgrade` pulling an image from a local registry and
//! writing it as COS_STATE:/cOS/active.img, next to the baseline of `skopeo copy` of the same
//! image to a directory plus `dd` (conv=fsync) of as many bytes as the agent's active.img, in
//! the same run, for each rootfs size asked.
//!
//! `cargo run --release -p kairos-tests --bin pull-bench [-- MIB[,MIB...]]` as root (it
//! installs docker-registry and skopeo with apt when they are missing, and drops the page
//! cache before each timed step). MIB: rootfs sizes, 256,1024,2048 by default; the files are
//! random bytes, so the gzip layer is about as large as the rootfs. Everything of one size is
//! removed before the next. Where the agent's time goes is taken from the time its log lines
//! arrive. The last line is the ratio at 1024 MiB (or at the largest size when 1024 is not
//! among them).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// The agent's log lines, each with when it arrived after the start.
fn run_logged(cmd: &mut Command) -> Result<Vec<(Duration, String)>> {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    let mut lines = Vec::new();
    if let Some(err) = child.stderr.take() {
        for l in BufReader::new(err).lines() {
            lines.push((t.elapsed(), l?));
        }
    }
    let status = child.wait()?;
    lines.push((t.elapsed(), String::new()));
    if !status.success() {
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        bail!("{cmd:?}: {status}\n{}", text.join("\n"));
    }
    Ok(lines)
}

/// The agent's phases, from its log: (name, seconds). Each phase ends at the first line
/// starting with its marker (the last one at the exit).
fn phases(lines: &[(Duration, String)]) -> Vec<(&'static str, f64)> {
    const MARKS: &[(&str, &str)] = &[
        ("start, resolve", "kairos-agent: pulling layer"),
        ("pull + verify + unpack", "kairos-agent: applied layer"),
        ("check, measure", "kairos-agent: building"),
        ("mkfs.ext4 -d + fsync", "kairos-agent: built"),
        ("arm, rotate", "kairos-agent: rotated"),
    ];
    let mut out = Vec::new();
    let mut last = Duration::ZERO;
    for (name, mark) in MARKS {
        if let Some((t, _)) = lines.iter().find(|(_, l)| l.starts_with(mark)) {
            out.push((*name, t.saturating_sub(last).as_secs_f64()));
            last = *t;
        }
    }
    if let Some((end, _)) = lines.last() {
        out.push(("history, exit", end.saturating_sub(last).as_secs_f64()));
    }
    out
}

/// One size's figures.
struct Row {
    mib: u64,
    layer_mib: u64,
    image_mib: u64,
    agent_s: f64,
    skopeo_s: f64,
    dd_s: f64,
    phases: Vec<(&'static str, f64)>,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.agent_s / (self.skopeo_s + self.dd_s)
    }
}

fn bench_size(agent: &Path, mib: u64) -> Result<Row> {
    let tmp = tempfile::Builder::new()
        .prefix("kairos-pull-bench-")
        .tempdir_in("/var/tmp")?;
    let t = tmp.path();

    eprintln!("pull-bench: writing a {mib} MiB random rootfs");
    let rootfs = t.join("rootfs");
    random_rootfs(&rootfs, mib)?;
    let reg = Registry::start()?;
    eprintln!("pull-bench: pushing it to {}", reg.addr);
    let layer_bytes: usize = {
        let img = reg.push_rootfs("bench/os", "v1", &rootfs)?;
        img.layers.iter().map(Vec::len).sum()
    };
    std::fs::remove_dir_all(&rootfs)?;
    let reference = format!("{}/bench/os:v1", reg.addr);

    // The agent: pull, verify, unpack, mkfs.ext4 -d, fsync, rotate into a fresh COS_STATE.
    let root = t.join("root");
    for d in ["oem", "usr/local", "proc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let state = t.join("state");
    std::fs::create_dir_all(state.join("cOS"))?;
    let mut log = Vec::new();
    let agent_s = timed("kairos-agent upgrade", || {
        log = run_logged(
            Command::new(agent)
                .arg("--root")
                .arg(&root)
                .args(["upgrade", "--booted", "active", "--state-dir"])
                .arg(&state)
                .arg("--source")
                .arg(format!("oci:{reference}")),
        )?;
        Ok(())
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
    if dir_bytes(&copy) < layer_bytes as u64 {
        bail!("skopeo copied less than the layer");
    }
    let dd_out = t.join("dd.img");
    let dd_s = timed("dd", || {
        run(Command::new("dd")
            .arg(format!("if={}", active.display()))
            .arg(format!("of={}", dd_out.display()))
            .args(["bs=4M", "conv=fsync", "status=none"]))
    })?;
    if std::fs::metadata(&dd_out)?.len() != image_bytes {
        bail!("dd copied a different number of bytes than active.img has");
    }
    drop(reg);
    drop(tmp);
    Ok(Row {
        mib,
        layer_mib: (layer_bytes >> 20) as u64,
        image_mib: image_bytes >> 20,
        agent_s,
        skopeo_s,
        dd_s,
        phases: phases(&log),
    })
}

fn main() -> Result<()> {
    let sizes: Vec<u64> = match std::env::args().nth(1) {
        Some(a) => a
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .context("MIB: numbers of MiB, comma-separated")
            })
            .collect::<Result<_>>()?,
        None => vec![256, 1024, 2048],
    };
    if sizes.is_empty() {
        bail!("no size given");
    }
    if !rustix::process::geteuid().is_root() {
        bail!("pull-bench needs root (apt, mkfs, drop_caches)");
    }
    kairos_qemu::apt::ensure_packages(&["skopeo"]).context("installing skopeo")?;
    let agent = kairos_tests::build_agent()?;
    let mut rows = Vec::new();
    for &mib in &sizes {
        rows.push(bench_size(&agent, mib)?);
    }

    let mb = |mib: u64, s: f64| mib as f64 / s;
    println!();
    println!(
        "pull-bench: random files, one gzip layer each; agent = kairos-agent upgrade --source oci:… \
         (pull, verify, unpack, mkfs.ext4 -d, fsync, rotate); baseline = skopeo copy docker:// → dir: \
         + dd of active.img's bytes (conv=fsync); page cache dropped before each step"
    );
    println!(
        "| rootfs | layer | active.img | agent | skopeo | dd | skopeo + dd | agent / baseline |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} MiB | {} MiB | {} MiB | {:.2} s ({:.0} MiB/s) | {:.2} s | {:.2} s | {:.2} s | {:.2}× |",
            r.mib,
            r.layer_mib,
            r.image_mib,
            r.agent_s,
            mb(r.image_mib, r.agent_s),
            r.skopeo_s,
            r.dd_s,
            r.skopeo_s + r.dd_s,
            r.ratio()
        );
    }
    println!();
    println!("where the agent's time goes (from its log lines):");
    let names: Vec<&str> = rows
        .first()
        .map(|r| r.phases.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default();
    println!("| rootfs | {} |", names.join(" | "));
    println!("| ---: |{}", " ---: |".repeat(names.len()));
    for r in &rows {
        let cells: Vec<String> = r.phases.iter().map(|(_, s)| format!("{s:.2} s")).collect();
        println!("| {} MiB | {} |", r.mib, cells.join(" | "));
    }
    let at = rows
        .iter()
        .find(|r| r.mib == 1024)
        .or_else(|| rows.iter().max_by_key(|r| r.mib));
    if let Some(r) = at {
        println!(
            "upgrade ratio vs skopeo+dd at {} MiB: {:.2}x",
            r.mib,
            r.ratio()
        );
    }
    Ok(())
}
