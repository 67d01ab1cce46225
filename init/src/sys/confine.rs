//! Starting a child in its own mount namespace and/or chrooted, the one place where code runs
//! between fork and exec. kairos-init's stages, the agent's chrooted yip steps and bundles'
//! `run.sh` all go through here, so the async-signal-safety argument is made once.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::mount::{MountPropagationFlags, mount_bind_recursive, mount_change};
use rustix::process::{chdir, chroot};
use rustix::thread::{UnshareFlags, unshare_unsafe};

/// A path handed to the child holds a NUL byte, so no system call can take it.
#[derive(Debug, thiserror::Error)]
#[error("{}: the path contains a NUL byte", .0.display())]
pub struct NulInPath(pub PathBuf);

fn cstring(p: &Path) -> Result<CString, NulInPath> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| NulInPath(p.to_path_buf()))
}

/// Makes `cmd` start, before its exec, in a private mount namespace with each `(source,
/// target)` of `binds` bind-mounted recursively (nothing propagates back to ours), then
/// chrooted into `root` with `/` as its working directory. No binds: no new namespace; no
/// root: no chroot.
pub fn confine(
    cmd: &mut Command,
    binds: &[(PathBuf, PathBuf)],
    root: Option<&Path>,
) -> Result<(), NulInPath> {
    // Everything the child needs is allocated here, before the fork: after it, only syscalls.
    let binds: Vec<(CString, CString)> = binds
        .iter()
        .map(|(s, d)| Ok((cstring(s)?, cstring(d)?)))
        .collect::<Result<_, NulInPath>>()?;
    let root = root.map(cstring).transpose()?;
    // SAFETY: the closure runs in the forked child before exec and only makes raw system calls
    // (rustix, no libc state) on C strings allocated before the fork: nothing allocates or
    // takes a lock, so it is async-signal-safe. unshare(CLONE_NEWNS) in that single-threaded
    // child only gives it its own mount namespace.
    unsafe {
        cmd.pre_exec(move || {
            if !binds.is_empty() {
                unshare_unsafe(UnshareFlags::NEWNS)?;
                mount_change(
                    c"/",
                    MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
                )?;
                for (src, dst) in &binds {
                    mount_bind_recursive(src.as_c_str(), dst.as_c_str())?;
                }
            }
            if let Some(root) = &root {
                chroot(root.as_c_str())?;
                chdir(c"/")?;
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_in_a_path_is_named_before_any_fork() {
        use std::ffi::OsStr;
        let bad = PathBuf::from(OsStr::from_bytes(b"/tmp/a\0b"));
        let mut cmd = Command::new("/bin/true");
        let e = confine(&mut cmd, &[(bad.clone(), PathBuf::from("/x"))], None)
            .expect_err("a NUL in a bind source");
        assert_eq!(e.0, bad);
        let e = confine(&mut cmd, &[], Some(&bad)).expect_err("a NUL in the root");
        assert!(e.to_string().contains("NUL byte"), "{e}");
    }

    #[test]
    fn nothing_asked_runs_the_command_as_it_is() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "exit 7"]);
        confine(&mut cmd, &[], None).expect("no paths to convert");
        let st = cmd.status().expect("running /bin/sh");
        assert_eq!(st.code(), Some(7));
    }
}
