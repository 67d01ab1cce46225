//! Kernel command line -> BootRequest (init/src/cmdline.rs). Bytes are read as lossy UTF-8,
//! as the init reads /proc/cmdline; inputs may be longer than the kernel's limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (req, warnings) = kairos_init::cmdline::parse(&text);
    // Formatting must not panic either (it ends up in the log).
    let _ = format!("{req:?}");
    for w in &warnings {
        let _ = format!("{w:?}");
    }
    // The same line twice must parse the same way: the parser is pure.
    let (again, _) = kairos_init::cmdline::parse(&text);
    assert_eq!(format!("{req:?}"), format!("{again:?}"));
    for word in text.split_whitespace().take(64) {
        let _ = kairos_init::cmdline::parse_overlay(word);
        let _ = kairos_init::cmdline::split_volume(word);
    }
});
