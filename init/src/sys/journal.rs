//! Making ext4 metadata final for GRUB. GRUB reads COS_OEM and COS_STATE without replaying
//! their journal, so after an fsync a renamed grubenv or image may exist only in the journal
//! until jbd2 checkpoints it (which it does only when the journal fills, or at unmount):
//! GRUB would boot the old state. [`checkpoint`] writes the journal back to its home
//! locations now: `EXT4_IOC_CHECKPOINT` (Linux ≥ 5.13), or a freeze and thaw (freezing ext4
//! flushes and empties its journal) on kernels without that ioctl.

use std::fs::File;
use std::path::Path;

use kairos_util::IoError;

use super::blk;

/// `EXT4_SUPER_MAGIC` (ext2, ext3 and ext4 mounted by the ext4 driver).
const EXT4_SUPER_MAGIC: i64 = 0xef53;

/// How [`checkpoint`] made the metadata final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointed {
    /// `EXT4_IOC_CHECKPOINT`.
    Ioctl,
    /// `FIFREEZE` + `FITHAW` (the kernel does not know the ioctl).
    Freeze,
    /// ext4 without a journal: every write is already in place.
    NoJournal,
    /// Not ext2/3/4 (a test's tmpfs, vfat): nothing this function knows to do.
    NotExt4,
}

/// Writes the journal of the filesystem holding `path` (a file or directory on it) back to
/// its home locations, so a reader that ignores the journal (GRUB) sees every write made
/// before the call. Needs CAP_SYS_ADMIN.
pub fn checkpoint(path: &Path) -> Result<Checkpointed, IoError> {
    let fail = |what: &str| {
        kairos_util::io::io::<std::io::Error>(
            path,
            format!("checkpointing the ext4 journal so GRUB sees the writes ({what})"),
        )
    };
    let file = File::open(path).map_err(fail("open"))?;
    let fs = rustix::fs::fstatfs(&file)
        .map_err(std::io::Error::from)
        .map_err(fail("statfs"))?;
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures
    if fs.f_type as i64 != EXT4_SUPER_MAGIC {
        return Ok(Checkpointed::NotExt4);
    }
    match blk::ext4_checkpoint(&file) {
        Ok(()) => return Ok(Checkpointed::Ioctl),
        // No journal: nothing to write back.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(Checkpointed::NoJournal),
        // Older kernels do not know the command.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {}
        Err(e) => return Err(fail("EXT4_IOC_CHECKPOINT")(e)),
    }
    blk::freeze(&file).map_err(fail("FIFREEZE"))?;
    // A frozen filesystem blocks every writer: thaw even if the first attempt is interrupted.
    let mut thawed = blk::thaw(&file);
    for _ in 0..3 {
        if thawed.is_ok() {
            break;
        }
        thawed = blk::thaw(&file);
    }
    thawed.map_err(fail("FITHAW"))?;
    Ok(Checkpointed::Freeze)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn errors_name_the_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let e = checkpoint(&d.path().join("missing")).expect_err("missing path");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    fn tool(cmd: &mut std::process::Command) {
        let out = cmd.output().expect("running a tool");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    /// A real journaled ext4 on a loop device: a file created and fsynced is in the journal
    /// only (debugfs, which like GRUB ignores the journal, does not see it) until
    /// [`checkpoint`], and in place after it.
    #[test]
    fn a_checkpoint_puts_fsynced_metadata_where_a_journal_ignoring_reader_finds_it() {
        assert!(
            rustix::process::geteuid().is_root(),
            "needs root: mounts an ext4 image on a loop device"
        );
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("fs.img");
        let mnt = d.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        tool(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img)
                .arg("16M"),
        );
        tool(
            std::process::Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt),
        );
        struct Umount(PathBuf);
        impl Drop for Umount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _guard = Umount(mnt.clone());
        let in_place = |name: &str| {
            // The loop device writes through the image file's page cache, which debugfs reads.
            let out = std::process::Command::new("debugfs")
                .arg("-R")
                .arg(format!("stat /{name}"))
                .arg(&img)
                .output()
                .expect("debugfs");
            !String::from_utf8_lossy(&out.stderr).contains("File not found")
                && String::from_utf8_lossy(&out.stdout).contains("Inode:")
        };
        let write = |name: &str| {
            let f = mnt.join(name);
            std::fs::write(&f, b"x").expect("write");
            File::open(&f).and_then(|f| f.sync_all()).expect("fsync");
            File::open(&mnt)
                .and_then(|f| f.sync_all())
                .expect("fsync dir");
        };
        write("before");
        assert!(
            !in_place("before"),
            "fsynced metadata is already in place without a checkpoint: this test proves nothing here"
        );
        assert_eq!(checkpoint(&mnt).expect("checkpoint"), Checkpointed::Ioctl);
        assert!(
            in_place("before"),
            "the checkpoint did not write the metadata in place"
        );
        write("after");
        assert!(!in_place("after"));
        assert_eq!(
            checkpoint(&mnt.join("after")).expect("checkpoint"),
            Checkpointed::Ioctl
        );
        assert!(in_place("after"));
    }
}
