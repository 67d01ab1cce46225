//! `kairos-build image`: makes a plain OS image Kairos-ready.
//!
//! 1. checks that write nothing: `--out`, the kairos-agent and kairos-init binaries;
//! 2. the source staged in the work directory (a `dir:` copied, an OCI image pulled and
//!    unpacked; the user's tree is never written), and its kernel found — none is an error
//!    that names the source;
//! 3. what Kairos needs, every path resolved inside the tree (an absolute symlink in the
//!    image never reaches the build host): kairos-agent at /usr/bin, /boot/initrd (the
//!    generic initramfs from the image's own modules) and /boot/vmlinuz, the agent's units
//!    enabled when the image runs systemd, kairos-init as /sbin/init when it has no init,
//!    /etc/kairos-release, /etc/cos/cos-layout.env only when the image has none, and the
//!    mount points kairos-init needs on a read-only root;
//! 4. the output: a directory, an OCI archive, or pushed to a registry.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kairos_agent::Ctx;
use kairos_agent::install::SourceImage;
use kairos_agent::upgrade::source::{self, ImageRef};
use kairos_init::layout::{
    DEFAULT_OVERLAY_SIZE, DEFAULT_PERSISTENT_STATE_TARGET, KAIROS_PERSISTENT_STATE_PATHS,
    KAIROS_RW_PATHS,
};
use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::cli::ImageArgs;
use crate::initramfs::{self, resolve_in};
use crate::oci;
use crate::{WorkDir, find_program};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "--out {given:?}: expected oci:REF (pushed to a registry), ocifile:PATH (an OCI archive) or dir:PATH"
    )]
    OutForm { given: String },
    #[error("--out {given:?}: {what}; nothing was written")]
    Out { given: String, what: String },
    #[error(
        "{origin}: no kernel in the image ({err}); install the distribution's kernel package in it; nothing was written"
    )]
    NoKernel {
        origin: String,
        err: initramfs::KernelError,
    },
    #[error(transparent)]
    Program(#[from] crate::ProgramError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: {what} in the image: {err}")]
    Tree {
        path: String,
        what: &'static str,
        err: String,
    },
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Install(#[from] kairos_agent::install::InstallError),
    #[error(transparent)]
    Initramfs(#[from] initramfs::BuildError),
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error(transparent)]
    Work(#[from] crate::WorkError),
}

/// Where `--out` sends the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Registry(ImageRef),
    Archive(PathBuf),
    Dir(PathBuf),
}

/// Parses `--out`: `oci:REF`, `ocifile:PATH`, `dir:PATH` (paths absolute or relative).
pub fn parse_out(given: &str) -> Result<Output, ImageError> {
    let form = || ImageError::OutForm {
        given: given.into(),
    };
    let (scheme, rest) = given.split_once(':').ok_or_else(form)?;
    if rest.is_empty() {
        return Err(form());
    }
    match scheme {
        "oci" | "docker" => Ok(Output::Registry(source::parse_ref(given, rest)?)),
        "ocifile" => Ok(Output::Archive(PathBuf::from(rest))),
        "dir" => Ok(Output::Dir(PathBuf::from(rest))),
        _ => Err(form()),
    }
}

/// What was made.
#[derive(Debug, Clone)]
pub struct ImageReport {
    pub out: String,
    pub kernel: String,
    pub initrd_bytes: u64,
    pub modules: usize,
    pub missing_modules: Vec<String>,
    /// Bytes of regular files in the finished tree.
    pub tree_bytes: u64,
    /// The gzip layer (OCI outputs).
    pub layer_bytes: Option<u64>,
    pub manifest_digest: Option<String>,
    pub systemd: bool,
    /// kairos-init was installed as /sbin/init (the image had no init).
    pub init_added: bool,
    pub layout_added: bool,
    pub seconds: f64,
}

fn tree_err<'a>(rel: &'a str, what: &'static str) -> impl FnOnce(String) -> ImageError + 'a {
    move |err| ImageError::Tree {
        path: format!("/{}", rel.trim_start_matches('/')),
        what,
        err,
    }
}

/// The host path of directory `rel` inside `tree`, created (mode 0755) where missing; symlinks
/// on the way resolve inside the tree.
pub fn dir_in(tree: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let mut sofar = PathBuf::new();
    let mut host = tree.to_path_buf();
    for c in Path::new(rel).components() {
        let Component::Normal(name) = c else { continue };
        sofar.push(name);
        let s = sofar.to_string_lossy().into_owned();
        host = match resolve_in(tree, &s).map_err(|e| tree_err(rel, "resolving")(e.to_string()))? {
            Some(p) if p.is_dir() => p,
            Some(p) => {
                return Err(tree_err(rel, "making a directory")(format!(
                    "{} is not a directory",
                    p.display()
                )));
            }
            None => {
                let p = host.join(name);
                // A dangling symlink here would make create_dir follow it out of the tree.
                if p.symlink_metadata().is_ok() {
                    return Err(tree_err(rel, "making a directory")(format!(
                        "/{s} is a dangling symlink"
                    )));
                }
                std::fs::create_dir(&p).at(&p, "creating")?;
                p
            }
        };
    }
    Ok(host)
}

/// The host path of file `rel` inside `tree` (its directory created); an existing symlink
/// there is removed first so the write lands in the tree.
fn file_in(tree: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let rel = rel.trim_start_matches('/');
    let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    let p = dir_in(tree, parent)?.join(name);
    if p.symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        std::fs::remove_file(&p).at(&p, "removing the symlink")?;
    }
    Ok(p)
}

fn write_in(tree: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), ImageError> {
    let p = file_in(tree, rel)?;
    std::fs::write(&p, data).at(&p, "writing")?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).at(&p, "chmod")?;
    Ok(())
}

fn symlink_in(tree: &Path, rel: &str, target: &str) -> Result<(), ImageError> {
    let p = file_in(tree, rel)?;
    if p.symlink_metadata().is_ok() {
        std::fs::remove_file(&p).at(&p, "replacing")?;
    }
    std::os::unix::fs::symlink(target, &p).at(&p, "linking")?;
    Ok(())
}

/// Whether `rel` exists in the tree (following symlinks inside it).
fn exists_in(tree: &Path, rel: &str) -> bool {
    matches!(resolve_in(tree, rel), Ok(Some(_)))
}

/// The `WantedBy=` targets of a unit's `[Install]` section.
pub fn wanted_by(unit: &str) -> Vec<String> {
    let mut in_install = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
        } else if in_install && let Some(v) = line.strip_prefix("WantedBy=") {
            out.extend(v.split_whitespace().map(str::to_string));
        }
    }
    out
}

/// `KEY=value` of an os-release text (quotes removed).
fn os_release_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}

/// /etc/kairos-release: upstream's KAIROS_* fields, from the image's os-release.
pub fn kairos_release(os_release: &str, kver: &str, arch: &str) -> String {
    let id = os_release_value(os_release, "ID").unwrap_or_else(|| "linux".into());
    let version = os_release_value(os_release, "VERSION_ID").unwrap_or_default();
    let family = os_release_value(os_release, "ID_LIKE")
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| id.clone());
    let name = format!("kairos-core-{id}-{version}");
    let fields = [
        ("KAIROS_ID", "kairos".to_string()),
        ("KAIROS_NAME", name.clone()),
        ("KAIROS_VERSION", env!("CARGO_PKG_VERSION").to_string()),
        ("KAIROS_RELEASE", env!("CARGO_PKG_VERSION").to_string()),
        ("KAIROS_FLAVOR", id),
        ("KAIROS_FLAVOR_RELEASE", version),
        ("KAIROS_FAMILY", family),
        ("KAIROS_VARIANT", "core".to_string()),
        ("KAIROS_MODEL", "generic".to_string()),
        ("KAIROS_ARCH", arch.to_string()),
        ("KAIROS_ID_LIKE", name),
        ("KAIROS_KERNEL", kver.to_string()),
        ("KAIROS_BUILDER", "kairos-build".to_string()),
    ];
    fields
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\"\n"))
        .collect()
}

/// The layout Kairos images ship (SPEC §3), which kairos-init also uses when there is none.
pub fn cos_layout() -> String {
    format!(
        "# Written by kairos-build: the Kairos image defaults. What is writable (RW_PATHS, on a tmpfs\n# overlay) and what persists on COS_PERSISTENT (PERSISTENT_STATE_PATHS).\nVOLUMES=\"LABEL=COS_PERSISTENT:/usr/local\"\nOVERLAY=\"tmpfs:{DEFAULT_OVERLAY_SIZE}\"\nRW_PATHS=\"{}\"\nPERSISTENT_STATE_PATHS=\"{}\"\nPERSISTENT_STATE_TARGET=\"{DEFAULT_PERSISTENT_STATE_TARGET}\"\n",
        KAIROS_RW_PATHS.join(" "),
        KAIROS_PERSISTENT_STATE_PATHS.join(" ")
    )
}

/// A relative path from directory `from` to `to` (both inside one tree, `to` a file).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..a.len() {
        out.push("..");
    }
    for c in &b[common..] {
        out.push(c);
    }
    out
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => n += tree_bytes(&e.path()),
                Ok(t) if t.is_file() => n += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    n
}

fn run_cmd(cmd: &mut Command) -> Result<(), ImageError> {
    run_tool(cmd)?;
    Ok(())
}

/// Makes `tree` Kairos-ready in place (step 3). Returns (report fields filled in).
pub fn make_ready(
    tree: &Path,
    origin: &str,
    kver: Option<&str>,
    init: &Path,
    agent: &Path,
    log: &mut dyn Write,
) -> Result<ImageReport, ImageError> {
    let kernel = initramfs::find_kernel(tree, kver).map_err(|err| ImageError::NoKernel {
        origin: origin.into(),
        err,
    })?;
    writeln!(log, "kairos-build: kernel {} in {origin}", kernel.version).ok();
    let agent_bin = std::fs::read(agent).at(agent, "reading kairos-agent")?;
    write_in(tree, "usr/bin/kairos-agent", &agent_bin, 0o755)?;

    // The generic initramfs from the image's own modules, then /boot/vmlinuz beside it.
    let initrd = file_in(tree, "boot/initrd")?;
    let built = initramfs::build_for_root(tree, Some(&kernel.version), Some(init), &[], &initrd)?;
    let boot = dir_in(tree, "boot")?;
    let target = relative(&boot, &kernel.vmlinuz);
    symlink_in(tree, "boot/vmlinuz", &target.to_string_lossy())?;

    let systemd = ["lib/systemd/systemd", "usr/lib/systemd/systemd"]
        .iter()
        .any(|p| exists_in(tree, p));
    let has_init = exists_in(tree, "sbin/init");
    let init_added = !has_init;
    if init_added {
        let bin = std::fs::read(init).at(init, "reading kairos-init")?;
        write_in(tree, "sbin/init", &bin, 0o755)?;
        writeln!(
            log,
            "kairos-build: the image has no /sbin/init: kairos-init is its PID 1"
        )
        .ok();
    }
    if systemd {
        for (name, text) in kairos_agent::UNITS {
            write_in(
                tree,
                &format!("etc/systemd/system/{name}"),
                text.as_bytes(),
                0o644,
            )?;
            if name.contains("@.") {
                continue;
            }
            for target in wanted_by(text) {
                symlink_in(
                    tree,
                    &format!("etc/systemd/system/{target}.wants/{name}"),
                    &format!("/etc/systemd/system/{name}"),
                )?;
            }
        }
    } else if has_init {
        writeln!(
            log,
            "kairos-build: warning: {origin} has an init that is not systemd: start `kairos-agent daemon` from it"
        )
        .ok();
    }
    let os_release = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| {
            resolve_in(tree, p)
                .ok()
                .flatten()
                .and_then(|h| std::fs::read_to_string(h).ok())
        })
        .unwrap_or_default();
    let arch = kairos_agent::upgrade::oci::this_arch();
    write_in(
        tree,
        "etc/kairos-release",
        kairos_release(&os_release, &kernel.version, arch).as_bytes(),
        0o644,
    )?;
    let layout_added = !exists_in(tree, "etc/cos/cos-layout.env");
    if layout_added {
        write_in(
            tree,
            "etc/cos/cos-layout.env",
            cos_layout().as_bytes(),
            0o644,
        )?;
    }
    // Mount points: the root is read-only when kairos-init mounts these.
    for d in [
        "oem",
        "usr/local",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var",
        "etc",
        "home",
        "root",
        "srv",
        "opt",
    ] {
        dir_in(tree, d)?;
    }
    Ok(ImageReport {
        out: String::new(),
        kernel: kernel.version.clone(),
        initrd_bytes: built.report.size_bytes,
        modules: built.report.modules.len(),
        missing_modules: built.report.missing.clone(),
        tree_bytes: 0,
        layer_bytes: None,
        manifest_digest: None,
        systemd,
        init_added,
        layout_added,
        seconds: 0.0,
    })
}

pub fn run(args: &ImageArgs, log: &mut dyn Write) -> Result<ImageReport, ImageError> {
    let started = Instant::now();
    // 1. Checks that write nothing.
    let out = parse_out(&args.out)?;
    match &out {
        Output::Dir(p) => {
            let non_empty = std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
            if non_empty || p.is_file() {
                return Err(ImageError::Out {
                    given: args.out.clone(),
                    what: "exists and is not an empty directory".into(),
                });
            }
        }
        Output::Archive(p) => {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() || p.is_dir() {
                return Err(ImageError::Out {
                    given: args.out.clone(),
                    what: format!("{} must be a file in an existing directory", p.display()),
                });
            }
        }
        Output::Registry(_) => {}
    }
    let init = find_program("kairos-init", "--init", args.init.as_deref())?;
    let agent = find_program("kairos-agent", "--agent", args.agent.as_deref())?;

    // 2. The source, staged.
    let work = WorkDir::new(args.work_dir.as_deref(), "image")?;
    let stage = work.path().join("rootfs");
    let ctx = Ctx::new("/", "/oem/grubenv");
    let mut src = SourceImage::resolve(&ctx, &args.source, work.path(), log)?;
    if src.is_remote() {
        writeln!(log, "kairos-build: pulling {}", src.origin).ok();
        src.unpack_into(work.path(), log)?;
    } else if let Some(tree) = src.tree() {
        std::fs::create_dir_all(&stage).at(&stage, "creating")?;
        run_cmd(
            Command::new("cp")
                .args(["-a", "--reflink=auto", "--"])
                .arg(tree.join("."))
                .arg(&stage),
        )?;
    }
    let origin = src.origin.clone();
    drop(src);

    // 3. Kairos-ready.
    let mut report = make_ready(&stage, &origin, args.kver.as_deref(), &init, &agent, log)?;
    report.tree_bytes = tree_bytes(&stage);

    // 4. Out.
    match &out {
        Output::Dir(p) => {
            if p.exists() {
                std::fs::remove_dir(p).at(p, "replacing the empty directory")?;
            }
            if std::fs::rename(&stage, p).is_err() {
                std::fs::create_dir_all(p).at(p, "creating")?;
                run_cmd(
                    Command::new("cp")
                        .args(["-a", "--reflink=auto", "--"])
                        .arg(stage.join("."))
                        .arg(p),
                )?;
            }
        }
        Output::Archive(p) => {
            let img = oci_image(&stage, work.path(), &report)?;
            oci::write_archive(&img, "latest", p)?;
            report.record(img);
        }
        Output::Registry(r) => {
            let img = oci_image(&stage, work.path(), &report)?;
            oci::push(&img, r, &args.out)?;
            report.record(img);
        }
    }
    report.out = args.out.clone();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The OCI image of the finished tree, labelled with its kernel and builder.
fn oci_image(stage: &Path, work: &Path, r: &ImageReport) -> Result<oci::Image, ImageError> {
    let labels = [
        ("io.kairos.kernel".to_string(), r.kernel.clone()),
        (
            "io.kairos.builder".to_string(),
            format!("kairos-build {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    let arch = kairos_agent::upgrade::oci::this_arch();
    Ok(oci::build(stage, &work.join("oci"), arch, &labels)?)
}

impl ImageReport {
    fn record(&mut self, img: oci::Image) {
        self.layer_bytes = Some(img.layer_size);
        self.manifest_digest = Some(img.manifest_digest);
    }
}

/// The report as the CLI prints it.
pub fn summary(r: &ImageReport) -> String {
    let mut s = format!(
        "kairos-build: {} ready: kernel {}, initrd {} bytes ({} modules), tree {} MiB",
        r.out,
        r.kernel,
        r.initrd_bytes,
        r.modules,
        r.tree_bytes >> 20
    );
    if let Some(l) = r.layer_bytes {
        s.push_str(&format!(", layer {} MiB", l.div_ceil(1 << 20)));
    }
    if let Some(d) = &r.manifest_digest {
        s.push_str(&format!(", manifest {d}"));
    }
    s.push_str(&format!(
        "; {}{}{} in {:.1} s",
        if r.systemd {
            "systemd units enabled"
        } else {
            "no systemd"
        },
        if r.init_added {
            ", kairos-init as /sbin/init"
        } else {
            ""
        },
        if r.layout_added {
            ", cos-layout.env added"
        } else {
            ""
        },
        r.seconds
    ));
    if !r.missing_modules.is_empty() {
        s.push_str(&format!(
            "\nmissing (not in this kernel's tree): {}",
            r.missing_modules.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_forms() {
        assert_eq!(
            parse_out("ocifile:/tmp/a.tar").unwrap(),
            Output::Archive("/tmp/a.tar".into())
        );
        assert_eq!(parse_out("dir:out").unwrap(), Output::Dir("out".into()));
        match parse_out("oci:127.0.0.1:5000/kairos/os:v1").unwrap() {
            Output::Registry(r) => {
                assert_eq!(r.registry, "127.0.0.1:5000");
                assert_eq!(r.repository, "kairos/os");
                assert_eq!(r.tag, "v1");
            }
            o => panic!("{o:?}"),
        }
        for bad in ["", "out.tar", "tar:x", "dir:", "oci:"] {
            let e = parse_out(bad).unwrap_err().to_string();
            assert!(e.starts_with("--out "), "{bad}: {e}");
        }
    }

    #[test]
    fn paths_stay_inside_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        // Merged /usr with an absolute link, as some images ship it: must not reach the host.
        std::os::unix::fs::symlink("/usr/sbin", tree.join("sbin")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("escape")).unwrap();
        write_in(&tree, "sbin/init", b"x", 0o755).unwrap();
        assert!(tree.join("usr/sbin/init").is_file());
        // A link to a host path that the tree does not have is dangling inside the tree:
        // refused, and nothing lands on the host.
        assert!(write_in(&tree, "escape/file", b"x", 0o644).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        std::os::unix::fs::symlink("/nowhere/x", tree.join("dangling")).unwrap();
        assert!(dir_in(&tree, "dangling/sub").is_err());
    }

    #[test]
    fn units_are_enabled_by_their_wanted_by() {
        assert_eq!(
            wanted_by("[Unit]\nWantedBy=no\n[Install]\nWantedBy=multi-user.target a.target\n"),
            ["multi-user.target", "a.target"]
        );
        assert!(wanted_by("[Service]\nExecStart=/x\n").is_empty());
        // Every shipped unit with an [Install] section says where it is wanted (the
        // reconcile service is started by its timer).
        for (name, text) in kairos_agent::UNITS {
            assert_eq!(
                !wanted_by(text).is_empty(),
                text.contains("[Install]"),
                "{name}"
            );
        }
    }

    #[test]
    fn release_and_layout_text() {
        let r = kairos_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
            "6.1.0-57-amd64",
            "amd64",
        );
        assert!(r.contains("KAIROS_FLAVOR=\"debian\"\n"), "{r}");
        assert!(r.contains("KAIROS_FLAVOR_RELEASE=\"12\"\n"), "{r}");
        assert!(r.contains("KAIROS_NAME=\"kairos-core-debian-12\"\n"), "{r}");
        assert!(r.contains("KAIROS_KERNEL=\"6.1.0-57-amd64\"\n"), "{r}");
        let l = cos_layout();
        let parsed = kairos_init::layout::parse_env(&l, Path::new("cos-layout.env"))
            .expect("kairos-init reads it");
        let paths = parsed
            .iter()
            .find(|(k, _)| k == "PERSISTENT_STATE_PATHS")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        assert!(paths.contains("/etc/ssh"), "{parsed:?}");
        assert_eq!(
            relative(Path::new("/t/boot"), Path::new("/t/boot/vmlinuz-6.1")),
            Path::new("vmlinuz-6.1")
        );
        assert_eq!(
            relative(
                Path::new("/t/boot"),
                Path::new("/t/usr/lib/modules/6.1/vmlinuz")
            ),
            Path::new("../usr/lib/modules/6.1/vmlinuz")
        );
    }
}
