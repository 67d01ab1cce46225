//! Layout env files (init/src/layout.rs): parse_env, then Layout::apply over every default,
//! clean_path, sort_persistent and flatten on what came out.
#![no_main]

use std::path::{Path, PathBuf};

use kairos_init::layout::{self, Layout};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/run/cos/cos-layout.env");
    let Ok(vars) = layout::parse_env(&text, path) else {
        return;
    };
    let files = vec![(PathBuf::from(path), vars.clone())];
    for base in [
        Layout::kairos_default(),
        Layout::recovery_default(),
        Layout::immucore_default(),
    ] {
        let (l, _warnings) = Layout::apply(base, &files);
        let sorted = layout::sort_persistent(&l.persistent_state_paths);
        // Shallow first: depth never decreases along the sorted list.
        let depth = |p: &String| p.split('/').filter(|c| !c.is_empty()).count();
        assert!(sorted.windows(2).all(|w| depth(&w[0]) <= depth(&w[1])));
        for p in l
            .rw_paths
            .iter()
            .chain(&l.persistent_state_paths)
            .chain(&l.custom_bind_mounts)
            .chain(&l.custom_ephemeral_mounts)
        {
            // Everything apply kept is already clean, and cleaning is idempotent.
            assert_eq!(layout::clean_path(p).as_deref(), Ok(p.as_str()));
            let _ = layout::flatten(p);
        }
    }
    for (_, value) in &vars {
        for word in value.split_whitespace().take(64) {
            if let Ok(c) = layout::clean_path(word) {
                assert_eq!(layout::clean_path(&c).as_deref(), Ok(c.as_str()));
            }
        }
    }
});
