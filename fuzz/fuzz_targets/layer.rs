//! OCI layer apply (agent/src/upgrade/layer.rs) on untrusted bytes (tar, tar.gz, tar.zst),
//! each input into a fresh directory.
//!
//! SAFETY NET: apply() writes and deletes files as root. An escape (a whiteout or opaque
//! directory reached through a symlink the same layer created, say) would delete real files
//! of this machine. So before the first input this process enters a private mount namespace
//! in which every mount is read-only, except a scratch tmpfs (the roots and a canary) and
//! the corpus and artifact directories libFuzzer writes. If that cannot be set up, the
//! target refuses to run. Any attempt to touch the read-only world (EROFS), or the canary,
//! is an escape and panics: that is a finding. With KAIROS_FUZZ_LAYER_ALLOW_ESCAPES=1 set,
//! escapes (already blocked by the sandbox) are only counted, so a long run can look for
//! other bugs while a known escape is unfixed.
#![no_main]

use std::ffi::CString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use kairos_agent::upgrade::layer::{self, LayerError};
use libfuzzer_sys::fuzz_target;

fn check(rc: libc::c_int, what: &str) {
    if rc != 0 {
        eprintln!(
            "layer fuzz target: cannot set up its read-only sandbox ({what}: {}); refusing to run",
            std::io::Error::last_os_error()
        );
        std::process::exit(2);
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in path")
}

/// Bind `dir` onto itself so it stays a separate (writable) mount.
fn keep_writable(dir: &Path) {
    let p = c(dir);
    let rc = unsafe {
        libc::mount(p.as_ptr(), p.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
    };
    check(rc, &format!("bind {}", dir.display()));
}

fn sandbox() -> PathBuf {
    // The directories libFuzzer writes: corpus dirs (positional) and the artifact prefix.
    let mut writable: Vec<PathBuf> = Vec::new();
    for a in std::env::args().skip(1) {
        if let Some(prefix) = a.strip_prefix("-artifact_prefix=") {
            let p = PathBuf::from(prefix);
            let dir = if prefix.ends_with('/') { p } else { p.parent().map(Path::to_path_buf).unwrap_or_default() };
            writable.push(dir);
        } else if !a.starts_with('-') && Path::new(&a).is_dir() {
            writable.push(PathBuf::from(a));
        }
    }
    let writable: Vec<PathBuf> = writable
        .into_iter()
        .filter_map(|d| std::fs::canonicalize(if d.as_os_str().is_empty() { Path::new(".") } else { &d }).ok())
        .collect();
    let jail = std::env::temp_dir().join(format!("kairos-fuzz-layer-{}", std::process::id()));
    std::fs::create_dir_all(&jail).expect("create the scratch directory");

    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }, "unshare(CLONE_NEWNS)");
    let root = c(Path::new("/"));
    check(
        unsafe {
            libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null())
        },
        "make / private",
    );
    let j = c(&jail);
    let tmpfs = c(Path::new("tmpfs"));
    check(
        unsafe { libc::mount(tmpfs.as_ptr(), j.as_ptr(), tmpfs.as_ptr(), 0, std::ptr::null()) },
        "tmpfs on the scratch directory",
    );
    for d in &writable {
        keep_writable(d);
    }
    let mut keep: Vec<PathBuf> = writable.clone();
    keep.push(jail.clone());
    // Every other mount read-only (per-mount flag, this namespace only).
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut root_done = false;
    for line in info.lines() {
        let Some(mp) = line.split(' ').nth(4) else { continue };
        if mp.contains('\\') || keep.iter().any(|k| Path::new(mp) == k) {
            continue;
        }
        let opts = line.split(' ').nth(5).unwrap_or("");
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        for (o, f) in [
            ("nosuid", libc::MS_NOSUID),
            ("nodev", libc::MS_NODEV),
            ("noexec", libc::MS_NOEXEC),
            ("noatime", libc::MS_NOATIME),
            ("nodiratime", libc::MS_NODIRATIME),
            ("relatime", libc::MS_RELATIME),
        ] {
            if opts.split(',').any(|x| x == o) {
                flags |= f;
            }
        }
        let p = c(Path::new(mp));
        let rc = unsafe { libc::mount(std::ptr::null(), p.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
        if mp == "/" {
            check(rc, "remount / read-only");
            root_done = true;
        }
    }
    if !root_done {
        eprintln!("layer fuzz target: / not found in mountinfo; refusing to run");
        std::process::exit(2);
    }
    // Proof the world is read-only now.
    let probe = std::env::temp_dir().join("..").join(format!("kairos-fuzz-probe-{}", std::process::id()));
    match std::fs::write(&probe, b"x") {
        Err(e) if e.kind() == ErrorKind::ReadOnlyFilesystem => {}
        other => {
            let _ = std::fs::remove_file(&probe);
            eprintln!("layer fuzz target: write outside the sandbox was not refused ({other:?}); refusing to run");
            std::process::exit(2);
        }
    }
    canaries(&jail);
    jail
}

fn canaries(jail: &Path) {
    std::fs::write(jail.join("canary"), b"canary").expect("canary");
    std::fs::create_dir_all(jail.join("canary.d")).expect("canary dir");
    std::fs::write(jail.join("canary.d/f"), b"canary").expect("canary file");
}

/// An escape the sandbox stopped: a finding, unless escapes are allowed for this run.
fn escape(what: String) {
    static ALLOW: OnceLock<bool> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    if !*ALLOW.get_or_init(|| std::env::var_os("KAIROS_FUZZ_LAYER_ALLOW_ESCAPES").is_some()) {
        panic!("{what}");
    }
    if SEEN.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!("layer fuzz target: escape (allowed for this run, counted once): {what}");
    }
}

fn escaped(e: &LayerError) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == ErrorKind::ReadOnlyFilesystem
        {
            return true;
        }
        // Only the structured error kind counts: messages quote the input, and the fuzzer
        // learned to write "Read-only file system" into a tar header (a false escape).
        src = s.source();
    }
    false
}

fuzz_target!(|data: &[u8]| {
    static JAIL: OnceLock<PathBuf> = OnceLock::new();
    let jail = JAIL.get_or_init(sandbox);
    let dir = tempfile::tempdir_in(jail).expect("tempdir in the scratch tmpfs");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root dir");
    let result = layer::apply(&root, "sha256:fuzz", data);
    if let Err(e) = &result {
        let _ = e.to_string();
        if escaped(e) {
            escape(format!("layer apply reached outside its root: {e}"));
        }
    }
    if !(jail.join("canary").exists() && jail.join("canary.d/f").exists()) {
        canaries(jail);
        escape(format!("layer apply deleted a file outside its root: {result:?}"));
    }
    // Everything written must be readable back as a tree (no panics walking it).
    drop(dir);
});
