//! The "GPT reader": kairos-init never parses the partition table itself; the kernel does,
//! and the GPT partition name reaches the init as PARTNAME= in the device's sysfs uevent
//! file. This fuzzes that parser (init/src/blockdev.rs parse_uevent) and the name order.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let u = kairos_init::blockdev::parse_uevent(&text);
    if let Some(d) = &u.devname {
        // DEVNAME must never point outside /dev.
        assert!(
            Path::new(d)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        );
    }
    if let Some(p) = &u.partname {
        assert!(!p.is_empty());
    }
    // natural_cmp is a total order consistent with equality on what the uevent names.
    let mut names: Vec<&str> = text.split_whitespace().take(32).collect();
    names.sort_by(|a, b| kairos_init::blockdev::natural_cmp(a, b));
    for w in names.windows(2) {
        assert_ne!(
            kairos_init::blockdev::natural_cmp(w[0], w[1]),
            std::cmp::Ordering::Greater
        );
    }
});
