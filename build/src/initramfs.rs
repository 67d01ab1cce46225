//! `kairos-build initramfs`: a generic initramfs for the kernel installed in a root tree.
//!
//! The kernel is found the way distributions install it: `/lib/modules/<ver>` with
//! `/boot/vmlinuz-<ver>` (Debian, Ubuntu, Alpine's `vmlinuz-<flavour>`), or
//! `/usr/lib/modules/<ver>/vmlinuz` (Fedora, Arch, openSUSE). Paths inside the tree are
//! resolved as if the tree were `/`: an absolute symlink in it points into the tree, never at
//! the build host's own files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use kairos_initramfs::{BuildReport, InitramfsError, InitramfsSpec};
use kairos_util::{IoError, IoResultExt};

use crate::cli::InitramfsArgs;

/// A kernel found in a root tree: its release, image and modules directory (host paths).
pub type KernelInTree = kairos_initramfs::Kernel;

/// Where modules trees live, newest convention last (a merged-/usr tree has both, the same).
const MODULE_ROOTS: [&str; 2] = ["lib/modules", "usr/lib/modules"];
/// Symlink hops followed while resolving a path inside the tree (as the kernel's 40).
const MAX_LINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "no kernel in {root}: looked for lib/modules/VER and usr/lib/modules/VER with boot/vmlinuz-VER or usr/lib/modules/VER/vmlinuz{}",
        without_image(.modules_only)
    )]
    NoKernel {
        root: PathBuf,
        /// Modules directories that have no kernel image next to them.
        modules_only: Vec<String>,
    },
    #[error("{root} has several kernels ({}): choose one with --kver", .versions.join(", "))]
    Several {
        root: PathBuf,
        versions: Vec<String>,
    },
    #[error(
        "kernel {kver} is not in {root} (found: {}; a kernel needs its modules directory and a vmlinuz)",
        found_list(.found)
    )]
    NoSuchVersion {
        root: PathBuf,
        kver: String,
        found: Vec<String>,
    },
    #[error("{path}: more than {MAX_LINKS} symbolic links in the tree (a loop?)")]
    SymlinkLoop { path: PathBuf },
}

fn without_image(modules_only: &[String]) -> String {
    if modules_only.is_empty() {
        String::new()
    } else {
        format!(
            "; modules without a kernel image: {}",
            modules_only.join(", ")
        )
    }
}

fn found_list(found: &[String]) -> String {
    if found.is_empty() {
        "none".into()
    } else {
        found.join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Init(#[from] crate::ProgramError),
    #[error("building the initramfs {out} for kernel {kver}: {err}")]
    Initramfs {
        out: PathBuf,
        kver: String,
        err: Box<InitramfsError>,
    },
}

/// What `build_for_root` made.
#[derive(Debug, Clone)]
pub struct RootInitramfs {
    pub kernel: KernelInTree,
    /// The kairos-init used as /init.
    pub init: PathBuf,
    pub report: BuildReport,
}

/// The kernel installed in `root`: the one named `kver`, else the only one there. A modules
/// directory without a kernel image beside it (a removed kernel's leftovers) does not count.
pub fn find_kernel(root: &Path, kver: Option<&str>) -> Result<KernelInTree, KernelError> {
    let mut kernels: BTreeMap<String, KernelInTree> = BTreeMap::new();
    let mut modules_only = Vec::new();
    let mut seen = BTreeSet::new();
    for base in MODULE_ROOTS {
        let Some(dir) = resolve_in(root, base)? else {
            continue;
        };
        // A merged-/usr tree (lib -> usr/lib) has one directory under both names.
        if !dir.is_dir() || !seen.insert(dir.clone()) {
            continue;
        }
        let entries = fs::read_dir(&dir).at(&dir, "listing")?;
        let mut versions: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        versions.sort();
        for version in versions {
            if kernels.contains_key(&version) {
                continue;
            }
            let rel = format!("{base}/{version}");
            let Some(modules_dir) = resolve_in(root, &rel)?.filter(|d| d.is_dir()) else {
                continue;
            };
            match vmlinuz_for(root, &rel, &version)? {
                Some(vmlinuz) => {
                    kernels.insert(
                        version.clone(),
                        KernelInTree {
                            version,
                            vmlinuz,
                            modules_dir,
                        },
                    );
                }
                None => modules_only.push(rel),
            }
        }
    }
    // A version under both roots with its image beside only one copy is still a kernel.
    modules_only.retain(|rel| {
        let v = rel.rsplit('/').next().unwrap_or_default();
        !kernels.contains_key(v)
    });
    match kver {
        Some(v) => kernels.remove(v).ok_or_else(|| KernelError::NoSuchVersion {
            root: root.to_path_buf(),
            kver: v.to_string(),
            found: kernels.keys().cloned().collect(),
        }),
        None if kernels.len() > 1 => Err(KernelError::Several {
            root: root.to_path_buf(),
            versions: kernels.into_keys().collect(),
        }),
        None => kernels
            .into_values()
            .next()
            .ok_or_else(|| KernelError::NoKernel {
                root: root.to_path_buf(),
                modules_only,
            }),
    }
}

/// The kernel image of modules directory `modules_rel` (relative to `root`): Debian's
/// `boot/vmlinuz-<ver>`, the newer `<modules dir>/vmlinuz`, then Alpine's
/// `boot/vmlinuz-<flavour>` for a release ending in `-<flavour>` (6.6.31-0-lts: vmlinuz-lts).
fn vmlinuz_for(
    root: &Path,
    modules_rel: &str,
    version: &str,
) -> Result<Option<PathBuf>, KernelError> {
    let mut candidates = vec![
        format!("boot/vmlinuz-{version}"),
        format!("{modules_rel}/vmlinuz"),
    ];
    if let Some((_, flavour)) = version.rsplit_once('-') {
        candidates.push(format!("boot/vmlinuz-{flavour}"));
    }
    for rel in candidates {
        if let Some(p) = resolve_in(root, &rel)?
            && p.is_file()
        {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// `rel` inside `root` as a host path, following symlinks as if `root` were `/` (absolute
/// targets and `..` stay inside the tree). None when a component does not exist.
pub fn resolve_in(root: &Path, rel: &str) -> Result<Option<PathBuf>, KernelError> {
    let mut todo: Vec<PathBuf> = vec![PathBuf::from(rel)];
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    // `todo` holds what is left to walk, innermost link target last.
    while let Some(next) = todo.pop() {
        let mut comps = next.components();
        let Some(c) = comps.next() else {
            continue;
        };
        let rest = comps.as_path().to_path_buf();
        if !rest.as_os_str().is_empty() {
            todo.push(rest);
        }
        match c {
            Component::RootDir | Component::Prefix(_) => done.clear(),
            Component::CurDir => {}
            Component::ParentDir => {
                done.pop();
            }
            Component::Normal(name) => {
                let host = done
                    .iter()
                    .fold(root.to_path_buf(), |p, d| p.join(d))
                    .join(name);
                match fs::symlink_metadata(&host) {
                    Ok(m) if m.file_type().is_symlink() => {
                        hops += 1;
                        if hops > MAX_LINKS {
                            return Err(KernelError::SymlinkLoop { path: host });
                        }
                        let target = fs::read_link(&host).at(&host, "reading the symlink")?;
                        todo.push(target);
                    }
                    Ok(_) => done.push(name.to_os_string()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    // A file where the path wants a directory.
                    Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(None),
                    Err(e) => return Err(IoError::new(host, "reading the metadata of", e).into()),
                }
            }
        }
    }
    Ok(Some(done.iter().fold(root.to_path_buf(), |p, d| p.join(d))))
}

/// kairos-init: `explicit` when given, else next to the running program, else in PATH.
pub fn find_init(explicit: Option<&Path>) -> Result<PathBuf, BuildError> {
    Ok(crate::find_program("kairos-init", "--init", explicit)?)
}

/// Writes a generic initramfs for the kernel in `root` to `out`: kairos-init (`init`, see
/// [`find_init`]) as /init, [`kairos_initramfs::generic_modules`] plus `extra_modules`. Modules
/// the kernel lacks are in the report's `missing`, not an error.
pub fn build_for_root(
    root: &Path,
    kver: Option<&str>,
    init: Option<&Path>,
    extra_modules: &[String],
    out: &Path,
) -> Result<RootInitramfs, BuildError> {
    let kernel = find_kernel(root, kver)?;
    let init = find_init(init)?;
    let mut modules = kairos_initramfs::generic_modules();
    for m in extra_modules {
        if !modules.contains(m) {
            modules.push(m.clone());
        }
    }
    let spec = InitramfsSpec {
        init_binary: init.clone(),
        kernel: kernel.clone(),
        modules,
        extra_files: Vec::new(),
    };
    let report = kairos_initramfs::build(&spec, out).map_err(|source| BuildError::Initramfs {
        out: out.to_path_buf(),
        kver: kernel.version.clone(),
        err: Box::new(source),
    })?;
    Ok(RootInitramfs {
        kernel,
        init,
        report,
    })
}

/// The `initramfs` subcommand: builds, then prints what went in and what is missing.
pub fn run(args: &InitramfsArgs) -> anyhow::Result<()> {
    let r = build_for_root(
        &args.root,
        args.kver.as_deref(),
        args.init.as_deref(),
        &args.modules,
        &args.out,
    )
    .with_context(|| format!("initramfs for the kernel in {}", args.root.display()))?;
    println!(
        "{}: {} bytes (cpio {} bytes) for kernel {} ({}), /init from {}",
        args.out.display(),
        r.report.size_bytes,
        r.report.cpio_bytes,
        r.kernel.version,
        r.kernel.vmlinuz.display(),
        r.init.display()
    );
    println!(
        "{} modules: {}",
        r.report.modules.len(),
        r.report.modules.join(" ")
    );
    if !r.report.builtin.is_empty() {
        println!("built into the kernel: {}", r.report.builtin.join(", "));
    }
    if !r.report.missing.is_empty() {
        println!(
            "missing (not in this kernel's tree): {}",
            r.report.missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_initramfs::testing::fake_tree;

    fn touch(root: &Path, rel: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, b"kernel").expect("write");
    }

    /// A Debian-style kernel: /lib/modules/VER with modules and /boot/vmlinuz-VER.
    fn debian_kernel(root: &Path, ver: &str) {
        touch(root, &format!("boot/vmlinuz-{ver}"));
        fake_tree(
            &root.join(format!("lib/modules/{ver}")),
            &[
                ("kernel/fs/ext4/ext4.ko", "ext4", &["jbd2"]),
                ("kernel/fs/jbd2/jbd2.ko", "jbd2", &[]),
                (
                    "kernel/drivers/usb/storage/usb-storage.ko",
                    "usb_storage",
                    &[],
                ),
                ("kernel/drivers/mmc/core/mmc_block.ko", "mmc_block", &[]),
            ],
            &["kernel/drivers/block/loop.ko"],
        )
        .expect("modules");
    }

    #[test]
    fn no_kernel_names_what_was_looked_for() {
        let t = tempfile::tempdir().expect("tempdir");
        let e = find_kernel(t.path(), None).expect_err("empty tree");
        let msg = e.to_string();
        assert!(matches!(e, KernelError::NoKernel { .. }), "{msg}");
        assert!(
            msg.contains("lib/modules/VER") && msg.contains("boot/vmlinuz-VER"),
            "{msg}"
        );
        // Leftover modules of a removed kernel are named, and are not a kernel.
        fs::create_dir_all(t.path().join("lib/modules/5.10.0-old")).expect("mkdir");
        let msg = find_kernel(t.path(), None)
            .expect_err("no image")
            .to_string();
        assert!(msg.contains("lib/modules/5.10.0-old"), "{msg}");
    }

    #[test]
    fn one_kernel_is_found_and_two_need_kver() {
        let t = tempfile::tempdir().expect("tempdir");
        debian_kernel(t.path(), "6.1.0-57-amd64");
        let k = find_kernel(t.path(), None).expect("one kernel");
        assert_eq!(k.version, "6.1.0-57-amd64");
        assert_eq!(k.vmlinuz, t.path().join("boot/vmlinuz-6.1.0-57-amd64"));
        assert_eq!(k.modules_dir, t.path().join("lib/modules/6.1.0-57-amd64"));

        debian_kernel(t.path(), "6.1.0-58-amd64");
        match find_kernel(t.path(), None) {
            Err(KernelError::Several { versions, .. }) => {
                assert_eq!(versions, ["6.1.0-57-amd64", "6.1.0-58-amd64"])
            }
            other => panic!("{other:?}"),
        }
        let k = find_kernel(t.path(), Some("6.1.0-58-amd64")).expect("--kver");
        assert_eq!(k.vmlinuz, t.path().join("boot/vmlinuz-6.1.0-58-amd64"));
        let e = find_kernel(t.path(), Some("6.2.0")).expect_err("absent --kver");
        let msg = e.to_string();
        assert!(
            msg.contains("6.2.0") && msg.contains("6.1.0-57-amd64, 6.1.0-58-amd64"),
            "{msg}"
        );
    }

    #[test]
    fn usr_lib_layout_with_vmlinuz_in_the_modules_dir() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        // Fedora: merged /usr, the kernel image inside the modules directory.
        fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).expect("symlink");
        touch(root, "usr/lib/modules/6.8.5-301.fc40.x86_64/vmlinuz");
        let k = find_kernel(root, None).expect("usr/lib kernel");
        assert_eq!(k.version, "6.8.5-301.fc40.x86_64");
        assert_eq!(
            k.vmlinuz,
            root.join("usr/lib/modules/6.8.5-301.fc40.x86_64/vmlinuz")
        );
        assert_eq!(
            k.modules_dir,
            root.join("usr/lib/modules/6.8.5-301.fc40.x86_64")
        );
    }

    #[test]
    fn alpine_flavour_image_and_absolute_links_stay_in_the_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        touch(root, "boot/vmlinuz-lts");
        fs::create_dir_all(root.join("lib/modules/6.6.31-0-lts")).expect("mkdir");
        let k = find_kernel(root, None).expect("alpine kernel");
        assert_eq!(k.vmlinuz, root.join("boot/vmlinuz-lts"));

        // An absolute link means the tree's /usr/lib, not the build host's.
        let t2 = tempfile::tempdir().expect("tempdir");
        let root = t2.path();
        fs::create_dir_all(root.join("usr/lib/modules/6.1.0-9")).expect("mkdir");
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).expect("symlink");
        touch(root, "boot/vmlinuz-6.1.0-9");
        let k = find_kernel(root, None).expect("kernel via absolute link");
        assert_eq!(k.modules_dir, root.join("usr/lib/modules/6.1.0-9"));
        assert_eq!(
            resolve_in(root, "lib/../../../etc").expect("resolve"),
            None,
            "`..` past the root stays at the root"
        );
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("symlink");
        assert!(matches!(
            resolve_in(root, "loop/x"),
            Err(KernelError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn build_for_root_lists_missing_modules() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        debian_kernel(&root, "6.1.0-57-amd64");
        let init = t.path().join("kairos-init");
        fs::write(&init, b"#!/bin/true\n").expect("init");
        let out = t.path().join("initrd");
        let r = build_for_root(
            &root,
            None,
            Some(&init),
            &["no_such_module".to_string()],
            &out,
        )
        .expect("build");
        assert_eq!(r.kernel.version, "6.1.0-57-amd64");
        assert_eq!(r.init, init);
        assert!(out.is_file());
        assert_eq!(
            r.report.modules,
            ["usb_storage", "mmc_block", "jbd2", "ext4"]
        );
        assert_eq!(r.report.builtin, ["loop"]);
        for m in ["ahci", "xhci_pci", "sdhci_pci", "isofs", "no_such_module"] {
            assert!(
                r.report.missing.iter().any(|x| x == m),
                "{m}: {:?}",
                r.report.missing
            );
        }
        assert!(!r.report.missing.iter().any(|x| x == "ext4" || x == "loop"));

        let e = build_for_root(&root, None, Some(&t.path().join("nope")), &[], &out)
            .expect_err("missing init");
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn dynamic_init_is_refused() {
        let sh = fs::canonicalize("/bin/sh").expect("needs /bin/sh, a dynamically linked program");
        let t = tempfile::tempdir().expect("tempdir");
        debian_kernel(t.path(), "6.1.0-57-amd64");
        let e = build_for_root(t.path(), None, Some(&sh), &[], &t.path().join("i"))
            .expect_err("dynamic init");
        let msg = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(msg.contains("dynamically linked"), "{msg}");
    }
}
