//! The Kairos GPT disk (SPEC §1, BIOS): bios, oem, recovery, state,
//! persistent. Every filesystem is made in a file with `mkfs.ext4 -d` and
//! copied to its partition's offset, so no mount or loop device is needed.

use std::borrow::Borrow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use kairos_init::grubcfg::{GRUB_DIR, grub_prefix};
use kairos_util::{IoError, IoResultExt, ToolError, run_tool};

use crate::apt::{self, AptError};
use crate::grub::{self, GrubCfgOptions, GrubError};
use crate::kernel::Kernel;
use crate::rootfs::{self, ExtFs, RootfsError, RootfsOptions};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Slot numbers are fixed so the state partition is always gpt4 (the GRUB prefix).
const BIOS: u32 = 1;
const OEM: u32 = 2;
const RECOVERY: u32 = 3;
const STATE: u32 = 4;
const PERSISTENT: u32 = 5;
const OEM_MB: u64 = 64;
const PERSISTENT_MB: u64 = 64;

/// What to put where an image file belongs, to test broken installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageState {
    #[default]
    Ok,
    /// No file at all.
    Missing,
    /// A file of the normal size holding only zeros (sparse).
    Zeros,
    /// The real image cut to its first MiB: superblock intact, data gone.
    Truncated,
    /// The real image with its superblock fields overwritten (the magic kept, so probes still
    /// recognise the filesystem and the kernel's mount is what must fail).
    CorruptSuperblock,
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub out: PathBuf,
    pub kernel: Kernel,
    pub initramfs: PathBuf,
    /// Create COS_PERSISTENT (partition 5).
    pub persistent: bool,
    /// Create COS_OEM (partition 2); without it slot 2 stays empty.
    pub oem: bool,
    pub active: ImageState,
    pub passive: ImageState,
    pub recovery: ImageState,
    /// `/etc/cos/cos-layout.env` in the images.
    pub layout_file: Option<String>,
    /// Files (path inside COS_OEM, contents) to put on the OEM partition;
    /// a `grubenv` here replaces the generated one (corrupt-block tests).
    pub oem_files: Vec<(String, Vec<u8>)>,
    /// Variables set in the initial `COS_OEM:/grubenv` after its default
    /// `kairos_max_tries=3` (e.g. `enable_boot_assessment=yes` and counters).
    pub grubenv: Vec<(String, String)>,
    /// The kairos-agent binary, installed as `/usr/bin/kairos-agent` in every image.
    pub agent: Option<PathBuf>,
    /// The busybox image variant with this binary (kairos-init) as `/sbin/init`, so it runs as
    /// the system's PID 1 ([`rootfs::install_init_binary`]). Ignored with `tree`.
    pub init: Option<PathBuf>,
    /// A prepared root tree (the Debian image) used instead of the busybox one. It is changed
    /// in place: `/boot/vmlinuz`, `/boot/initrd`, `/etc/kairos-image`, the layout file, the
    /// agent and `image_files` are written into it.
    pub tree: Option<PathBuf>,
    /// [`rootfs::K3S_STANDIN`] at `/usr/bin/k3s`.
    pub k3s_standin: bool,
    /// Extra files in the image: (absolute path, contents, mode).
    pub image_files: Vec<(String, Vec<u8>, u32)>,
    /// Host files or directories copied to the same path in the image; executables bring
    /// their shared libraries and loader ([`rootfs::add_host_path`]), e.g. `/sbin/mke2fs`.
    pub host_tools: Vec<String>,
    /// MiB added to COS_STATE beyond room for one more image (upgrades of bigger images).
    pub state_extra_mb: u64,
    /// Symlinks in the image: (absolute path, target), replacing whatever is there.
    pub image_symlinks: Vec<(String, String)>,
    /// Files put on COS_STATE next to `cOS/` and `grub2/`: (path inside it, contents), e.g.
    /// a `grubcustom` that grub.cfg sources after its entries.
    pub state_files: Vec<(String, Vec<u8>)>,
    /// Files put on COS_PERSISTENT before the first boot: (path inside it, contents).
    pub persistent_files: Vec<(String, Vec<u8>)>,
    /// Symlinks put on COS_PERSISTENT: (path inside it, target).
    pub persistent_symlinks: Vec<(String, String)>,
    pub grub_timeout: u32,
    /// Appended to every entry's kernel command line by grub.cfg.
    pub extra_cmdline: String,
    /// Scratch directory, kept afterwards; default: a temp dir next to `out`, removed.
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskReport {
    pub size_bytes: u64,
    /// (number, GPT name, filesystem label ("" for bios), first sector, sectors).
    pub partitions: Vec<(u32, String, String, u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] ToolError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Grub(#[from] GrubError),
    #[error("installing disk tools: {0}")]
    Apt(AptError),
    #[error("OEM file path {0:?} must be relative and stay inside the partition")]
    BadOemPath(String),
    #[error(
        "grubenv variable {0:?}: names are non-empty, without `=` or newlines; values without newlines"
    )]
    BadGrubenvVar(String),
    #[error("{}: `sgdisk -i {part}` output lacks {what}: {output}", disk.display())]
    Sgdisk {
        disk: PathBuf,
        part: u32,
        what: &'static str,
        output: String,
    },
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<AptError> for DiskError {
    fn from(e: AptError) -> DiskError {
        DiskError::Apt(e)
    }
}

/// Defaults: all five partitions, all images good, 1 s GRUB timeout.
/// Takes the kernel by value or by reference.
pub fn demo_spec(
    out: impl Into<PathBuf>,
    kernel: impl Borrow<Kernel>,
    initramfs: impl Into<PathBuf>,
) -> DiskSpec {
    DiskSpec {
        out: out.into(),
        kernel: kernel.borrow().clone(),
        initramfs: initramfs.into(),
        persistent: true,
        oem: true,
        active: ImageState::Ok,
        passive: ImageState::Ok,
        recovery: ImageState::Ok,
        layout_file: None,
        oem_files: Vec::new(),
        grubenv: Vec::new(),
        agent: None,
        init: None,
        tree: None,
        k3s_standin: false,
        image_files: Vec::new(),
        host_tools: Vec::new(),
        state_extra_mb: 0,
        image_symlinks: Vec::new(),
        state_files: Vec::new(),
        persistent_files: Vec::new(),
        persistent_symlinks: Vec::new(),
        grub_timeout: 1,
        extra_cmdline: String::new(),
        work_dir: None,
    }
}

/// The scratch directory; removed on drop when we made it.
struct WorkDir {
    path: PathBuf,
    remove: bool,
}

impl WorkDir {
    fn new(spec: &DiskSpec) -> Result<Self, DiskError> {
        let (path, remove) = match &spec.work_dir {
            Some(p) => (p.clone(), false),
            None => {
                let name = spec
                    .out
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "disk".into());
                let parent = spec.out.parent().filter(|p| !p.as_os_str().is_empty());
                let parent = parent.unwrap_or(Path::new("."));
                (
                    parent.join(format!(".{name}.work.{}", std::process::id())),
                    true,
                )
            }
        };
        fs::create_dir_all(&path).at(&path, "creating")?;
        let wd = WorkDir { path, remove };
        // A kept work dir may hold an earlier build; our subdirs start empty.
        for sub in ["rootfs", "state", "recovery", "oem", "persistent", "parts"] {
            let p = wd.path.join(sub);
            if p.exists() {
                fs::remove_dir_all(&p).at(&p, "removing")?;
            }
        }
        Ok(wd)
    }

    fn dir(&self, sub: &str) -> Result<PathBuf, DiskError> {
        let p = self.path.join(sub);
        fs::create_dir_all(&p).at(&p, "creating")?;
        Ok(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Applies an [`ImageState`] to a freshly built image file.
fn degrade(path: &Path, state: ImageState) -> Result<(), DiskError> {
    let len = || {
        fs::metadata(path)
            .map(|m| m.len())
            .at(path, "reading metadata")
    };
    let set_len = |n: u64| -> Result<(), DiskError> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .at(path, "opening")?;
        Ok(f.set_len(n).at(path, "resizing")?)
    };
    match state {
        ImageState::Ok => Ok(()),
        ImageState::Missing => Ok(fs::remove_file(path).at(path, "removing")?),
        ImageState::Zeros => {
            // Truncating to 0 and back leaves a hole: all zeros, no disk blocks.
            let n = len()?;
            set_len(0)?;
            set_len(n)
        }
        ImageState::Truncated => {
            let n = len()?;
            set_len(MIB.min(n / 2))
        }
        ImageState::CorruptSuperblock => {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .at(path, "opening")?;
            let mut head = [0u8; 4];
            f.read_exact(&mut head).at(path, "reading")?;
            // squashfs: root inode, size and table offsets (magic and version stay, so only the
            // kernel's mount can tell); ext*: the superblock at 1024 up to its magic at 0x38.
            let (at, n) = if &head == b"hsqs" {
                (32, 64)
            } else {
                (1024, 0x38)
            };
            f.seek(SeekFrom::Start(at)).at(path, "seeking")?;
            f.write_all(&vec![0xA5; n]).at(path, "writing")?;
            Ok(f.sync_all().at(path, "syncing")?)
        }
    }
}

/// Creates `target` as a symlink at `rel` inside `tree`, replacing what is there.
fn put_symlink(tree: &Path, rel: &str, target: &str) -> Result<(), DiskError> {
    let path = oem_path(tree, rel)?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at(parent, "creating")?;
    }
    if let Ok(m) = path.symlink_metadata() {
        if m.is_dir() {
            fs::remove_dir_all(&path).at(&path, "removing")?;
        } else {
            fs::remove_file(&path).at(&path, "removing")?;
        }
    }
    Ok(std::os::unix::fs::symlink(target, &path).at(&path, "creating the symlink")?)
}

/// Rejects absolute paths and `..`, so OEM files land inside the OEM tree.
fn oem_path(tree: &Path, rel: &str) -> Result<PathBuf, DiskError> {
    let rel_path = Path::new(rel.trim_start_matches('/'));
    let ok = rel_path.components().count() > 0
        && rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(DiskError::BadOemPath(rel.to_string()));
    }
    Ok(tree.join(rel_path))
}

/// The initial boot-assessment environment (issue 3): `kairos_max_tries=3`,
/// nothing armed, then `vars` in order. Written by `grub-editenv`, GRUB's own
/// tool, so the block is exactly what GRUB's `load_env`/`save_env` expect.
pub fn write_grubenv(path: &Path, vars: &[(String, String)]) -> Result<(), DiskError> {
    for (k, v) in vars {
        if k.is_empty() || k.contains(['=', '\n']) || v.contains('\n') {
            return Err(DiskError::BadGrubenvVar(format!("{k}={v}")));
        }
    }
    if path.symlink_metadata().is_ok() {
        fs::remove_file(path).at(path, "removing")?;
    }
    run_tool(Command::new("grub-editenv").arg(path).arg("create"))?;
    let mut set = Command::new("grub-editenv");
    set.arg(path)
        .arg("set")
        .arg(format!("kairos_max_tries={}", grub::DEFAULT_MAX_TRIES));
    set.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
    run_tool(&mut set)?;
    Ok(())
}

/// Where partition `n`'s bytes are in a disk image: (byte offset, length),
/// from the GPT via `sgdisk -i`. Lets tests read COS_OEM's grubenv back.
pub fn partition_bytes(disk: &Path, n: u32) -> Result<(u64, u64), DiskError> {
    let (first, sectors) = partition_extent(disk, n)?;
    Ok((first * SECTOR, sectors * SECTOR))
}

/// GPT partition numbers of the disks [`build`] makes.
pub mod part {
    pub const BIOS: u32 = super::BIOS;
    pub const OEM: u32 = super::OEM;
    pub const RECOVERY: u32 = super::RECOVERY;
    pub const STATE: u32 = super::STATE;
    pub const PERSISTENT: u32 = super::PERSISTENT;
}

/// First sector and sector count of partition `n`, read back from `sgdisk -i`.
fn partition_extent(disk: &Path, n: u32) -> Result<(u64, u64), DiskError> {
    let out = run_tool(Command::new("sgdisk").arg(format!("-i{n}")).arg(disk))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |key: &'static str| -> Result<u64, DiskError> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| DiskError::Sgdisk {
                disk: disk.to_path_buf(),
                part: n,
                what: key,
                output: text.clone(),
            })
    };
    let first = field("First sector:")?;
    let last = field("Last sector:")?;
    if last < first {
        return Err(DiskError::Sgdisk {
            disk: disk.to_path_buf(),
            part: n,
            what: "a last sector after the first",
            output: text,
        });
    }
    Ok((first, last - first + 1))
}

/// Copies `src` into `dst` at byte `offset`, skipping all-zero chunks: `dst`
/// is a fresh sparse file, so holes stay holes and only data gets written.
fn write_sparse_at(
    src: &Path,
    dst: &mut File,
    dst_path: &Path,
    offset: u64,
) -> Result<(), DiskError> {
    const CHUNK: usize = 1 << 16;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let mut input = File::open(src).at(src, "opening")?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = offset;
    loop {
        // Fill the whole chunk (short reads are legal) so zero detection is per chunk.
        let mut n = 0;
        while n < CHUNK {
            match input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(IoError::new(src, "reading", e).into()),
            }
        }
        if n == 0 {
            return Ok(());
        }
        // Slice equality is a memcmp, fast even in debug builds.
        if buf[..n] != ZEROS[..n] {
            dst.seek(SeekFrom::Start(pos)).at(dst_path, "seeking")?;
            dst.write_all(&buf[..n]).at(dst_path, "writing")?;
        }
        pos += n as u64;
    }
}

/// Builds the whole disk image at `spec.out` (replacing it) and installs GRUB.
pub fn build(spec: &DiskSpec) -> Result<DiskReport, DiskError> {
    let mut packages = vec!["gdisk"];
    packages.extend_from_slice(rootfs::PACKAGES);
    packages.extend_from_slice(grub::PACKAGES);
    apt::ensure_packages(&packages)?;

    let work = WorkDir::new(spec)?;

    // One rootfs tree, relabelled between images: active, passive, then recovery.
    let opts = RootfsOptions {
        kernel: Some(spec.kernel.vmlinuz.clone()),
        initrd: Some(spec.initramfs.clone()),
        layout_file: spec.layout_file.clone(),
    };
    let tree = match &spec.tree {
        Some(t) => {
            rootfs::install_boot_files(t, &opts)?;
            t.clone()
        }
        None => {
            let t = work.dir("rootfs")?;
            rootfs::build_tree_unchecked(&t, "active", &opts)?;
            if let Some(init) = &spec.init {
                rootfs::install_init_binary(&t, init)?;
            }
            t
        }
    };
    if spec.k3s_standin {
        rootfs::add_file(&tree, "/usr/bin/k3s", rootfs::K3S_STANDIN.as_bytes(), 0o755)?;
    }
    for (path, data, mode) in &spec.image_files {
        rootfs::add_file(&tree, path, data, *mode)?;
    }
    for tool in &spec.host_tools {
        rootfs::add_host_path(&tree, Path::new(tool))?;
    }
    for (path, target) in &spec.image_symlinks {
        put_symlink(&tree, path, target)?;
    }
    if let Some(agent) = &spec.agent {
        let to = tree.join("usr/bin/kairos-agent");
        fs::copy(agent, &to).at(agent, format!("copying to {}", to.display()))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
            .at(&to, "setting permissions")?;
    }
    let img_mb = rootfs::image_size_mb(&tree)?;

    let state_tree = work.dir("state")?;
    let cos_dir = state_tree.join("cOS");
    fs::create_dir_all(&cos_dir).at(&cos_dir, "creating")?;
    for (name, label, state) in [
        ("active", "COS_ACTIVE", spec.active),
        ("passive", "COS_PASSIVE", spec.passive),
    ] {
        if state == ImageState::Missing {
            continue;
        }
        rootfs::set_image_name(&tree, name)?;
        let img = cos_dir.join(format!("{name}.img"));
        rootfs::mkfs_ext(Some(&tree), &img, label, img_mb * 1024, ExtFs::Ext4)?;
        degrade(&img, state)?;
    }
    let grub_dir = state_tree.join(GRUB_DIR);
    fs::create_dir_all(&grub_dir).at(&grub_dir, "creating")?;
    let cfg = grub::grub_cfg(&GrubCfgOptions {
        timeout: spec.grub_timeout,
        extra_cmdline: spec.extra_cmdline.clone(),
    });
    let cfg_path = grub_dir.join("grub.cfg");
    fs::write(&cfg_path, cfg).at(&cfg_path, "writing")?;
    grub::install_modules(&grub_dir)?;
    for (rel, data) in &spec.state_files {
        let path = oem_path(&state_tree, rel)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).at(parent, "creating")?;
        }
        fs::write(&path, data).at(&path, "writing")?;
    }

    let rec_tree = work.dir("recovery")?;
    let rec_cos = rec_tree.join("cOS");
    fs::create_dir_all(&rec_cos).at(&rec_cos, "creating")?;
    if spec.recovery != ImageState::Missing {
        rootfs::set_image_name(&tree, "recovery")?;
        let sq = rec_cos.join("recovery.squashfs");
        rootfs::make_squashfs_unchecked(&tree, &sq)?;
        degrade(&sq, spec.recovery)?;
    }

    let oem_tree = work.dir("oem")?;
    write_grubenv(&oem_tree.join("grubenv"), &spec.grubenv)?;
    for (rel, data) in &spec.oem_files {
        let path = oem_path(&oem_tree, rel)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).at(parent, "creating")?;
        }
        fs::write(&path, data).at(&path, "writing")?;
        // Cloud-configs carry tokens and passwords: root only, as the installer writes them.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .at(&path, "setting permissions")?;
    }
    let persistent_tree = work.dir("persistent")?;
    for (rel, data) in &spec.persistent_files {
        let path = oem_path(&persistent_tree, rel)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).at(parent, "creating")?;
        }
        fs::write(&path, data).at(&path, "writing")?;
    }
    for (rel, target) in &spec.persistent_symlinks {
        put_symlink(&persistent_tree, rel, target)?;
    }

    // Room for content plus headroom: state keeps space for an upgrade's
    // transition.img, recovery for a second image.
    let state_mb = (rootfs::tree_bytes(&state_tree)? * 11 / 10).div_ceil(MIB)
        + img_mb
        + 48
        + spec.state_extra_mb;
    let recovery_mb = (rootfs::tree_bytes(&rec_tree)? * 2).div_ceil(MIB) + 48;
    let mut parts: Vec<(u32, &str, &str, u64, Option<&Path>)> = vec![(BIOS, "bios", "", 1, None)];
    if spec.oem {
        parts.push((OEM, "oem", "COS_OEM", OEM_MB, Some(&oem_tree)));
    }
    parts.push((
        RECOVERY,
        "recovery",
        "COS_RECOVERY",
        recovery_mb,
        Some(&rec_tree),
    ));
    parts.push((STATE, "state", "COS_STATE", state_mb, Some(&state_tree)));
    if spec.persistent {
        parts.push((
            PERSISTENT,
            "persistent",
            "COS_PERSISTENT",
            PERSISTENT_MB,
            Some(&persistent_tree),
        ));
    }
    // 1 MiB in front (MBR, GPT, alignment) and 1 MiB behind (backup GPT).
    let size_bytes = (parts.iter().map(|p| p.3).sum::<u64>() + 2) * MIB;

    let out = &spec.out;
    if out.symlink_metadata().is_ok() {
        fs::remove_file(out).at(out, "removing")?;
    }
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(out)
        .at(out, "creating")?;
    disk.set_len(size_bytes).at(out, "resizing")?;

    let mut sgdisk = Command::new("sgdisk");
    sgdisk.args(["-a", "2048"]);
    let last_n = parts.last().map(|p| p.0);
    for &(n, name, _, mb, _) in &parts {
        // The last partition takes the rest of the disk, as upstream's persistent does.
        let end = if Some(n) == last_n {
            "0".to_string()
        } else {
            format!("+{mb}M")
        };
        sgdisk.arg(format!("-n{n}:0:{end}"));
        sgdisk.arg(format!("-c{n}:{name}"));
        sgdisk.arg(format!("-t{n}:{}", if n == BIOS { "ef02" } else { "8300" }));
    }
    sgdisk.arg(out);
    run_tool(&mut sgdisk)?;

    let parts_dir = work.dir("parts")?;
    let mut report = DiskReport {
        size_bytes,
        partitions: Vec::new(),
    };
    for &(n, name, label, _, tree) in &parts {
        let (first, sectors) = partition_extent(out, n)?;
        report
            .partitions
            .push((n, name.to_string(), label.to_string(), first, sectors));
        let Some(tree) = tree else { continue };
        let img = parts_dir.join(format!("{name}.img"));
        rootfs::mkfs_ext(
            Some(tree),
            &img,
            label,
            sectors * SECTOR / 1024,
            ExtFs::Ext4,
        )?;
        write_sparse_at(&img, &mut disk, out, first * SECTOR)?;
        // Done with it: keeps the scratch space (and a kept work dir) small.
        fs::remove_file(&img).at(&img, "removing")?;
    }
    disk.sync_all().at(out, "syncing")?;
    drop(disk);

    grub::install_bios_unchecked(out, report.partitions[0].3, &grub_prefix(STATE))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn on_path(tool: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
    }

    /// Building a disk needs root and the tools below: without them the test fails and says
    /// which (it never passes without having run).
    fn ready() {
        let is_root = fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().nth(1) == Some("0"))
        });
        let tools = [
            "sgdisk",
            "mkfs.ext4",
            "mksquashfs",
            "grub-mkimage",
            "debugfs",
            "blkid",
        ]
        .iter()
        .all(|t| on_path(t))
            && Path::new(rootfs::HOST_BUSYBOX).exists();
        assert!(
            is_root && tools,
            "needs root and gdisk, e2fsprogs, squashfs-tools, grub-pc-bin, busybox-static (`kairos-qemu setup` installs them)"
        );
    }

    fn fake_spec(dir: &Path) -> DiskSpec {
        let vmlinuz = dir.join("vmlinuz");
        let initrd = dir.join("initrd");
        fs::write(&vmlinuz, vec![0x5a; 300_000]).unwrap();
        fs::write(&initrd, vec![0xa5; 200_000]).unwrap();
        let kernel = Kernel {
            version: "0.0.0-test".into(),
            vmlinuz,
            modules_dir: dir.join("modules"),
        };
        demo_spec(dir.join("disk.img"), kernel, initrd)
    }

    /// Extracts a partition's bytes so debugfs can read its filesystem.
    fn extract(disk: &Path, first: u64, sectors: u64, to: &Path) {
        let data = fs::read(disk).unwrap();
        let start = (first * SECTOR) as usize;
        let end = start + (sectors * SECTOR) as usize;
        fs::write(to, &data[start..end]).unwrap();
    }

    fn debugfs(img: &Path, req: &str) -> String {
        let out = run_tool(Command::new("debugfs").args(["-R", req]).arg(img)).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn oem_paths_stay_inside() {
        let t = Path::new("/x");
        assert_eq!(oem_path(t, "/grubenv").unwrap(), Path::new("/x/grubenv"));
        assert_eq!(oem_path(t, "a/b.yaml").unwrap(), Path::new("/x/a/b.yaml"));
        assert!(oem_path(t, "../etc").is_err());
        assert!(oem_path(t, "").is_err());
        assert!(oem_path(t, "a/./b").is_ok());
    }

    #[test]
    fn grubenv_presets_follow_the_default() {
        assert!(
            on_path("grub-editenv"),
            "needs grub-editenv (grub-common; `kairos-qemu setup` installs it)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("grubenv");
        fs::write(&path, b"old").unwrap();
        let vars = [
            ("enable_boot_assessment", "yes"),
            ("kairos_tries_cos", "2"),
            ("kairos_max_tries", "2"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        write_grubenv(&path, &vars).unwrap();
        let block = fs::read(&path).unwrap();
        assert_eq!(block.len(), 1024);
        let list = run_tool(Command::new("grub-editenv").arg(&path).arg("list")).unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        assert_eq!(
            list,
            "kairos_max_tries=2\nenable_boot_assessment=yes\nkairos_tries_cos=2\n"
        );
        for bad in [("", "x"), ("a=b", "c"), ("a", "b\nc")] {
            let err = write_grubenv(&path, &[(bad.0.into(), bad.1.into())]).unwrap_err();
            assert!(matches!(err, DiskError::BadGrubenvVar(_)), "{err}");
        }
    }

    #[test]
    fn builds_kairos_disk() {
        ready();
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = fake_spec(tmp.path());
        spec.oem_files = vec![("90_custom.yaml".into(), b"#cloud-config\n".to_vec())];
        spec.passive = ImageState::Truncated;
        let agent = tmp.path().join("fake-agent");
        fs::write(&agent, b"#!/bin/sh\n").unwrap();
        spec.agent = Some(agent);
        let t0 = Instant::now();
        let report = build(&spec).unwrap();
        eprintln!(
            "built {} MiB disk in {:?}",
            report.size_bytes >> 20,
            t0.elapsed()
        );
        assert_eq!(fs::metadata(&spec.out).unwrap().len(), report.size_bytes);
        assert!(report.size_bytes < 600 * MIB);
        let names: Vec<&str> = report.partitions.iter().map(|p| p.1.as_str()).collect();
        assert_eq!(names, ["bios", "oem", "recovery", "state", "persistent"]);
        assert_eq!(report.partitions[0].3, 2048);
        assert_eq!(report.partitions[0].4, 2048);

        let p = run_tool(Command::new("sgdisk").arg("-p").arg(&spec.out)).unwrap();
        let p = String::from_utf8_lossy(&p.stdout);
        for name in names {
            assert!(p.contains(name), "{p}");
        }
        for &(_, _, ref label, first, _) in &report.partitions[1..] {
            let probe = run_tool(
                Command::new("blkid")
                    .args(["-p", "-o", "value", "-s", "LABEL", "-O"])
                    .arg((first * SECTOR).to_string())
                    .arg(&spec.out),
            )
            .unwrap();
            assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), label);
        }

        let state = &report.partitions[3];
        let state_img = tmp.path().join("state.img");
        extract(&spec.out, state.3, state.4, &state_img);
        let ls = debugfs(&state_img, "ls -l /cOS");
        assert!(
            ls.contains("active.img") && ls.contains("passive.img"),
            "{ls}"
        );
        let cfg = debugfs(&state_img, "cat /grub2/grub.cfg");
        assert!(cfg.contains("--id cos"), "{cfg}");
        assert!(debugfs(&state_img, "ls /grub2/i386-pc").contains("normal.mod"));
        // The active image inside the state filesystem, read back.
        let active = tmp.path().join("active.img");
        run_tool(
            Command::new("debugfs")
                .args(["-R", &format!("dump /cOS/active.img {}", active.display())])
                .arg(&state_img),
        )
        .unwrap();
        assert_eq!(debugfs(&active, "cat /etc/kairos-image"), "active\n");
        assert_eq!(debugfs(&active, "cat /usr/bin/kairos-agent"), "#!/bin/sh\n");
        assert!(debugfs(&active, "stat /usr/bin/kairos-agent").contains("Mode:  0755"));
        assert_eq!(fs::read(tmp.path().join("initrd")).unwrap(), {
            let out = tmp.path().join("initrd.back");
            run_tool(
                Command::new("debugfs")
                    .args(["-R", &format!("dump /boot/initrd {}", out.display())])
                    .arg(&active),
            )
            .unwrap();
            fs::read(out).unwrap()
        });
        let passive = tmp.path().join("passive.img");
        run_tool(
            Command::new("debugfs")
                .args([
                    "-R",
                    &format!("dump /cOS/passive.img {}", passive.display()),
                ])
                .arg(&state_img),
        )
        .unwrap();
        assert_eq!(fs::metadata(&passive).unwrap().len(), MIB);

        let oem = &report.partitions[1];
        let oem_img = tmp.path().join("oem.img");
        extract(&spec.out, oem.3, oem.4, &oem_img);
        assert_eq!(debugfs(&oem_img, "cat /90_custom.yaml"), "#cloud-config\n");
        let env = debugfs(&oem_img, "cat /grubenv");
        assert_eq!(env.len(), 1024);
        assert!(env.starts_with("# GRUB Environment Block\n"), "{env}");
        let vars: Vec<&str> = env.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(vars, ["kairos_max_tries=3"]);
        assert_eq!(
            partition_bytes(&spec.out, part::OEM).unwrap(),
            (oem.3 * SECTOR, oem.4 * SECTOR)
        );

        let rec = &report.partitions[2];
        let rec_img = tmp.path().join("rec.img");
        extract(&spec.out, rec.3, rec.4, &rec_img);
        assert!(debugfs(&rec_img, "ls /cOS").contains("recovery.squashfs"));

        // The MBR carries GRUB's boot code pointing at the bios partition.
        let mbr = &fs::read(&spec.out).unwrap()[..512];
        assert_eq!(
            u64::from_le_bytes(mbr[0x5c..0x64].try_into().unwrap()),
            2048
        );
        // No scratch left next to the disk.
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".work."))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn builds_without_optional_partitions() {
        ready();
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = fake_spec(tmp.path());
        spec.persistent = false;
        spec.oem = false;
        spec.active = ImageState::Zeros;
        spec.recovery = ImageState::Missing;
        spec.work_dir = Some(tmp.path().join("work"));
        let report = build(&spec).unwrap();
        let nums: Vec<u32> = report.partitions.iter().map(|p| p.0).collect();
        assert_eq!(nums, [1, 3, 4]);
        let state = &report.partitions[2];
        let state_img = tmp.path().join("state.img");
        extract(&spec.out, state.3, state.4, &state_img);
        let stat = debugfs(&state_img, "stat /cOS/active.img");
        assert!(stat.contains("Size: "), "{stat}");
        assert!(
            tmp.path().join("work/rootfs/sbin/init").exists(),
            "work dir kept"
        );
        let rec = &report.partitions[1];
        let rec_img = tmp.path().join("rec.img");
        extract(&spec.out, rec.3, rec.4, &rec_img);
        assert!(!debugfs(&rec_img, "ls /cOS").contains("recovery.squashfs"));
        // Rebuilding over the same output and work dir works.
        build(&spec).unwrap();
    }
}
