//! Kernel modules without depmod: dependencies and aliases come straight from each `.ko`'s
//! `.modinfo` ELF section, so the initramfs needs no modules.dep/modules.alias and no kmod.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

/// What a module's `.modinfo` says about loading it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModInfo {
    pub name: String,
    pub depends: Vec<String>,
    pub softdep_pre: Vec<String>,
    pub softdep_post: Vec<String>,
    pub aliases: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: not an ELF64 little-endian object")]
    NotElf { path: PathBuf },
    #[error("{path}: no .modinfo section")]
    NoModinfo { path: PathBuf },
    #[error("{path}: module {name} also provided by {first}, ignored")]
    Duplicate {
        name: String,
        path: PathBuf,
        first: PathBuf,
    },
    #[error("unknown module or alias {name}")]
    Unknown { name: String },
    #[error("module {module} depends on {dep}, which is neither available nor built in")]
    MissingDep { module: String, dep: String },
    #[error("module dependency cycle: {}", cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("module {name}: parameters contain a NUL byte")]
    BadParams { name: String },
    #[error("loading module {name} from {path}: {errno}")]
    Load {
        name: String,
        path: PathBuf,
        errno: io::Error,
    },
}

/// Module names treat '-' and '_' alike; the kernel itself reports '_'.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// kmod's alias normalisation: '-' becomes '_' except inside `[...]` classes, where '-' is a
/// range. Applied to patterns and queries alike so both sides compare the same way.
fn normalize_alias(alias: &str) -> String {
    let mut out = String::with_capacity(alias.len());
    let mut in_class = false;
    for c in alias.chars() {
        match c {
            '[' => in_class = true,
            ']' => in_class = false,
            '-' if !in_class => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// Why a `.modinfo` section could not be located.
enum ElfFail {
    Io(io::Error),
    NotElf,
    NoModinfo,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s: [u8; 2] = b.get(off..off.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(s))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

const EHDR_LEN: usize = 64;
const SHDR_LEN: usize = 64;
const SHT_NOBITS: u32 = 8;

/// Locates and returns the `.modinfo` bytes of an object `len` bytes long, reading only the
/// pieces it needs through `read(offset, count)`. Every range is checked against `len` first,
/// so garbage offsets never cause a huge allocation.
fn find_modinfo<R>(len: u64, mut read: R) -> Result<Vec<u8>, ElfFail>
where
    R: FnMut(u64, usize) -> io::Result<Vec<u8>>,
{
    let mut read_range = |off: u64, size: u64| -> Result<Vec<u8>, ElfFail> {
        let end = off.checked_add(size).ok_or(ElfFail::NotElf)?;
        if end > len {
            return Err(ElfFail::NotElf);
        }
        let size = usize::try_from(size).map_err(|_| ElfFail::NotElf)?;
        read(off, size).map_err(ElfFail::Io)
    };
    let ehdr = read_range(0, EHDR_LEN as u64)?;
    // ELFMAG, ELFCLASS64, ELFDATA2LSB
    if ehdr.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(ElfFail::NotElf);
    }
    let shoff = u64_at(&ehdr, 0x28).ok_or(ElfFail::NotElf)?;
    let shentsize = usize::from(u16_at(&ehdr, 0x3a).ok_or(ElfFail::NotElf)?);
    let shnum = usize::from(u16_at(&ehdr, 0x3c).ok_or(ElfFail::NotElf)?);
    let shstrndx = usize::from(u16_at(&ehdr, 0x3e).ok_or(ElfFail::NotElf)?);
    // shnum 0 means extended numbering, which modules never need.
    if shentsize < SHDR_LEN || shnum == 0 || shstrndx >= shnum {
        return Err(ElfFail::NotElf);
    }
    let table = read_range(shoff, (shentsize * shnum) as u64)?;
    // (name offset, type, file offset, size) of section i
    let section = |i: usize| -> Option<(u32, u32, u64, u64)> {
        let base = i.checked_mul(shentsize)?;
        Some((
            u32_at(&table, base)?,
            u32_at(&table, base + 4)?,
            u64_at(&table, base + 24)?,
            u64_at(&table, base + 32)?,
        ))
    };
    let (_, _, str_off, str_size) = section(shstrndx).ok_or(ElfFail::NotElf)?;
    let strtab = read_range(str_off, str_size)?;
    for i in 0..shnum {
        let (name, kind, off, size) = section(i).ok_or(ElfFail::NotElf)?;
        let name = usize::try_from(name).unwrap_or(usize::MAX);
        let Some(rest) = strtab.get(name..) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if rest.get(..end) == Some(&b".modinfo"[..]) && kind != SHT_NOBITS {
            return read_range(off, size);
        }
    }
    Err(ElfFail::NoModinfo)
}

/// Parses the NUL-separated `key=value` entries of a `.modinfo` section.
fn parse_modinfo_section(sec: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in sec.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = normalize(value.trim()),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalize),
            ),
            "softdep" => {
                // "pre: a b post: c"; tokens before any "pre:"/"post:" have no meaning.
                let mut target: Option<&mut Vec<String>> = None;
                for tok in value.split_whitespace() {
                    match tok {
                        "pre:" => target = Some(&mut info.softdep_pre),
                        "post:" => target = Some(&mut info.softdep_post),
                        _ => {
                            if let Some(list) = target.as_deref_mut() {
                                list.push(tok.to_string());
                            }
                        }
                    }
                }
            }
            "alias" => {
                let value = value.trim();
                if !value.is_empty() {
                    info.aliases.push(value.to_string());
                }
            }
            _ => {}
        }
    }
    info
}

/// Parses a whole module image held in memory. `name` is empty when the module has no
/// `name=` entry (read_modinfo then falls back to the file stem).
pub fn parse_modinfo(ko: &[u8]) -> Option<ModInfo> {
    let sec = find_modinfo(ko.len() as u64, |off, size| {
        let start = usize::try_from(off).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        ko.get(start..)
            .and_then(|s| s.get(..size))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    })
    .ok()?;
    Some(parse_modinfo_section(&sec))
}

/// The module name a file path implies: `kernel/fs/ext4/ext4.ko` → `ext4`.
fn stem_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalize(file.strip_suffix(".ko").unwrap_or(file))
}

/// Reads only the ELF header, section headers, shstrtab and `.modinfo` of a module file; whole
/// modules are never read because the build tool scans thousands of them.
pub fn read_modinfo(path: &Path) -> Result<ModInfo, ModError> {
    let file = File::open(path).at(path, "opening")?;
    let len = file.metadata().at(path, "stat")?.len();
    let sec = find_modinfo(len, |off, size| {
        let mut buf = vec![0; size];
        file.read_exact_at(&mut buf, off)?;
        Ok(buf)
    })
    .map_err(|e| match e {
        ElfFail::Io(e) => IoError::new(path, "reading", e).into(),
        ElfFail::NotElf => ModError::NotElf {
            path: path.to_path_buf(),
        },
        ElfFail::NoModinfo => ModError::NoModinfo {
            path: path.to_path_buf(),
        },
    })?;
    let mut info = parse_modinfo_section(&sec);
    if info.name.is_empty() {
        info.name = stem_name(&path.to_string_lossy());
    }
    Ok(info)
}

/// Every module of a tree, by normalized name, plus the names the kernel has built in.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    mods: BTreeMap<String, (PathBuf, ModInfo)>,
    /// (normalized alias pattern, module name), for lookup
    aliases: Vec<(String, String)>,
    builtin: BTreeSet<String>,
    skipped: Vec<ModError>,
    /// This machine's CPU modalias (`/sys/devices/system/cpu/modalias`), normalized: a module
    /// with `cpu:` aliases is only looked up when one of them matches it.
    cpu: Option<String>,
}

/// Directory depth limit for scans; module trees are about 8 deep.
const MAX_DEPTH: usize = 32;

impl ModuleIndex {
    /// Indexes every `*.ko` below `dir` (symlinked directories are not followed) and
    /// `dir/modules.builtin`. Only an unreadable `dir` is an error; unreadable or malformed
    /// modules are skipped and listed in [`ModuleIndex::skipped`].
    pub fn scan(dir: &Path) -> Result<ModuleIndex, ModError> {
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        let top = std::fs::read_dir(dir).at(dir, "listing")?;
        collect_ko(dir, top, 0, &mut files, &mut skipped);
        // Sorted so a name provided twice keeps the same winner on every run.
        files.sort();
        let mut mods = Vec::with_capacity(files.len());
        for path in files {
            match read_modinfo(&path) {
                Ok(info) => mods.push((path, info)),
                Err(e) => skipped.push(e),
            }
        }
        let builtin_path = dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(IoError::new(builtin_path, "reading", e).into()),
        };
        let mut index = ModuleIndex::from_parts(mods, builtin);
        skipped.append(&mut index.skipped);
        index.skipped = skipped;
        Ok(index)
    }

    /// Builds an index from already-parsed modules. `builtin` holds module names or
    /// modules.builtin lines (`kernel/fs/ext4/ext4.ko`). A name given twice keeps the first.
    pub fn from_parts(
        mods: Vec<(PathBuf, ModInfo)>,
        builtin: impl IntoIterator<Item = String>,
    ) -> ModuleIndex {
        let mut index = ModuleIndex {
            builtin: builtin
                .into_iter()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .map(|l| stem_name(&l))
                .collect(),
            ..ModuleIndex::default()
        };
        for (path, mut info) in mods {
            info.name = normalize(&info.name);
            let name = info.name.clone();
            if let Some((first, _)) = index.mods.get(&name) {
                index.skipped.push(ModError::Duplicate {
                    name,
                    path,
                    first: first.clone(),
                });
                continue;
            }
            for alias in &info.aliases {
                index.aliases.push((normalize_alias(alias), name.clone()));
            }
            index.mods.insert(name, (path, info));
        }
        index
    }

    /// Sets the CPU modalias [`ModuleIndex::lookup`] checks CPU-specific modules against
    /// (e.g. `cpu:type:x86,ven0000fam0006mod003D:feature:,0000,0001,…`).
    pub fn set_cpu(&mut self, modalias: &str) {
        let m = modalias.trim();
        self.cpu = (!m.is_empty()).then(|| normalize_alias(m));
    }

    /// Whether `module` can run on this CPU: modules such as crc32c_intel or aesni_intel carry
    /// `cpu:` aliases naming the features they need and refuse to load without them (after
    /// the kernel has read, checked and relocated them: ~70 ms under TCG for crc32c_intel).
    /// A module with no `cpu:` alias, or an unknown CPU, fits.
    fn fits_cpu(&self, module: &str) -> bool {
        let Some(cpu) = &self.cpu else {
            return true;
        };
        let mut cpu_aliases = self
            .aliases
            .iter()
            .filter(|(pat, m)| m == module && pat.starts_with("cpu:"))
            .peekable();
        cpu_aliases.peek().is_none() || cpu_aliases.any(|(pat, _)| glob_match(pat, cpu))
    }

    pub fn get(&self, name: &str) -> Option<(&Path, &ModInfo)> {
        self.mods
            .get(&normalize(name))
            .map(|(p, i)| (p.as_path(), i))
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Names of the loadable (non-built-in) modules, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.mods.keys().map(String::as_str)
    }

    /// Modules or malformed files the scan passed over, for the caller to log.
    pub fn skipped(&self) -> &[ModError] {
        &self.skipped
    }

    /// Modules whose alias globs match `modalias` (e.g. "pci:v00001AF4d00001001sv...",
    /// "virtio:d00000002v00001AF4"), or whose name equals it, or that provide it as an alias
    /// (e.g. "crypto-crc32c", "fs-ext4"). Sorted, deduplicated; built-ins are not listed.
    pub fn lookup(&self, name_or_alias: &str) -> Vec<String> {
        let mut found = BTreeSet::new();
        let name = normalize(name_or_alias);
        if self.mods.contains_key(&name) {
            found.insert(name.as_str());
        }
        let query = normalize_alias(name_or_alias);
        for (pattern, module) in &self.aliases {
            if glob_match(pattern, &query) && self.fits_cpu(module) {
                found.insert(module.as_str());
            }
        }
        found.into_iter().map(str::to_string).collect()
    }

    /// Load order for `wanted` (names or aliases): every module after all of its `depends`
    /// and `softdep pre`, its `softdep post` after it. Built-ins are dropped. Softdeps are
    /// optional: one that resolves to nothing is skipped, and so is one that would close a
    /// cycle. An unknown requested name, an unknown hard dependency or a cycle of hard
    /// dependencies is an error. The order is deterministic: `wanted` order, then the order
    /// dependencies are listed in.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<String>, ModError> {
        let mut walk = Walk {
            index: self,
            done: BTreeSet::new(),
            stack: Vec::new(),
            order: Vec::new(),
        };
        for want in wanted {
            if self.is_builtin(want) {
                continue;
            }
            let found = self.lookup(want);
            if found.is_empty() {
                return Err(ModError::Unknown {
                    name: (*want).to_string(),
                });
            }
            for module in found {
                walk.visit(&module, false).map_err(Unwind::into_error)?;
            }
        }
        Ok(walk.order)
    }

    /// Like [`ModuleIndex::resolve`], but each wanted name on its own, for generic lists
    /// written for many kernels: a name the tree lacks, or whose closure is broken, is
    /// returned with the reason instead of failing the rest; built-ins are dropped silently.
    /// Returns (load order, failures in `wanted` order).
    pub fn resolve_each(&self, wanted: &[&str]) -> (Vec<String>, Vec<(String, ModError)>) {
        let mut walk = Walk {
            index: self,
            done: BTreeSet::new(),
            stack: Vec::new(),
            order: Vec::new(),
        };
        let mut failed = Vec::new();
        for want in wanted {
            if self.is_builtin(want) {
                continue;
            }
            let found = self.lookup(want);
            if found.is_empty() {
                let name = (*want).to_string();
                failed.push((name.clone(), ModError::Unknown { name }));
                continue;
            }
            // Undo a failed name's partial walk: its resolved dependencies would be loaded
            // for nothing.
            let (done, len) = (walk.done.clone(), walk.order.len());
            for module in found {
                if let Err(e) = walk.visit(&module, false) {
                    walk.done = done;
                    walk.order.truncate(len);
                    failed.push(((*want).to_string(), e.into_error()));
                    break;
                }
            }
        }
        (walk.order, failed)
    }
}

impl ModuleIndex {
    /// What must be loaded before each module of `order` (a load order from
    /// [`ModuleIndex::resolve`], names unique): the positions in `order` of its `depends` and
    /// `softdep pre` modules and of the modules that name it as `softdep post`. Only earlier
    /// positions are kept, so the graph has no cycle (resolve dropped the soft edges that
    /// would close one the same way); modules outside `order` are loaded already.
    pub fn load_graph(&self, order: &[String]) -> Vec<Vec<usize>> {
        let pos: BTreeMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, m)| (m.as_str(), i))
            .collect();
        let mut deps: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); order.len()];
        for (i, m) in order.iter().enumerate() {
            let Some((_, info)) = self.mods.get(m) else {
                continue;
            };
            let pre = info
                .softdep_pre
                .iter()
                .flat_map(|p| self.lookup(p))
                .chain(info.depends.iter().cloned());
            for d in pre {
                if let Some(&j) = pos.get(d.as_str())
                    && j < i
                {
                    deps[i].insert(j);
                }
            }
            for p in info.softdep_post.iter().flat_map(|p| self.lookup(p)) {
                if let Some(&j) = pos.get(p.as_str())
                    && j > i
                {
                    deps[j].insert(i);
                }
            }
        }
        deps.into_iter().map(|d| d.into_iter().collect()).collect()
    }
}

/// The order in which the nodes of a dependency graph (`deps[i]`: the nodes that must finish
/// before node `i` starts, all lower than `i`; others are ignored) may start: any node whose
/// dependencies have finished, lowest first, while others run. Pure: the caller starts and
/// finishes the work.
#[derive(Debug)]
pub struct Schedule {
    ready: BTreeSet<usize>,
    /// Unfinished dependencies of each node.
    waiting: Vec<usize>,
    dependents: Vec<Vec<usize>>,
    running: usize,
}

impl Schedule {
    pub fn new(deps: &[Vec<usize>]) -> Schedule {
        let n = deps.len();
        let mut dependents = vec![Vec::new(); n];
        let mut waiting = vec![0usize; n];
        for (i, ds) in deps.iter().enumerate() {
            let ds: BTreeSet<usize> = ds.iter().copied().filter(|&d| d < i).collect();
            for d in ds {
                dependents[d].push(i);
                waiting[i] += 1;
            }
        }
        Schedule {
            ready: (0..n).filter(|&i| waiting[i] == 0).collect(),
            waiting,
            dependents,
            running: 0,
        }
    }

    /// A node that may start now (it counts as running until [`Schedule::done`]).
    pub fn start(&mut self) -> Option<usize> {
        let i = self.ready.pop_first()?;
        self.running += 1;
        Some(i)
    }

    /// Node `i` (returned by `start`) finished: the nodes waiting only for it may start.
    pub fn done(&mut self, i: usize) {
        self.running = self.running.saturating_sub(1);
        for &j in self.dependents.get(i).map_or(&[][..], Vec::as_slice) {
            self.waiting[j] -= 1;
            if self.waiting[j] == 0 {
                self.ready.insert(j);
            }
        }
    }

    pub fn running(&self) -> usize {
        self.running
    }
}

fn collect_ko(
    dir: &Path,
    entries: std::fs::ReadDir,
    depth: usize,
    files: &mut Vec<PathBuf>,
    skipped: &mut Vec<ModError>,
) {
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                skipped.push(IoError::new(dir, "listing", e).into());
                continue;
            }
        };
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if depth + 1 >= MAX_DEPTH {
                continue;
            }
            match std::fs::read_dir(&path) {
                Ok(sub) => collect_ko(&path, sub, depth + 1, files, skipped),
                Err(e) => skipped.push(IoError::new(path, "listing", e).into()),
            }
        } else if path.extension().is_some_and(|e| e == "ko") {
            // Symlinked files are fine (read_modinfo follows them); symlinked dirs are
            // not walked, so build/source links out of the tree are ignored.
            files.push(path);
        }
    }
}

/// How a dependency walk stops early.
enum Unwind {
    Error(ModError),
    /// A cycle ran through the softdep edge taken at this stack depth: that edge is dropped.
    DropSoft(usize),
}

impl Unwind {
    fn into_error(self) -> ModError {
        match self {
            Unwind::Error(e) => e,
            // Never escapes: the frame at that depth catches it.
            Unwind::DropSoft(_) => ModError::Cycle { cycle: Vec::new() },
        }
    }
}

struct Walk<'a> {
    index: &'a ModuleIndex,
    done: BTreeSet<String>,
    /// (module, entered through a softdep edge) for each module being visited
    stack: Vec<(String, bool)>,
    order: Vec<String>,
}

impl Walk<'_> {
    fn visit(&mut self, name: &str, soft: bool) -> Result<(), Unwind> {
        if self.done.contains(name) || self.index.is_builtin(name) {
            return Ok(());
        }
        if let Some(pos) = self.stack.iter().position(|(n, _)| n == name) {
            // The edges of the cycle are those entering stack[pos+1..] plus this one.
            if soft {
                return Err(Unwind::DropSoft(self.stack.len()));
            }
            if let Some(off) = self.stack.iter().skip(pos + 1).position(|(_, s)| *s) {
                return Err(Unwind::DropSoft(pos + 1 + off));
            }
            let mut cycle: Vec<String> = self
                .stack
                .iter()
                .skip(pos)
                .map(|(n, _)| n.clone())
                .collect();
            cycle.push(name.to_string());
            return Err(Unwind::Error(ModError::Cycle { cycle }));
        }
        let index = self.index;
        let Some((_, info)) = index.mods.get(name) else {
            return Err(Unwind::Error(ModError::Unknown {
                name: name.to_string(),
            }));
        };
        let depth = self.stack.len();
        self.stack.push((name.to_string(), soft));
        let result = self.visit_deps(name, info, depth);
        self.stack.truncate(depth);
        result?;
        self.done.insert(name.to_string());
        self.order.push(name.to_string());
        for post in &info.softdep_post {
            for module in index.lookup(post) {
                self.visit_soft(&module, depth)?;
            }
        }
        Ok(())
    }

    fn visit_deps(&mut self, name: &str, info: &ModInfo, depth: usize) -> Result<(), Unwind> {
        let index = self.index;
        for dep in &info.depends {
            if index.is_builtin(dep) {
                continue;
            }
            if !index.mods.contains_key(dep) {
                return Err(Unwind::Error(ModError::MissingDep {
                    module: name.to_string(),
                    dep: dep.clone(),
                }));
            }
            self.visit(dep, false)?;
        }
        for pre in &info.softdep_pre {
            for module in index.lookup(pre) {
                self.visit_soft(&module, depth + 1)?;
            }
        }
        Ok(())
    }

    /// Visits a softdep target that would sit at stack depth `depth`; a cycle through this
    /// edge drops it instead of failing.
    fn visit_soft(&mut self, module: &str, depth: usize) -> Result<(), Unwind> {
        match self.visit(module, true) {
            Err(Unwind::DropSoft(d)) if d == depth => Ok(()),
            other => other,
        }
    }
}

/// One non-`*` pattern element at `pat[p..]` against byte `c`: (matched, index after it).
/// An unterminated `[` is a literal, as in fnmatch.
fn match_token(pat: &[u8], p: usize, c: u8) -> (bool, usize) {
    match pat.get(p) {
        Some(b'?') => (true, p + 1),
        Some(b'\\') => match pat.get(p + 1) {
            Some(&lit) => (lit == c, p + 2),
            None => (c == b'\\', p + 1),
        },
        Some(b'[') => match match_class(pat, p + 1, c) {
            Some(r) => r,
            None => (c == b'[', p + 1),
        },
        Some(&lit) => (lit == c, p + 1),
        None => (false, p),
    }
}

/// A `[...]` class whose body starts at `pat[p..]`; None when it has no closing `]`.
fn match_class(pat: &[u8], mut p: usize, c: u8) -> Option<(bool, usize)> {
    let negate = matches!(pat.get(p), Some(b'!' | b'^'));
    if negate {
        p += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let lo = *pat.get(p)?;
        if lo == b']' && !first {
            return Some((hit != negate, p + 1));
        }
        first = false;
        // "a-z" is a range unless the '-' is last ("[a-]").
        if pat.get(p + 1) == Some(&b'-') && pat.get(p + 2).is_some_and(|&h| h != b']') {
            let hi = *pat.get(p + 2)?;
            hit |= lo <= c && c <= hi;
            p += 3;
        } else {
            hit |= lo == c;
            p += 1;
        }
    }
}

/// fnmatch subset used by module aliases: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`, `\x`.
/// Iterative: `*` remembers a single restart point, so matching is O(pattern × text).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (pat, txt) = (pattern.as_bytes(), text.as_bytes());
    let (mut p, mut t) = (0, 0);
    // (pattern index after the last '*', text index that star currently extends to)
    let mut star: Option<(usize, usize)> = None;
    loop {
        if pat.get(p) == Some(&b'*') {
            p += 1;
            star = Some((p, t));
            continue;
        }
        let Some(&c) = txt.get(t) else {
            break;
        };
        if p < pat.len() {
            let (ok, next) = match_token(pat, p, c);
            if ok {
                p = next;
                t += 1;
                continue;
            }
        }
        // Mismatch: let the last '*' swallow one more byte and retry after it.
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pat.get(p..)
        .is_some_and(|rest| rest.iter().all(|&b| b == b'*'))
}

/// Whether `modalias` is a PCI IDE controller (class 01, subclass 01: `…bc01sc01i…`), the
/// legacy ATA interface of old boards and of QEMU's `pc` machine, which has one for its CD-ROM
/// whatever the disks are on. kairos-init holds back the drivers of such controllers while it
/// looks for the boot disk on the others (see its device wait).
pub fn is_ide_controller(modalias: &str) -> bool {
    let Some(rest) = modalias.strip_prefix("pci:") else {
        return false;
    };
    // The class fields follow the IDs: v…d…sv…sd…bc..sc..i..
    rest.rfind("bc")
        .and_then(|at| rest.get(at..at + 8))
        .is_some_and(|class| class.eq_ignore_ascii_case("bc01sc01"))
}

/// The modaliases of the devices not in `seen`, trimmed, deduplicated and sorted; each
/// device whose modalias was read goes into `seen` (a modalias never changes, so a later walk
/// reads only the devices that appeared since). A device without a `modalias` file (the mmc
/// bus has none: an SD card's `mmc:block` is only in its uevent) gives the `MODALIAS=` of its
/// `uevent` instead, when it has no driver yet.
///
/// Devices with a modalias sit on a bus, so the devices are taken from sys_root/bus/*/devices
/// (a few dozen links) rather than by walking all of sys_root/devices (thousands of
/// directories of attributes: 70-100 ms per walk under TCG). Class devices are not on a bus:
/// an input device's `input:…` modalias (evdev, joydev) is left to userland, and no such
/// module is in an initramfs.
pub fn device_modaliases(sys_root: &Path, seen: &mut BTreeSet<PathBuf>) -> Vec<String> {
    let mut found = BTreeSet::new();
    let Ok(buses) = std::fs::read_dir(sys_root.join("bus")) else {
        return Vec::new();
    };
    for bus in buses.flatten() {
        let Ok(devices) = std::fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for dev in devices.flatten() {
            let path = dev.path();
            if seen.contains(&path) {
                continue;
            }
            if let Some(alias) = modalias_of(&path) {
                seen.insert(path);
                found.insert(alias);
            }
        }
    }
    found.into_iter().collect()
}

/// A device's modalias, or when it has no such file and no driver, its uevent's MODALIAS=.
fn modalias_of(dev: &Path) -> Option<String> {
    let text = match std::fs::read_to_string(dev.join("modalias")) {
        Ok(t) => t,
        // The `driver` link itself (a bound device), not where it leads.
        Err(_) if dev.join("driver").symlink_metadata().is_err() => {
            std::fs::read_to_string(dev.join("uevent"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("MODALIAS="))?
                .to_string()
        }
        Err(_) => return None,
    };
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Names of modules currently loaded, or built in with a sysfs presence: entries of
/// sys_root/module.
pub fn loaded(sys_root: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(sys_root.join("module")) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .map(|e| normalize(&e.file_name().to_string_lossy()))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    Loaded,
    AlreadyLoaded,
}

/// Loads a module file with finit_module(2). EEXIST means it is already loaded.
pub fn load(name: &str, path: &Path, params: &str) -> Result<LoadOutcome, ModError> {
    let file = File::open(path).at(path, "opening")?;
    let params = std::ffi::CString::new(params).map_err(|_| ModError::BadParams {
        name: name.to_string(),
    })?;
    // Flags 0: no special behaviour.
    let errno = match rustix::system::finit_module(&file, &params, 0) {
        Ok(()) => return Ok(LoadOutcome::Loaded),
        Err(rustix::io::Errno::EXIST) => return Ok(LoadOutcome::AlreadyLoaded),
        Err(e) => io::Error::from(e),
    };
    Err(ModError::Load {
        name: name.to_string(),
        path: path.to_path_buf(),
        errno,
    })
}

/// Starts loading a module in a child process, so that several load at once on several CPUs
/// (threads would cost a static binary some 70 KB; fork is linked already). The child makes
/// one finit_module call and exits with 0 (loaded) or the errno; see [`spawn_outcome`].
pub fn spawn_load(name: &str, path: &Path, params: &str) -> Result<rustix::process::Pid, ModError> {
    let file = File::open(path).at(path, "opening")?;
    let params = std::ffi::CString::new(params).map_err(|_| ModError::BadParams {
        name: name.to_string(),
    })?;
    // SAFETY: the caller is single-threaded (kairos-init); the child only makes system calls
    // (finit_module, exit_group) on a file and a string made before the fork, allocating and
    // locking nothing, and leaves with _exit, running no destructor of the parent's state.
    let pid = unsafe {
        let pid = libc::fork();
        if pid == 0 {
            let code = match rustix::system::finit_module(&file, &params, 0) {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().clamp(1, 255),
            };
            libc::_exit(code)
        }
        pid
    };
    // fork returns -1 on failure, with errno set.
    let failed = || ModError::Load {
        name: name.to_string(),
        path: path.to_path_buf(),
        errno: io::Error::last_os_error(),
    };
    if pid < 0 {
        return Err(failed());
    }
    rustix::process::Pid::from_raw(pid).ok_or_else(failed)
}

/// What a [`spawn_load`] child's wait status says about its module.
pub fn spawn_outcome(
    name: &str,
    path: &Path,
    status: rustix::process::WaitStatus,
) -> Result<LoadOutcome, ModError> {
    let errno = match (status.exit_status(), status.terminating_signal()) {
        (Some(0), _) => return Ok(LoadOutcome::Loaded),
        (Some(c), _) if c == libc::EEXIST => return Ok(LoadOutcome::AlreadyLoaded),
        (Some(c), _) => io::Error::from_raw_os_error(c),
        (None, Some(sig)) => io::Error::other(format!("loader killed by signal {sig}")),
        _ => io::Error::other(format!("loader ended with wait status {status:?}")),
    };
    Err(ModError::Load {
        name: name.to_string(),
        path: path.to_path_buf(),
        errno,
    })
}

/// Fake `.ko` files for unit tests here and in the initramfs writer (not part of the API).
#[doc(hidden)]
pub mod testing {
    /// A minimal ELF64 LE relocatable: header, .shstrtab, .modinfo, then the section headers.
    pub fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
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
}

#[cfg(test)]
mod tests {
    use super::testing::elf_with_modinfo;
    use super::*;
    use std::time::{Duration, Instant};

    const EXT4_INFO: &[u8] = b"softdep=pre: crypto-crc32c\0alias=fs-ext4\0alias=ext3\0\0\0\
depends=jbd2,mbcache,crc16\0intree=Y\0name=ext4\0vermagic=6.1.0 SMP mod_unload\0";

    fn info(
        name: &str,
        depends: &[&str],
        pre: &[&str],
        post: &[&str],
        aliases: &[&str],
    ) -> ModInfo {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect();
        ModInfo {
            name: name.into(),
            depends: v(depends),
            softdep_pre: v(pre),
            softdep_post: v(post),
            aliases: v(aliases),
        }
    }

    fn index(mods: Vec<ModInfo>, builtin: &[&str]) -> ModuleIndex {
        ModuleIndex::from_parts(
            mods.into_iter()
                .map(|m| (PathBuf::from(format!("/m/{}.ko", m.name)), m))
                .collect(),
            builtin.iter().map(|s| s.to_string()),
        )
    }

    #[test]
    fn parses_modinfo_from_elf() {
        let ko = elf_with_modinfo(EXT4_INFO);
        let info = parse_modinfo(&ko).expect("test setup");
        assert_eq!(info.name, "ext4");
        assert_eq!(info.depends, ["jbd2", "mbcache", "crc16"]);
        assert_eq!(info.softdep_pre, ["crypto-crc32c"]);
        assert!(info.softdep_post.is_empty());
        assert_eq!(info.aliases, ["fs-ext4", "ext3"]);
    }

    #[test]
    fn softdep_pre_and_post_and_empty_depends() {
        let ko = elf_with_modinfo(b"depends=\0softdep=pre: a b-c post: d\0name=x-y\0");
        let info = parse_modinfo(&ko).expect("test setup");
        assert_eq!(info.name, "x_y");
        assert!(info.depends.is_empty());
        assert_eq!(info.softdep_pre, ["a", "b-c"]);
        assert_eq!(info.softdep_post, ["d"]);
    }

    #[test]
    fn garbage_and_truncated_elf_is_none() {
        assert_eq!(parse_modinfo(b""), None);
        assert_eq!(parse_modinfo(&[0u8; 4096]), None);
        let ko = elf_with_modinfo(EXT4_INFO);
        for len in 0..ko.len() {
            assert_eq!(parse_modinfo(&ko[..len]), None, "len {len}");
        }
        // Wild offsets and counts in the header must not panic or allocate wildly.
        let mut bad = ko.clone();
        bad[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(parse_modinfo(&bad), None);
        let mut bad = ko.clone();
        bad[0x3e..0x40].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(parse_modinfo(&bad), None);
        let mut bad = ko.clone();
        let last = bad.len() - 64;
        bad[last + 24..last + 32].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
        assert_eq!(parse_modinfo(&bad), None);
        // ELF32 is refused.
        let mut bad = ko;
        bad[4] = 1;
        assert_eq!(parse_modinfo(&bad), None);
        // Pseudo-random bytes behind a valid magic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut buf: Vec<u8> = (0..512)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            buf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
            let _ = parse_modinfo(&buf);
        }
    }

    #[test]
    fn read_modinfo_uses_stem_when_nameless_and_reports_paths() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("crc32c-intel.ko");
        std::fs::write(&p, elf_with_modinfo(b"alias=crypto-crc32c\0depends=\0"))
            .expect("test setup");
        let info = read_modinfo(&p).expect("test setup");
        assert_eq!(info.name, "crc32c_intel");
        assert_eq!(info.aliases, ["crypto-crc32c"]);

        let junk = dir.path().join("junk.ko");
        std::fs::write(
            &junk,
            b"not an elf at all, not at all, not at all, not at all, not at all",
        )
        .expect("test setup");
        assert!(matches!(read_modinfo(&junk), Err(ModError::NotElf { path }) if path == junk));
        let missing = dir.path().join("missing.ko");
        let err = read_modinfo(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.ko"), "{err}");
    }

    #[test]
    fn scan_indexes_tree_and_skips_junk() {
        let dir = tempfile::tempdir().expect("test setup");
        let d = dir.path().join("kernel/fs/ext4");
        std::fs::create_dir_all(&d).expect("test setup");
        std::fs::write(d.join("ext4.ko"), elf_with_modinfo(EXT4_INFO)).expect("test setup");
        let d2 = dir.path().join("kernel/fs/jbd2");
        std::fs::create_dir_all(&d2).expect("test setup");
        std::fs::write(
            d2.join("jbd2.ko"),
            elf_with_modinfo(b"name=jbd2\0depends=\0"),
        )
        .expect("test setup");
        std::fs::write(d2.join("bad.ko"), b"garbage").expect("test setup");
        std::fs::write(d2.join("README"), b"not a module").expect("test setup");
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/lib/crc16.ko\nkernel/fs/mbcache.ko\n",
        )
        .expect("test setup");
        let idx = ModuleIndex::scan(dir.path()).expect("test setup");
        assert_eq!(idx.names().collect::<Vec<_>>(), ["ext4", "jbd2"]);
        assert!(idx.is_builtin("crc16") && idx.is_builtin("mbcache"));
        assert_eq!(idx.skipped().len(), 1);
        assert!(idx.skipped()[0].to_string().contains("bad.ko"));
        let (path, info) = idx.get("ext4").expect("test setup");
        assert!(path.ends_with("kernel/fs/ext4/ext4.ko"));
        assert_eq!(info.depends.len(), 3);
        assert_eq!(idx.lookup("fs-ext4"), ["ext4"]);
        assert_eq!(
            idx.resolve(&["ext4"]).expect("test setup"),
            ["jbd2", "ext4"]
        );
        assert!(ModuleIndex::scan(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn glob_subset() {
        assert!(glob_match(
            "pci:v00001AF4d*sv*sd*bc*sc*i*",
            "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"
        ));
        assert!(!glob_match("pci:v00001AF4d*", "pci:v00008086d00001001"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("x[abc]y", "xby"));
        assert!(!glob_match("x[abc]y", "xdy"));
        assert!(glob_match("x[a-f]y", "xey"));
        assert!(!glob_match("x[!a-f]y", "xey"));
        assert!(glob_match("x[!a-f]y", "xzy"));
        assert!(glob_match("x[]]y", "x]y"));
        assert!(glob_match("x[a-]y", "x-y"));
        assert!(glob_match("a[b", "a[b"));
        assert!(glob_match("a\\*", "a*"));
        assert!(!glob_match("a\\*", "ab"));
        assert!(glob_match("*", ""));
        assert!(glob_match("**a**", "xxaxx"));
        assert!(!glob_match("", "a"));
        assert!(glob_match("", ""));
        assert!(!glob_match("abc", "ab"));
        assert!(glob_match("*b", "aaab"));
        assert!(!glob_match("*b", "aaa"));
    }

    #[test]
    fn glob_pathological_is_fast() {
        let text = "a".repeat(10_000);
        let start = Instant::now();
        assert!(!glob_match("*a*a*a*a*a*b", &text));
        assert!(glob_match("*a*a*a*a*a*", &text));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn lookup_by_name_alias_and_modalias() {
        let idx = index(
            vec![
                info(
                    "virtio_pci",
                    &[],
                    &[],
                    &[],
                    &["pci:v00001AF4d*sv*sd*bc*sc*i*"],
                ),
                info("crc32c_intel", &[], &[], &[], &["crypto-crc32c", "crc32c"]),
                info("crc32c_generic", &[], &[], &[], &["crypto-crc32c"]),
                info("virtio_blk", &[], &[], &[], &["virtio:d00000002v*"]),
            ],
            &[],
        );
        assert_eq!(
            idx.lookup("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"),
            ["virtio_pci"]
        );
        assert_eq!(
            idx.lookup("crypto-crc32c"),
            ["crc32c_generic", "crc32c_intel"]
        );
        assert_eq!(
            idx.lookup("crypto_crc32c"),
            ["crc32c_generic", "crc32c_intel"]
        );
        assert_eq!(idx.lookup("crc32c-intel"), ["crc32c_intel"]);
        assert_eq!(idx.lookup("virtio:d00000002v00001AF4"), ["virtio_blk"]);
        assert!(idx.lookup("pci:v00008086d00001234").is_empty());
    }

    #[test]
    fn cpu_specific_modules_are_looked_up_only_for_a_cpu_with_their_features() {
        // crc32c_intel's real aliases: it needs feature 0094 (SSE4.2).
        let mut idx = index(
            vec![
                info(
                    "crc32c_intel",
                    &[],
                    &[],
                    &[],
                    &[
                        "cpu:type:x86,ven*fam*mod*:feature:*0094*",
                        "crypto-crc32c",
                        "crc32c",
                    ],
                ),
                info("crc32c_generic", &[], &[], &[], &["crypto-crc32c"]),
            ],
            &[],
        );
        // No CPU known: every provider, as before.
        assert_eq!(
            idx.lookup("crypto-crc32c"),
            ["crc32c_generic", "crc32c_intel"]
        );
        // QEMU's TCG CPU (qemu64) has no SSE4.2.
        idx.set_cpu("cpu:type:x86,ven0000fam0006mod0006:feature:,0000,0001,0002,0003,0004\n");
        assert_eq!(idx.lookup("crypto-crc32c"), ["crc32c_generic"]);
        // Asked for by name, it is still found (the kernel then says what it lacks).
        assert_eq!(idx.lookup("crc32c_intel"), ["crc32c_intel"]);
        idx.set_cpu("cpu:type:x86,ven0000fam0006mod003D:feature:,0000,0001,0093,0094,0095");
        assert_eq!(
            idx.lookup("crypto-crc32c"),
            ["crc32c_generic", "crc32c_intel"]
        );
        // The CPU's own modalias finds it too (the coldplug walk reads cpu0's).
        assert_eq!(
            idx.lookup("cpu:type:x86,ven0000fam0006mod003D:feature:,0000,0094"),
            ["crc32c_intel"]
        );
    }

    #[test]
    fn resolve_orders_deps_and_softdeps() {
        let idx = index(
            vec![
                info(
                    "ext4",
                    &["jbd2", "mbcache", "crc16"],
                    &["crypto-crc32c"],
                    &[],
                    &["fs-ext4"],
                ),
                info("jbd2", &[], &[], &[], &[]),
                info("mbcache", &[], &[], &[], &[]),
                info("crc32c_intel", &[], &[], &[], &["crypto-crc32c"]),
                info("crc32c_generic", &[], &[], &[], &["crypto-crc32c"]),
                info(
                    "virtio_pci",
                    &["virtio_pci_modern_dev", "virtio", "virtio_ring"],
                    &[],
                    &[],
                    &[],
                ),
                info("virtio_pci_modern_dev", &[], &[], &[], &[]),
                info("virtio", &[], &[], &[], &[]),
                info("virtio_ring", &[], &[], &[], &[]),
                info(
                    "virtio_blk",
                    &["virtio", "virtio_ring"],
                    &[],
                    &["blkpost"],
                    &[],
                ),
                info("blkpost", &[], &["nothing-provides-this"], &[], &[]),
                info("loop", &[], &[], &[], &[]),
            ],
            &["crc16", "kernel/fs/overlayfs/overlay.ko"],
        );
        let order = idx
            .resolve(&[
                "fs-ext4",
                "virtio_blk",
                "virtio-pci",
                "overlay",
                "loop",
                "ext4",
            ])
            .expect("test setup");
        assert_eq!(
            order,
            [
                "jbd2",
                "mbcache",
                "crc32c_generic",
                "crc32c_intel",
                "ext4",
                "virtio",
                "virtio_ring",
                "virtio_blk",
                "blkpost",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "loop"
            ]
        );
        // Deterministic.
        assert_eq!(
            idx.resolve(&[
                "fs-ext4",
                "virtio_blk",
                "virtio-pci",
                "overlay",
                "loop",
                "ext4"
            ])
            .expect("test setup"),
            order
        );
        assert!(idx.resolve(&[]).expect("test setup").is_empty());
    }

    #[test]
    fn load_graph_has_hard_soft_and_post_edges_backwards_only() {
        let idx = index(
            vec![
                info("ext4", &["jbd2", "mbcache"], &["crypto-crc32c"], &[], &[]),
                info("jbd2", &[], &[], &[], &[]),
                info("mbcache", &[], &[], &[], &[]),
                info("crc32c_intel", &[], &[], &[], &["crypto-crc32c"]),
                info("crc32c_generic", &[], &[], &[], &["crypto-crc32c"]),
                info("virtio_blk", &["virtio"], &[], &["blkpost"], &[]),
                info("virtio", &[], &[], &[], &[]),
                info("blkpost", &[], &[], &[], &[]),
                info("loop", &[], &[], &[], &[]),
                // A soft cycle resolve broke: x before y, y's soft edge to x is dropped.
                info("x", &[], &["y"], &[], &[]),
                info("y", &["x"], &[], &[], &[]),
            ],
            &[],
        );
        let order = idx
            .resolve(&["ext4", "virtio_blk", "loop", "y"])
            .expect("test setup");
        assert_eq!(
            order,
            [
                "jbd2",
                "mbcache",
                "crc32c_generic",
                "crc32c_intel",
                "ext4",
                "virtio",
                "virtio_blk",
                "blkpost",
                "loop",
                "x",
                "y"
            ]
        );
        let g = idx.load_graph(&order);
        let want: Vec<Vec<usize>> = vec![
            vec![],
            vec![],
            vec![],
            vec![],
            vec![0, 1, 2, 3],
            vec![],
            vec![5],
            vec![6],
            vec![],
            vec![],
            vec![9],
        ];
        assert_eq!(g, want);
        // Modules loaded before (outside the order) are no edges.
        assert_eq!(
            idx.load_graph(&["ext4".to_string()]),
            vec![Vec::<usize>::new()]
        );
    }

    #[test]
    fn schedule_starts_nodes_after_their_dependencies_lowest_first() {
        // 0,1 -> 2; 3 alone; 2,3 -> 4; 5 alone; a forward edge (1 -> 0) is ignored.
        let deps: Vec<Vec<usize>> =
            vec![vec![1], vec![], vec![0, 1, 1], vec![], vec![2, 3], vec![]];
        let mut s = Schedule::new(&deps);
        // Everything without a pending dependency may start at once.
        assert_eq!(
            [s.start(), s.start(), s.start(), s.start(), s.start()],
            [Some(0), Some(1), Some(3), Some(5), None]
        );
        assert_eq!(s.running(), 4);
        s.done(0);
        assert_eq!(s.start(), None, "2 still waits for 1");
        s.done(1);
        assert_eq!(s.start(), Some(2));
        s.done(3);
        assert_eq!(s.start(), None, "4 still waits for 2");
        s.done(2);
        assert_eq!(s.start(), Some(4));
        s.done(4);
        s.done(5);
        assert_eq!((s.start(), s.running()), (None, 0));
        // One at a time, it is index order.
        let mut s = Schedule::new(&deps);
        let mut order = Vec::new();
        while let Some(i) = s.start() {
            order.push(i);
            s.done(i);
        }
        assert_eq!(order, [0, 1, 2, 3, 4, 5]);
        assert_eq!(Schedule::new(&[]).start(), None);
    }

    #[test]
    fn spawned_load_reports_module_and_path() {
        // As root the child reaches finit_module, which refuses garbage (ENOEXEC, or EPERM /
        // ENOSYS in a sandbox): the error comes back through the exit status.
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("x.ko");
        std::fs::write(&p, b"x").expect("test setup");
        let pid = spawn_load("x", &p, "").expect("fork");
        let (_, status) =
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                .expect("waitpid")
                .expect("a status");
        match spawn_outcome("x", &p, status) {
            Err(ModError::Load { name, path, errno }) => {
                assert_eq!((name.as_str(), path.as_path()), ("x", p.as_path()));
                assert!(errno.raw_os_error().is_some(), "{errno}");
            }
            other => panic!("{other:?}"),
        }
        assert!(spawn_load("gone", &dir.path().join("gone.ko"), "").is_err());
    }

    #[test]
    fn resolve_errors_name_the_problem() {
        let idx = index(
            vec![
                info("a", &["b"], &[], &[], &[]),
                info("b", &["c"], &[], &[], &[]),
                info("c", &["a"], &[], &[], &[]),
                info("d", &["ghost"], &[], &[], &[]),
                info("self", &["self"], &[], &[], &[]),
            ],
            &[],
        );
        match idx.resolve(&["a"]) {
            Err(ModError::Cycle { cycle }) => assert_eq!(cycle, ["a", "b", "c", "a"]),
            other => panic!("{other:?}"),
        }
        match idx.resolve(&["self"]) {
            Err(ModError::Cycle { cycle }) => assert_eq!(cycle, ["self", "self"]),
            other => panic!("{other:?}"),
        }
        match idx.resolve(&["d"]) {
            Err(ModError::MissingDep { module, dep }) => {
                assert_eq!((module.as_str(), dep.as_str()), ("d", "ghost"))
            }
            other => panic!("{other:?}"),
        }
        match idx.resolve(&["nosuch"]) {
            Err(ModError::Unknown { name }) => assert_eq!(name, "nosuch"),
            other => panic!("{other:?}"),
        }
        let e = idx.resolve(&["a"]).unwrap_err().to_string();
        assert!(e.contains("a -> b -> c -> a"), "{e}");
    }

    #[test]
    fn resolve_each_lists_what_the_tree_lacks_and_keeps_the_rest() {
        let idx = index(
            vec![
                info("usb_storage", &["usbcore", "scsi_mod"], &[], &[], &[]),
                info("usbcore", &[], &[], &[], &[]),
                info("scsi_mod", &[], &[], &[], &[]),
                // Its dependency is absent: its own closure fails, scsi_mod stays for others.
                info("broken", &["scsi_mod", "ghost"], &[], &[], &[]),
                info("crc32c_generic", &[], &[], &[], &["crypto-crc32c"]),
            ],
            &["kernel/drivers/block/loop.ko"],
        );
        let (order, failed) = idx.resolve_each(&[
            "broken",
            "pata_acpi",
            "usb-storage",
            "loop",
            "crypto-crc32c",
        ]);
        assert_eq!(
            order,
            ["usbcore", "scsi_mod", "usb_storage", "crc32c_generic"]
        );
        let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["broken", "pata_acpi"]);
        assert!(matches!(&failed[0].1, ModError::MissingDep { dep, .. } if dep == "ghost"));
        assert!(matches!(&failed[1].1, ModError::Unknown { name } if name == "pata_acpi"));
    }

    #[test]
    fn softdep_cycles_are_dropped_not_fatal() {
        // x softdep-pre y, y depends x: the soft edge breaks the cycle, so y loads after x.
        let idx = index(
            vec![
                info("x", &[], &["y"], &[], &[]),
                info("y", &["x"], &[], &[], &[]),
                info("p", &[], &[], &["q"], &[]),
                info("q", &[], &["p"], &[], &[]),
                info("s", &[], &["t"], &[], &[]),
                info("t", &[], &["s"], &[], &[]),
            ],
            &[],
        );
        assert_eq!(idx.resolve(&["x"]).expect("test setup"), ["x"]);
        assert_eq!(idx.resolve(&["x", "y"]).expect("test setup"), ["x", "y"]);
        assert_eq!(idx.resolve(&["y"]).expect("test setup"), ["x", "y"]);
        assert_eq!(idx.resolve(&["p"]).expect("test setup"), ["p", "q"]);
        assert_eq!(idx.resolve(&["s"]).expect("test setup"), ["t", "s"]);
    }

    #[test]
    fn loaded_modules_are_read_from_sys_module() {
        let dir = tempfile::tempdir().expect("test setup");
        let sys = dir.path();
        assert!(loaded(sys).is_empty());
        for m in ["virtio_blk", "ext4", "crc32c-intel"] {
            std::fs::create_dir_all(sys.join("module").join(m)).expect("test setup");
        }
        assert_eq!(
            loaded(sys).into_iter().collect::<Vec<_>>(),
            ["crc32c_intel", "ext4", "virtio_blk"]
        );
        // A sysfs without bus/ has no devices to load for.
        assert!(device_modaliases(&sys.join("nope"), &mut BTreeSet::new()).is_empty());
    }

    #[test]
    fn modaliases_come_from_the_bus_device_links_when_sysfs_has_them() {
        let dir = tempfile::tempdir().expect("test setup");
        let sys = dir.path();
        let pci = sys.join("devices/pci0000:00/0000:00:04.0");
        let virtio = pci.join("virtio1");
        let card = sys.join("devices/pci0000:00/0000:00:05.0/mmc_host/mmc0/mmc0:4567");
        let bound_card = sys.join("devices/pci0000:00/0000:00:05.0/mmc_host/mmc1/mmc1:0001");
        let cpu = sys.join("devices/system/cpu/cpu0");
        for d in [&pci, &virtio, &card, &bound_card, &cpu] {
            std::fs::create_dir_all(d).expect("test setup");
        }
        std::fs::write(
            pci.join("modalias"),
            "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n",
        )
        .expect("test setup");
        std::fs::write(virtio.join("modalias"), "virtio:d00000002v00001AF4\n").expect("test setup");
        std::fs::write(
            cpu.join("modalias"),
            "cpu:type:x86,ven0000fam0006mod0006:feature:,0000\n",
        )
        .expect("test setup");
        // An SD card: MODALIAS only in its uevent, read while unbound.
        std::fs::write(card.join("uevent"), "MMC_TYPE=SD\nMODALIAS=mmc:block\n")
            .expect("test setup");
        std::fs::write(bound_card.join("uevent"), "MODALIAS=not:wanted\n").expect("test setup");
        std::os::unix::fs::symlink("../../../bus/mmc/drivers/mmcblk", bound_card.join("driver"))
            .expect("test setup");
        // A device outside any bus is not seen (sysfs puts every modalias on a bus).
        let loose = sys.join("devices/virtual/misc/x");
        std::fs::create_dir_all(&loose).expect("test setup");
        std::fs::write(loose.join("modalias"), "not:wanted").expect("test setup");
        for (bus, name, target) in [
            (
                "pci",
                "0000:00:04.0",
                "../../../devices/pci0000:00/0000:00:04.0",
            ),
            (
                "virtio",
                "virtio1",
                "../../../devices/pci0000:00/0000:00:04.0/virtio1",
            ),
            (
                "mmc",
                "mmc0:4567",
                "../../../devices/pci0000:00/0000:00:05.0/mmc_host/mmc0/mmc0:4567",
            ),
            (
                "mmc",
                "mmc1:0001",
                "../../../devices/pci0000:00/0000:00:05.0/mmc_host/mmc1/mmc1:0001",
            ),
            ("cpu", "cpu0", "../../../devices/system/cpu/cpu0"),
        ] {
            let d = sys.join("bus").join(bus).join("devices");
            std::fs::create_dir_all(&d).expect("test setup");
            std::os::unix::fs::symlink(target, d.join(name)).expect("test setup");
        }
        // A bus without devices/ is skipped.
        std::fs::create_dir_all(sys.join("bus/none")).expect("test setup");
        let mut seen = BTreeSet::new();
        assert_eq!(
            device_modaliases(sys, &mut seen),
            [
                "cpu:type:x86,ven0000fam0006mod0006:feature:,0000",
                "mmc:block",
                "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
                "virtio:d00000002v00001AF4"
            ]
        );
        // The next walk reads only devices that appeared since.
        assert!(device_modaliases(sys, &mut seen).is_empty());
        let disk = pci.join("virtio1/block-dev");
        std::fs::create_dir_all(&disk).expect("test setup");
        std::fs::write(disk.join("modalias"), "virtio:d00000001v00001AF4\n").expect("test setup");
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:00/0000:00:04.0/virtio1/block-dev",
            sys.join("bus/virtio/devices/virtio2"),
        )
        .expect("test setup");
        assert_eq!(
            device_modaliases(sys, &mut seen),
            ["virtio:d00000001v00001AF4"]
        );
    }

    #[test]
    fn load_reports_module_and_path() {
        let dir = tempfile::tempdir().expect("test setup");
        let missing = dir.path().join("gone.ko");
        let e = load("gone", &missing, "").unwrap_err();
        assert!(e.to_string().contains("gone.ko"), "{e}");
        let p = dir.path().join("x.ko");
        std::fs::write(&p, b"x").expect("test setup");
        assert!(matches!(load("x", &p, "a\0b"), Err(ModError::BadParams { name }) if name == "x"));
        // Loading garbage fails (ENOEXEC/EPERM/ENOSYS in a sandbox); the error names it.
        match load("x", &p, "") {
            Err(ModError::Load { name, path, .. }) => {
                assert_eq!(name, "x");
                assert_eq!(path, p);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A distribution's whole module tree: scripts/test points KAIROS_TEST_MODULES at the
    /// Debian kernel `kairos-qemu setup` fetched; by hand, `/lib/modules/$(uname -r)`.
    #[test]
    fn real_kernel_modules() {
        let dir = std::env::var_os("KAIROS_TEST_MODULES").expect(
            "KAIROS_TEST_MODULES must name a module tree to scan (/lib/modules/<version>; \
             scripts/test sets it to the kernel kairos-qemu setup fetched)",
        );
        let start = Instant::now();
        let idx = ModuleIndex::scan(Path::new(&dir)).expect("test setup");
        println!(
            "scanned {} modules in {:?}, {} skipped",
            idx.names().count(),
            start.elapsed(),
            idx.skipped().len()
        );
        assert!(idx.names().count() > 1000);
        assert!(idx.skipped().is_empty(), "{:?}", idx.skipped());
        let order = idx
            .resolve(&[
                "ext4",
                "virtio_blk",
                "virtio_pci",
                "loop",
                "overlay",
                "squashfs",
            ])
            .expect("test setup");
        println!("{order:?}");
        let pos = |n: &str| {
            order
                .iter()
                .position(|m| m == n)
                .unwrap_or_else(|| panic!("{n} not in {order:?}"))
        };
        assert!(pos("jbd2") < pos("ext4"));
        assert!(pos("mbcache") < pos("ext4"));
        assert!(pos("virtio_ring") < pos("virtio_pci"));
        assert!(pos("virtio_blk") > pos("virtio_ring"));
        for m in ["loop", "overlay", "squashfs"] {
            pos(m);
        }
        assert!(
            idx.lookup("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00")
                .contains(&"virtio_pci".to_string())
        );
        let uniq: BTreeSet<_> = order.iter().collect();
        assert_eq!(uniq.len(), order.len());
        // The whole tree resolves: no missing hard dependency, no hard cycle.
        let all: Vec<&str> = idx.names().collect();
        let start = Instant::now();
        let everything = idx.resolve(&all).expect("test setup");
        println!(
            "resolved all {} modules in {:?}",
            everything.len(),
            start.elapsed()
        );
        assert_eq!(everything.len(), all.len());
    }

    #[test]
    fn ide_controllers_are_told_by_their_pci_class() {
        // QEMU's PIIX3 IDE, an AHCI controller (0106), an NVMe (0108), virtio-blk (0100).
        assert!(is_ide_controller(
            "pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80"
        ));
        assert!(!is_ide_controller(
            "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01"
        ));
        assert!(!is_ide_controller(
            "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"
        ));
        assert!(!is_ide_controller(
            "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"
        ));
        // Not PCI, or cut short.
        assert!(!is_ide_controller("virtio:d00000002v00001AF4"));
        assert!(!is_ide_controller("pci:v00008086d00007010bc01"));
        assert!(!is_ide_controller(""));
    }
}
