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
    kairos_init::modules::testing::elf_with_modinfo(modinfo.as_bytes())
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
