//! Every superblock probe (init/src/probe.rs): ext2/3/4, xfs, squashfs, vfat, iso9660, ...
//! on the first bytes of a device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(info) = kairos_init::probe::probe_bytes(data) {
        let _ = format!("{info:?}");
        let _ = (info.fstype.name(), info.fstype.mount_type(), info.fstype.module());
    }
});
