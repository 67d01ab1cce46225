//! grubenv blocks (init/src/grubenv.rs): parse; what parses must survive to_block -> parse
//! unchanged, and the boot-counter logic must not panic on any parsed env.
#![no_main]

use std::path::Path;

use kairos_init::grubenv::{self, Counters, GrubEnv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("/oem/grubenv");
    let Ok(env) = GrubEnv::parse(data, path) else {
        return;
    };
    let vars: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Ok(block) = env.to_block(path) {
        let back = GrubEnv::parse(&block, path).expect("to_block output must parse");
        let back_vars: Vec<(String, String)> = back
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(vars, back_vars);
        assert_eq!(back.to_block(path).ok(), Some(block));
    }
    let _ = grubenv::grub_choice(&env);
    let _ = Counters::from_env(&env);
    let mut e = env.clone();
    let choice = grubenv::grub_boot(&mut e);
    let _ = grubenv::mark_good(&mut e, &choice.entry);
    let mut e = env.clone();
    let _ = grubenv::arm(&mut e, 3);
    let _ = grubenv::grub_boot(&mut e);
    let _ = e.to_block(path);
    let mut e = env.clone();
    let _ = grubenv::mark_good(&mut e, "cos");
    grubenv::disarm(&mut e);
    let _ = e.to_block(path);
});
