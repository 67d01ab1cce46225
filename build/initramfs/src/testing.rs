//! Fake module trees for unit tests here and in `kairos-build` (not part of the API).

use std::fs;
use std::io;
use std::path::Path;

/// A minimal ELF64 relocatable object whose `.modinfo` says `name=` and `depends=`, as
/// `kairos_init::modules::read_modinfo` reads a real `.ko`.
pub fn fake_module(name: &str, depends: &[&str], aliases: &[&str]) -> Vec<u8> {
    let mut modinfo = format!("name={name}\0depends={}\0", depends.join(","));
    for a in aliases {
        modinfo.push_str(&format!("alias={a}\0"));
    }
    let modinfo = modinfo.as_bytes();
    let shstrtab = b"\0.shstrtab\0.modinfo\0";
    let mut out = vec![0u8; 64];
    out[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
    out[6] = 1; // EV_CURRENT
    out[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
    out[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    let str_off = out.len() as u64;
    out.extend_from_slice(shstrtab);
    let info_off = out.len() as u64;
    out.extend_from_slice(modinfo);
    out.resize(out.len().next_multiple_of(8), 0);
    let shoff = out.len() as u64;
    let sh = |name: u32, kind: u32, off: u64, size: u64| {
        let mut h = vec![0u8; 64];
        h[0..4].copy_from_slice(&name.to_le_bytes());
        h[4..8].copy_from_slice(&kind.to_le_bytes());
        h[24..32].copy_from_slice(&off.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        h
    };
    out.extend(sh(0, 0, 0, 0));
    out.extend(sh(1, 3, str_off, shstrtab.len() as u64));
    out.extend(sh(11, 1, info_off, modinfo.len() as u64));
    out[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
    out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    out[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
    out[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
    out[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
    out
}

/// Writes `modules` as (path under `dir`, name, depends) `.ko` files and `builtin` as
/// `dir/modules.builtin` lines.
pub fn fake_tree(
    dir: &Path,
    modules: &[(&str, &str, &[&str])],
    builtin: &[&str],
) -> io::Result<()> {
    for (rel, name, deps) in modules {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(path, fake_module(name, deps, &[]))?;
    }
    fs::create_dir_all(dir)?;
    let lines: String = builtin.iter().map(|l| format!("{l}\n")).collect();
    fs::write(dir.join("modules.builtin"), lines)
}
