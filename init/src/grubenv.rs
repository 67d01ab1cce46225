//! The GRUB environment block (COS_OEM:/grubenv) and the boot counters kept in it.
//!
//! Format, as grub-core/lib/envblk.c reads and writes it: exactly [`BLOCK_SIZE`] bytes, the
//! `# GRUB Environment Block\n` header, `name=value\n` lines (a backslash in a value escapes the
//! next byte; GRUB writes `\\` and `\` + newline) and `#` comment lines (Debian's grub-editenv
//! writes a warning line after the header), then `#` padding to the end. Anything else is
//! refused with the offset and the reason, never repaired by guessing: the caller decides.
//!
//! The counter model ([`Counters`], [`arm`], [`mark_good`], [`grub_choice`], [`grub_boot`]) is the
//! contract with grub.cfg: GRUB script mirrors [`grub_boot`], the agent calls [`mark_good`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kairos_util::{IoError, IoResultExt};

pub const BLOCK_SIZE: usize = 1024;
pub const HEADER: &[u8] = b"# GRUB Environment Block\n";

/// Variable names shared with grub.cfg.
pub mod var {
    pub const NEXT_ENTRY: &str = "next_entry";
    pub const SAVED_ENTRY: &str = "saved_entry";
    pub const ENABLE_BOOT_ASSESSMENT: &str = "enable_boot_assessment";
    pub const TRIES_COS: &str = "kairos_tries_cos";
    pub const TRIES_FALLBACK: &str = "kairos_tries_fallback";
    pub const MAX_TRIES: &str = "kairos_max_tries";
    pub const TENTATIVE: &str = "boot_assessment_tentative";
    pub const BOOT_ENTRY: &str = "kairos_boot_entry";
    pub const BOOT_REASON: &str = "kairos_boot_reason";
}

/// Why GRUB booted an entry: `kairos_boot_reason`, and the part after `:` in
/// `rd.kairos.boot_reason=<entry>:<reason>`.
pub mod reason {
    /// A one-shot `next_entry` (cleared before booting; not counted).
    pub const NEXT_ENTRY: &str = "next_entry";
    /// Armed: one of active's tries, counted down and saved before booting.
    pub const COUNTED_TRY: &str = "counted-try";
    /// Armed, active's tries spent: one of passive's tries.
    pub const COS_TRIES_EXHAUSTED: &str = "cos-tries-exhausted";
    /// Armed, every try spent: recovery.
    pub const ALL_TRIES_EXHAUSTED: &str = "all-tries-exhausted";
    /// Not armed: the persistent `saved_entry`.
    pub const SAVED_ENTRY: &str = "saved_entry";
    /// Nothing chosen: `cos`.
    pub const DEFAULT: &str = "default";
    /// GRUB only: armed but the decremented counter could not be saved, so recovery.
    pub const GRUBENV_UNWRITABLE: &str = "grubenv-unwritable";
    /// Command line only: the entry was picked by hand or through GRUB's `fallback` list.
    pub const MENU: &str = "menu";
}

/// GRUB menu entry ids (SPEC §4) that `next_entry` may name.
pub const ENTRIES: &[&str] = &["cos", "fallback", "recovery", "statereset"];
pub const DEFAULT_MAX_TRIES: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{}: {size} bytes, a GRUB environment block is exactly {BLOCK_SIZE}", path.display())]
    WrongSize { path: PathBuf, size: u64 },
    #[error("{}: no \"# GRUB Environment Block\" header", path.display())]
    NoHeader { path: PathBuf },
    #[error("{}: byte {offset}: {reason}", path.display())]
    Malformed {
        path: PathBuf,
        offset: usize,
        reason: String,
    },
    #[error(
        "{}: the variables need {needed} bytes, more than the {BLOCK_SIZE}-byte block",
        path.display()
    )]
    TooLarge { path: PathBuf, needed: usize },
    #[error("variable name {name:?}: GRUB names are letters, digits and _")]
    BadName { name: String },
    #[error("value of {name}: contains a NUL byte")]
    BadValue { name: String },
    /// Kept apart from `Io` so a failed checkpoint never reads as a missing grubenv.
    #[error(transparent)]
    Checkpoint(IoError),
}

impl GrubEnvError {
    /// The file exists but does not hold a valid block (as opposed to an I/O failure).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            Self::WrongSize { .. } | Self::NoHeader { .. } | Self::Malformed { .. }
        )
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The lines of a block, in file order. `set` replaces in place and appends new names, as
/// grub-editenv does, so a rewrite changes as few lines as possible; comments are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrubEnv {
    lines: Vec<Line>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Var(String, String),
    /// Text from the `#` up to the newline.
    Comment(String),
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl GrubEnv {
    /// Parse a whole block; `path` only names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, GrubEnvError> {
        let malformed = |offset: usize, reason: String| GrubEnvError::Malformed {
            path: path.to_owned(),
            offset,
            reason,
        };
        if bytes.len() != BLOCK_SIZE {
            return Err(GrubEnvError::WrongSize {
                path: path.to_owned(),
                size: bytes.len() as u64,
            });
        }
        if !bytes.starts_with(HEADER) {
            return Err(GrubEnvError::NoHeader {
                path: path.to_owned(),
            });
        }
        let mut env = GrubEnv::default();
        let mut pos = HEADER.len();
        while let Some(&first) = bytes.get(pos) {
            let line = pos;
            let rest = bytes.get(pos..).unwrap_or_default();
            if first == b'#' {
                // A comment ends with a newline; without one this is the padding, which must be
                // `#` to the end: anything else there means damage.
                let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                    if let Some(i) = rest.iter().position(|&b| b != b'#') {
                        return Err(malformed(
                            line + i,
                            format!("byte 0x{:02x} inside the # padding", rest[i]),
                        ));
                    }
                    break;
                };
                // GRUB skips any bytes here; text without NUL is what a comment can be.
                let text = std::str::from_utf8(&rest[..nl])
                    .ok()
                    .filter(|t| !t.contains('\0'))
                    .ok_or_else(|| malformed(line, "comment line is not text".into()))?;
                env.lines.push(Line::Comment(text.to_owned()));
                pos = line + nl + 1;
                continue;
            }
            // GRUB's own scan for '=' would run across newlines and glue lines together.
            let Some(eq) = rest.iter().position(|&b| matches!(b, b'=' | b'\n' | 0)) else {
                return Err(malformed(line, "line without '=' runs to the end".into()));
            };
            if rest[eq] != b'=' {
                return Err(malformed(line + eq, "line without '='".into()));
            }
            let name = std::str::from_utf8(&rest[..eq])
                .map_err(|_| malformed(line, "variable name is not UTF-8".into()))?;
            if name.is_empty() {
                return Err(malformed(line, "empty variable name".into()));
            }
            let mut value = Vec::new();
            let mut i = line + eq + 1;
            loop {
                let byte = match bytes.get(i) {
                    None => {
                        return Err(malformed(
                            line,
                            format!("value of {name} is not ended by a newline"),
                        ));
                    }
                    Some(b'\n') => break,
                    Some(b'\\') => {
                        i += 1;
                        match bytes.get(i) {
                            Some(&b) => b,
                            None => {
                                return Err(malformed(
                                    line,
                                    format!("value of {name} ends inside an escape"),
                                ));
                            }
                        }
                    }
                    Some(&b) => b,
                };
                if byte == 0 {
                    return Err(malformed(i, format!("NUL byte in the value of {name}")));
                }
                value.push(byte);
                i += 1;
            }
            let value = String::from_utf8(value)
                .map_err(|_| malformed(line, format!("value of {name} is not UTF-8")))?;
            if env.get_raw(name).is_some() {
                return Err(malformed(line, format!("{name} is set twice")));
            }
            env.lines.push(Line::Var(name.to_owned(), value));
            pos = i + 1;
        }
        Ok(env)
    }

    /// The bytes of the block; `path` only names the destination in the error.
    pub fn to_block(&self, path: &Path) -> Result<[u8; BLOCK_SIZE], GrubEnvError> {
        let mut out = Vec::with_capacity(BLOCK_SIZE);
        out.extend_from_slice(HEADER);
        for line in &self.lines {
            match line {
                Line::Comment(text) => out.extend_from_slice(text.as_bytes()),
                Line::Var(name, value) => {
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'=');
                    for b in value.bytes() {
                        if b == b'\\' || b == b'\n' {
                            out.push(b'\\');
                        }
                        out.push(b);
                    }
                }
            }
            out.push(b'\n');
        }
        let mut block = [b'#'; BLOCK_SIZE];
        match block.get_mut(..out.len()) {
            Some(head) => head.copy_from_slice(&out),
            None => {
                return Err(GrubEnvError::TooLarge {
                    path: path.to_owned(),
                    needed: out.len(),
                });
            }
        }
        Ok(block)
    }

    /// The value of `name`; an empty value counts as unset, as in GRUB's `[ -n "$x" ]`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_raw(name).filter(|v| !v.is_empty())
    }

    /// The value of `name` even when empty.
    pub fn get_raw(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub fn set(&mut self, name: &str, value: &str) -> Result<(), GrubEnvError> {
        if !valid_name(name) {
            return Err(GrubEnvError::BadName { name: name.into() });
        }
        if value.contains('\0') {
            return Err(GrubEnvError::BadValue { name: name.into() });
        }
        self.put(name, value);
        Ok(())
    }

    /// `set` for the names of this module, which are known to be valid.
    fn put(&mut self, name: &str, value: &str) {
        debug_assert!(valid_name(name) && !value.contains('\0'));
        let slot = self.lines.iter_mut().find_map(|l| match l {
            Line::Var(k, v) if k == name => Some(v),
            _ => None,
        });
        match slot {
            Some(v) => *v = value.to_owned(),
            None => self
                .lines
                .push(Line::Var(name.to_owned(), value.to_owned())),
        }
    }

    /// Remove `name`; true if it was there.
    pub fn unset(&mut self, name: &str) -> bool {
        let before = self.lines.len();
        self.lines
            .retain(|l| !matches!(l, Line::Var(k, _) if k == name));
        self.lines.len() != before
    }

    /// The variables (not the comments), in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Var(k, v) => Some((k.as_str(), v.as_str())),
            Line::Comment(_) => None,
        })
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// No variables (comments do not count).
    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }
}

/// Read and parse the block at `path`.
pub fn read(path: &Path) -> Result<GrubEnv, GrubEnvError> {
    let file = File::open(path).at(path, "opening")?;
    let meta = file.metadata().at(path, "reading the metadata")?;
    // A directory or device here is a mistake to report, not a corrupt block to replace.
    if !meta.is_file() {
        let err = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
        return Err(IoError::new(path, "opening", err).into());
    }
    let size = meta.len();
    if size != BLOCK_SIZE as u64 {
        return Err(GrubEnvError::WrongSize {
            path: path.to_owned(),
            size,
        });
    }
    let mut bytes = Vec::with_capacity(BLOCK_SIZE);
    // Bounded even if the file grows between the size check and the read.
    file.take(BLOCK_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .at(path, "reading")?;
    GrubEnv::parse(&bytes, path)
}

/// `path` with `.tmp` appended to its file name: the temporary file of earlier versions,
/// removed when found (nothing writes it any more).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A temporary file beside `path` that no other writer uses: `NAME.tmp.PID.N`, created with
/// O_EXCL (a name left by a crashed process of the same pid is skipped, never written through).
fn create_unique_tmp(path: &Path) -> std::io::Result<(PathBuf, File)> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".tmp.{}.{n}", std::process::id()));
        let tmp = path.with_file_name(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            other => return other.map(|f| (tmp, f)),
        }
    }
}

/// Atomic replace: write PATH.tmp, fsync it, rename over PATH, fsync the directory, then
/// checkpoint the filesystem's journal ([`crate::sys::journal::checkpoint`]): GRUB reads the
/// block without replaying the journal, so until then it would see the old one. A crash
/// leaves either the old or the new block, never a torn one GRUB would refuse.
pub fn write(path: &Path, env: &GrubEnv) -> Result<(), GrubEnvError> {
    let block = env.to_block(path)?;
    // Unique: two writers (or a writer and a stale file) never share a temporary file.
    let (tmp, mut f) = create_unique_tmp(path).at(&tmp_path(path), "creating")?;
    let written = f
        .write_all(&block)
        .at(&tmp, "writing")
        .and_then(|()| f.sync_all().at(&tmp, "fsync"))
        .and_then(|()| {
            std::fs::rename(&tmp, path).at(&tmp, format!("renaming to {}", path.display()))
        });
    drop(f);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    let _ = std::fs::remove_file(tmp_path(path));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .at(dir, "fsync of the directory")?;
    crate::sys::journal::checkpoint(dir).map_err(GrubEnvError::Checkpoint)?;
    Ok(())
}

/// A counter variable that does not hold what the contract allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: expected {expected}")]
pub struct CounterError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// The boot-assessment state of a block, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// `enable_boot_assessment=yes`.
    pub armed: bool,
    /// Remaining tries; a missing counter is 0 (exhausted), as GRUB sees it.
    pub tries_cos: u8,
    pub tries_fallback: u8,
    /// What a reset restores (`kairos_max_tries`, default 3).
    pub max: u8,
    /// `boot_assessment_tentative=yes`: the running boot is a counted try not yet marked good.
    pub tentative: bool,
}

fn digit(env: &GrubEnv, name: &'static str, lo: u8) -> Result<Option<u8>, CounterError> {
    let Some(v) = env.get(name) else {
        return Ok(None);
    };
    match v.as_bytes() {
        [d @ b'0'..=b'9'] if d - b'0' >= lo => Ok(Some(d - b'0')),
        _ => Err(CounterError {
            name,
            value: v.to_owned(),
            expected: if lo == 0 {
                "one digit 0..9"
            } else {
                "one digit 1..9"
            },
        }),
    }
}

/// What grub.cfg tests: GRUB script has no arithmetic, so it only knows the strings 1..9;
/// anything else (missing, 0, garbage) is an exhausted counter.
fn grub_tries(env: &GrubEnv, name: &str) -> u8 {
    match env.get(name).map(str::as_bytes) {
        Some([d @ b'1'..=b'9']) => d - b'0',
        _ => 0,
    }
}

impl Counters {
    pub fn from_env(env: &GrubEnv) -> Result<Self, CounterError> {
        Ok(Counters {
            armed: env.get(var::ENABLE_BOOT_ASSESSMENT) == Some("yes"),
            tries_cos: digit(env, var::TRIES_COS, 0)?.unwrap_or(0),
            tries_fallback: digit(env, var::TRIES_FALLBACK, 0)?.unwrap_or(0),
            max: digit(env, var::MAX_TRIES, 1)?.unwrap_or(DEFAULT_MAX_TRIES),
            tentative: env.get(var::TENTATIVE) == Some("yes"),
        })
    }
}

fn digit_str(n: u8) -> String {
    n.min(9).to_string()
}

/// Arm boot assessment: active and passive each get `max` tries (1..9); a stale tentative flag
/// from an earlier boot is dropped so it cannot be mistaken for this arming's first try.
pub fn arm(env: &mut GrubEnv, max: u8) -> Result<(), CounterError> {
    if !(1..=9).contains(&max) {
        return Err(CounterError {
            name: var::MAX_TRIES,
            value: max.to_string(),
            expected: "one digit 1..9",
        });
    }
    let n = digit_str(max);
    env.put(var::ENABLE_BOOT_ASSESSMENT, "yes");
    env.put(var::MAX_TRIES, &n);
    env.put(var::TRIES_COS, &n);
    env.put(var::TRIES_FALLBACK, &n);
    env.unset(var::TENTATIVE);
    Ok(())
}

/// Stop counting: GRUB goes back to next_entry / saved_entry. `kairos_max_tries` is kept as
/// configuration for the next arming.
pub fn disarm(env: &mut GrubEnv) {
    for name in [
        var::ENABLE_BOOT_ASSESSMENT,
        var::TRIES_COS,
        var::TRIES_FALLBACK,
        var::TENTATIVE,
    ] {
        env.unset(name);
    }
}

/// What [`mark_good`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkedGood {
    /// The booted entry's counter was set back to `max`.
    TriesReset { var: &'static str, max: u8 },
    /// Assessment is not armed: only the tentative flag was cleared.
    NotArmed,
    /// The entry has no counter (recovery, statereset, anything else): only the tentative flag
    /// was cleared.
    NoCounter,
}

/// The boot of `booted_entry` is healthy: reset that entry's counter only (a passive boot
/// marked good must not re-arm a failing active) and clear the tentative flag. An invalid
/// `kairos_max_tries` is replaced by the default so a typo cannot stop every boot from
/// being marked good.
pub fn mark_good(env: &mut GrubEnv, booted_entry: &str) -> MarkedGood {
    env.unset(var::TENTATIVE);
    if env.get(var::ENABLE_BOOT_ASSESSMENT) != Some("yes") {
        return MarkedGood::NotArmed;
    }
    let counter = match booted_entry {
        "cos" => var::TRIES_COS,
        "fallback" => var::TRIES_FALLBACK,
        _ => return MarkedGood::NoCounter,
    };
    let max = match digit(env, var::MAX_TRIES, 1) {
        Ok(m) => m.unwrap_or(DEFAULT_MAX_TRIES),
        Err(_) => {
            env.put(var::MAX_TRIES, &digit_str(DEFAULT_MAX_TRIES));
            DEFAULT_MAX_TRIES
        }
    };
    env.put(counter, &digit_str(max));
    MarkedGood::TriesReset { var: counter, max }
}

/// The entry GRUB boots and why (the `rd.kairos.boot_reason=<entry>:<reason>` pair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootChoice {
    pub entry: String,
    pub reason: &'static str,
}

impl std::fmt::Display for BootChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.entry, self.reason)
    }
}

/// What grub.cfg picks from this block, without changing it:
/// 1. `next_entry` set: boot it (`next_entry`), counters untouched;
/// 2. armed: `cos` while its tries last (`counted-try`), then `fallback`
///    (`cos-tries-exhausted`), then `recovery` (`all-tries-exhausted`);
/// 3. else `saved_entry` (`saved_entry`), or `cos` (`default`).
///
/// Not modelled: GRUB's `grubenv-unwritable` (a failed save_env) and `menu` (a hand pick).
pub fn grub_choice(env: &GrubEnv) -> BootChoice {
    let choice = |entry: &str, reason| BootChoice {
        entry: entry.to_owned(),
        reason,
    };
    if let Some(next) = env.get(var::NEXT_ENTRY) {
        return choice(next, reason::NEXT_ENTRY);
    }
    if env.get(var::ENABLE_BOOT_ASSESSMENT) == Some("yes") {
        return if grub_tries(env, var::TRIES_COS) > 0 {
            choice("cos", reason::COUNTED_TRY)
        } else if grub_tries(env, var::TRIES_FALLBACK) > 0 {
            choice("fallback", reason::COS_TRIES_EXHAUSTED)
        } else {
            choice("recovery", reason::ALL_TRIES_EXHAUSTED)
        };
    }
    match env.get(var::SAVED_ENTRY) {
        Some(saved) => choice(saved, reason::SAVED_ENTRY),
        None => choice("cos", reason::DEFAULT),
    }
}

/// [`grub_choice`] plus what grub.cfg saves before booting: `next_entry` cleared (to empty,
/// as `set next_entry=; save_env next_entry` does); for a counted try the counter decremented
/// and `boot_assessment_tentative=yes`; always `kairos_boot_entry` and `kairos_boot_reason`.
pub fn grub_boot(env: &mut GrubEnv) -> BootChoice {
    let c = grub_choice(env);
    match c.reason {
        reason::NEXT_ENTRY => env.put(var::NEXT_ENTRY, ""),
        reason::COUNTED_TRY | reason::COS_TRIES_EXHAUSTED => {
            let counter = if c.entry == "cos" {
                var::TRIES_COS
            } else {
                var::TRIES_FALLBACK
            };
            let left = grub_tries(env, counter).saturating_sub(1);
            env.put(counter, &digit_str(left));
            env.put(var::TENTATIVE, "yes");
        }
        _ => {}
    }
    env.put(var::BOOT_ENTRY, &c.entry);
    env.put(var::BOOT_REASON, c.reason);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const P: &str = "/oem/grubenv";

    fn p() -> &'static Path {
        Path::new(P)
    }

    fn env_of(pairs: &[(&str, &str)]) -> GrubEnv {
        let mut e = GrubEnv::default();
        for (k, v) in pairs {
            e.set(k, v).expect("test setup");
        }
        e
    }

    fn block_with(body: &[u8]) -> Vec<u8> {
        let mut b = HEADER.to_vec();
        b.extend_from_slice(body);
        b.resize(BLOCK_SIZE, b'#');
        b
    }

    fn malformed_at(bytes: &[u8]) -> (usize, String) {
        match GrubEnv::parse(bytes, p()) {
            Err(GrubEnvError::Malformed { offset, reason, .. }) => (offset, reason),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    /// Deterministic bytes for the garbage cases (xorshift64).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn round_trip_keeps_order_and_escapes() {
        let e = env_of(&[
            ("saved_entry", "cos"),
            ("extra_cmdline", "console=ttyS0 quiet"),
            ("weird", "back\\slash\nnew line=and#hash\\"),
            ("empty", ""),
        ]);
        let block = e.to_block(p()).expect("test setup");
        assert!(block.starts_with(HEADER));
        assert_eq!(*block.last().expect("test setup"), b'#');
        let text = String::from_utf8_lossy(&block);
        assert!(text.contains("weird=back\\\\slash\\\nnew line=and#hash\\\\\n"));
        let back = GrubEnv::parse(&block, p()).expect("test setup");
        assert_eq!(back, e);
        assert_eq!(back.get("empty"), None);
        assert_eq!(back.get_raw("empty"), Some(""));
        let names: Vec<_> = back.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["saved_entry", "extra_cmdline", "weird", "empty"]);
    }

    #[test]
    fn empty_env_is_header_and_padding() {
        let block = GrubEnv::default().to_block(p()).expect("test setup");
        assert_eq!(&block[..HEADER.len()], HEADER);
        assert!(block[HEADER.len()..].iter().all(|&b| b == b'#'));
        assert!(GrubEnv::parse(&block, p()).expect("test setup").is_empty());
    }

    #[test]
    fn set_replaces_in_place_and_unset_removes() {
        let mut e = env_of(&[("a", "1"), ("b", "2"), ("c", "3")]);
        e.set("b", "two").expect("test setup");
        e.set("d", "4").expect("test setup");
        let got: Vec<_> = e.iter().collect();
        assert_eq!(got, [("a", "1"), ("b", "two"), ("c", "3"), ("d", "4")]);
        assert!(e.unset("a"));
        assert!(!e.unset("a"));
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn set_refuses_names_grub_cannot_use() {
        let mut e = GrubEnv::default();
        for bad in ["", "a-b", "a=b", "a b", "é", "x\n", "#x"] {
            assert!(
                matches!(e.set(bad, "1"), Err(GrubEnvError::BadName { ref name }) if name == bad),
                "{bad:?}"
            );
        }
        assert!(matches!(
            e.set("ok_1", "a\0b"),
            Err(GrubEnvError::BadValue { .. })
        ));
        assert!(e.is_empty());
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let good = GrubEnv::default().to_block(p()).expect("test setup");
        // Truncated.
        assert!(matches!(
            GrubEnv::parse(&good[..1000], p()),
            Err(GrubEnvError::WrongSize { size: 1000, .. })
        ));
        // Header only, no padding.
        assert!(matches!(
            GrubEnv::parse(HEADER, p()),
            Err(GrubEnvError::WrongSize { size: 25, .. })
        ));
        let mut long = good.to_vec();
        long.push(b'#');
        assert!(matches!(
            GrubEnv::parse(&long, p()),
            Err(GrubEnvError::WrongSize { size: 1025, .. })
        ));
        assert!(matches!(
            GrubEnv::parse(&[], p()),
            Err(GrubEnvError::WrongSize { size: 0, .. })
        ));
    }

    #[test]
    fn garbage_is_refused_never_guessed() {
        for seed in 0..200 {
            let junk = noise(seed, BLOCK_SIZE);
            assert!(matches!(
                GrubEnv::parse(&junk, p()),
                Err(GrubEnvError::NoHeader { .. })
            ));
            // Past the header: any outcome but a panic; what parses must write back identically.
            let mut b = HEADER.to_vec();
            b.extend_from_slice(&noise(seed, BLOCK_SIZE - HEADER.len()));
            if let Ok(e) = GrubEnv::parse(&b, p()) {
                assert_eq!(
                    e.to_block(p()).expect("test setup").as_slice(),
                    b.as_slice()
                );
            }
        }
        let zeros = [0u8; BLOCK_SIZE];
        assert!(matches!(
            GrubEnv::parse(&zeros, p()),
            Err(GrubEnvError::NoHeader { .. })
        ));
    }

    #[test]
    fn malformed_blocks_name_offset_and_reason() {
        let h = HEADER.len();
        let (off, why) = malformed_at(&block_with(b"a=1\nnoequals\nb=2\n"));
        assert_eq!((off, why.as_str()), (h + 4 + 8, "line without '='"));
        let (off, why) = malformed_at(&block_with(b"a=1\n###x###"));
        assert_eq!(off, h + 7);
        assert!(why.contains("0x78 inside the # padding"), "{why}");
        let (off, why) = malformed_at(&block_with(b"a=1\n#\xff\n"));
        assert_eq!((off, why.as_str()), (h + 4, "comment line is not text"));
        let (off, why) = malformed_at(&block_with(b"\xff\xfe=1\n"));
        assert_eq!((off, why.as_str()), (h, "variable name is not UTF-8"));
        let (_, why) = malformed_at(&block_with(b"v=\xff\n"));
        assert_eq!(why, "value of v is not UTF-8");
        let (_, why) = malformed_at(&block_with(b"=1\n"));
        assert_eq!(why, "empty variable name");
        let (off, why) = malformed_at(&block_with(b"a=1\na=2\n"));
        assert_eq!((off, why.as_str()), (h + 4, "a is set twice"));
        let (_, why) = malformed_at(&block_with(b"a=\na=2\n"));
        assert_eq!(why, "a is set twice");
        let (_, why) = malformed_at(&block_with(b"a=x\0y\n"));
        assert_eq!(why, "NUL byte in the value of a");
        let (_, why) = malformed_at(&block_with(b"a=x\\\0\n"));
        assert_eq!(why, "NUL byte in the value of a");
        // A value that swallows the padding and never ends.
        let mut full = HEADER.to_vec();
        full.extend_from_slice(b"a=");
        full.resize(BLOCK_SIZE, b'x');
        let (_, why) = malformed_at(&full);
        assert_eq!(why, "value of a is not ended by a newline");
        *full.last_mut().expect("test setup") = b'\\';
        let (_, why) = malformed_at(&full);
        assert_eq!(why, "value of a ends inside an escape");
        // A name that runs to the end.
        let mut name = HEADER.to_vec();
        name.resize(BLOCK_SIZE, b'n');
        let (off, _) = malformed_at(&name);
        assert_eq!(off, h);
    }

    #[test]
    fn comments_are_kept_in_place() {
        let block = block_with(b"# note\na=1\n#\nb=2\n");
        let mut e = GrubEnv::parse(&block, p()).expect("test setup");
        assert_eq!(e.len(), 2);
        assert_eq!(
            e.to_block(p()).expect("test setup").as_slice(),
            block.as_slice()
        );
        e.set("a", "one").expect("test setup");
        e.unset("b");
        e.set("c", "3").expect("test setup");
        assert_eq!(
            e.to_block(p()).expect("test setup").as_slice(),
            block_with(b"# note\na=one\n#\nc=3\n").as_slice()
        );
        // Only comments: no variables.
        assert!(
            GrubEnv::parse(&block_with(b"# x\n"), p())
                .expect("test setup")
                .is_empty()
        );
    }

    #[test]
    fn a_block_filled_to_the_last_byte_is_valid() {
        let room = BLOCK_SIZE - HEADER.len() - "v=\n".len();
        let e = env_of(&[("v", &"x".repeat(room))]);
        let block = e.to_block(p()).expect("test setup");
        assert_eq!(*block.last().expect("test setup"), b'\n');
        assert_eq!(GrubEnv::parse(&block, p()).expect("test setup"), e);
        let over = env_of(&[("v", &"x".repeat(room + 1))]);
        assert!(matches!(
            over.to_block(p()),
            Err(GrubEnvError::TooLarge { needed: 1025, .. })
        ));
    }

    #[test]
    fn overfull_env_is_refused_and_the_file_kept() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        write(&f, &env_of(&[("keep", "me")])).expect("test setup");
        let mut big = GrubEnv::default();
        for i in 0..64 {
            big.set(&format!("var_{i:02}"), &"v".repeat(24))
                .expect("test setup");
        }
        match write(&f, &big) {
            Err(GrubEnvError::TooLarge { path, needed }) => {
                assert_eq!(path, f);
                assert!(needed > 2048, "{needed}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(read(&f).expect("test setup").get("keep"), Some("me"));
        assert!(!tmp_path(&f).exists());
    }

    #[test]
    fn concurrent_writers_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        let writers: Vec<_> = (0..4)
            .map(|i| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        write(&f, &env_of(&[("w", &format!("{i}-{n}"))]))?;
                    }
                    Ok::<(), GrubEnvError>(())
                })
            })
            .collect();
        for w in writers {
            // With one shared PATH.tmp a writer renames another's file away, or its own is
            // gone when it renames.
            w.join()
                .expect("writer thread")
                .expect("every write succeeds");
        }
        assert!(read(&f).expect("a valid block").get("w").is_some());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("test setup")
            .map(|e| e.expect("test setup").file_name())
            .collect();
        assert_eq!(names, ["grubenv"]);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        // A stale temp file of an earlier version is removed.
        std::fs::write(tmp_path(&f), b"stale").expect("test setup");
        write(&f, &env_of(&[("a", "1")])).expect("test setup");
        write(&f, &env_of(&[("b", "2")])).expect("test setup");
        assert_eq!(
            std::fs::metadata(&f).expect("test setup").len(),
            BLOCK_SIZE as u64
        );
        assert_eq!(read(&f).expect("test setup"), env_of(&[("b", "2")]));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("test setup")
            .map(|e| e.expect("test setup").file_name())
            .collect();
        assert_eq!(names, ["grubenv"]);
        assert_eq!(
            tmp_path(Path::new("/oem/grubenv")),
            Path::new("/oem/grubenv.tmp")
        );
    }

    #[test]
    fn read_reports_size_and_missing_files() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        let err = read(&f).unwrap_err();
        assert!(err.is_not_found() && !err.is_corrupt());
        std::fs::write(
            &f,
            &GrubEnv::default().to_block(&f).expect("test setup")[..1000],
        )
        .expect("test setup");
        let err = read(&f).unwrap_err();
        assert!(err.is_corrupt());
        assert_eq!(
            err.to_string(),
            format!(
                "{}: 1000 bytes, a GRUB environment block is exactly 1024",
                f.display()
            )
        );
        std::fs::write(&f, HEADER).expect("test setup");
        assert!(matches!(
            read(&f),
            Err(GrubEnvError::WrongSize { size: 25, .. })
        ));
        std::fs::write(&f, noise(7, BLOCK_SIZE)).expect("test setup");
        assert!(matches!(read(&f), Err(GrubEnvError::NoHeader { .. })));
        let err = read(dir.path()).unwrap_err();
        assert!(!err.is_corrupt() && !err.is_not_found());
        assert!(err.to_string().ends_with(": not a regular file"), "{err}");
        let err = write(&dir.path().join("no/such/dir/grubenv"), &GrubEnv::default());
        assert!(matches!(err, Err(GrubEnvError::Io { .. })));
    }

    /// grub-editenv from grub-common (`kairos-qemu setup` installs it); a test without it
    /// fails with the reason.
    fn editenv(args: &[&str]) -> String {
        let out = Command::new("grub-editenv")
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "grub-editenv not available ({e}): apt-get install grub-common, or run `kairos-qemu setup`"
                )
            });
        assert!(
            out.status.success(),
            "grub-editenv {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("test setup")
    }

    #[test]
    fn we_read_what_grub_editenv_writes() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        let fs = f.to_str().expect("test setup");
        editenv(&[fs, "create"]);
        assert!(read(&f).expect("test setup").is_empty());
        editenv(&[fs, "set", "a=1", "b=x y"]);
        editenv(&[fs, "set", "c=back\\slash", "d=two\nlines", "e="]);
        editenv(&[fs, "set", "a=one"]);
        let e = read(&f).expect("test setup");
        let got: Vec<_> = e.iter().collect();
        assert_eq!(
            got,
            [
                ("a", "one"),
                ("b", "x y"),
                ("c", "back\\slash"),
                ("d", "two\nlines"),
                ("e", "")
            ]
        );
        // Byte for byte what we would have written.
        assert_eq!(
            e.to_block(&f).expect("test setup").as_slice(),
            std::fs::read(&f).expect("test setup")
        );
        editenv(&[fs, "unset", "b"]);
        assert_eq!(read(&f).expect("test setup").get("b"), None);
    }

    #[test]
    fn grub_editenv_reads_and_edits_what_we_write() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        let fs = f.to_str().expect("test setup");
        let e = env_of(&[
            ("saved_entry", "cos"),
            ("b", "x y"),
            ("c", "back\\slash"),
            ("d", "two\nlines"),
            ("kairos_tries_cos", "3"),
        ]);
        write(&f, &e).expect("test setup");
        let listed = editenv(&[fs, "list"]);
        assert_eq!(
            listed,
            "saved_entry=cos\nb=x y\nc=back\\slash\nd=two\nlines\nkairos_tries_cos=3\n"
        );
        // grub-editenv finds its free space in our padding and edits in place.
        editenv(&[fs, "set", "kairos_tries_cos=2", "new=1"]);
        let mut want = e.clone();
        want.set("kairos_tries_cos", "2").expect("test setup");
        want.set("new", "1").expect("test setup");
        assert_eq!(read(&f).expect("test setup"), want);
        // Filled to the last byte: grub-editenv still reads it.
        let room = BLOCK_SIZE - HEADER.len() - "v=\n".len();
        write(&f, &env_of(&[("v", &"x".repeat(room))])).expect("test setup");
        assert_eq!(editenv(&[fs, "list"]), format!("v={}\n", "x".repeat(room)));
    }

    #[test]
    fn counters_defaults_and_bad_numbers() {
        let c = Counters::from_env(&GrubEnv::default()).expect("test setup");
        assert_eq!(
            c,
            Counters {
                armed: false,
                tries_cos: 0,
                tries_fallback: 0,
                max: 3,
                tentative: false
            }
        );
        let c = Counters::from_env(&env_of(&[
            ("enable_boot_assessment", "yes"),
            ("kairos_tries_cos", "0"),
            ("kairos_tries_fallback", "9"),
            ("kairos_max_tries", "5"),
            ("boot_assessment_tentative", "yes"),
        ]))
        .expect("test setup");
        assert_eq!((c.armed, c.tries_cos, c.tries_fallback), (true, 0, 9));
        assert_eq!((c.max, c.tentative), (5, true));
        for (name, value) in [
            ("kairos_tries_cos", "10"),
            ("kairos_tries_cos", "-1"),
            ("kairos_tries_fallback", "x"),
            ("kairos_max_tries", "0"),
            ("kairos_max_tries", " 3"),
        ] {
            let err = Counters::from_env(&env_of(&[(name, value)])).unwrap_err();
            assert_eq!((err.name, err.value.as_str()), (name, value));
            assert!(err.to_string().starts_with(&format!("{name}=")), "{err}");
        }
    }

    #[test]
    fn arm_and_disarm() {
        let mut e = env_of(&[("saved_entry", "cos"), ("boot_assessment_tentative", "yes")]);
        arm(&mut e, 3).expect("test setup");
        let c = Counters::from_env(&e).expect("test setup");
        assert_eq!(
            c,
            Counters {
                armed: true,
                tries_cos: 3,
                tries_fallback: 3,
                max: 3,
                tentative: false
            }
        );
        assert_eq!(arm(&mut e, 0).unwrap_err().name, "kairos_max_tries");
        assert!(arm(&mut e, 10).is_err());
        disarm(&mut e);
        let names: Vec<_> = e.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["saved_entry", "kairos_max_tries"]);
        assert_eq!(
            grub_choice(&e),
            BootChoice {
                entry: "cos".into(),
                reason: "saved_entry"
            }
        );
    }

    fn boots(e: &mut GrubEnv, n: usize) -> Vec<String> {
        (0..n).map(|_| grub_boot(e).to_string()).collect()
    }

    #[test]
    fn failing_active_then_passive_ends_in_recovery() {
        let mut e = GrubEnv::default();
        arm(&mut e, 3).expect("test setup");
        assert_eq!(
            boots(&mut e, 8),
            [
                "cos:counted-try",
                "cos:counted-try",
                "cos:counted-try",
                "fallback:cos-tries-exhausted",
                "fallback:cos-tries-exhausted",
                "fallback:cos-tries-exhausted",
                "recovery:all-tries-exhausted",
                "recovery:all-tries-exhausted",
            ]
        );
        assert_eq!(e.get(var::BOOT_ENTRY), Some("recovery"));
        assert_eq!(e.get(var::BOOT_REASON), Some("all-tries-exhausted"));
        let c = Counters::from_env(&e).expect("test setup");
        assert_eq!((c.tries_cos, c.tries_fallback, c.tentative), (0, 0, true));
        // Recovery has no counter; marking it good only clears the flag.
        assert_eq!(mark_good(&mut e, "recovery"), MarkedGood::NoCounter);
        assert!(!Counters::from_env(&e).expect("test setup").tentative);
        assert_eq!(grub_choice(&e).entry, "recovery");
    }

    #[test]
    fn each_counted_try_is_saved_before_booting() {
        let mut e = GrubEnv::default();
        arm(&mut e, 2).expect("test setup");
        assert_eq!(grub_boot(&mut e).to_string(), "cos:counted-try");
        let c = Counters::from_env(&e).expect("test setup");
        assert_eq!((c.tries_cos, c.tries_fallback, c.tentative), (1, 2, true));
    }

    #[test]
    fn a_good_boot_resets_only_its_own_counter() {
        let mut e = GrubEnv::default();
        arm(&mut e, 3).expect("test setup");
        grub_boot(&mut e);
        grub_boot(&mut e);
        assert_eq!(
            mark_good(&mut e, "cos"),
            MarkedGood::TriesReset {
                var: var::TRIES_COS,
                max: 3
            }
        );
        let c = Counters::from_env(&e).expect("test setup");
        assert_eq!((c.tries_cos, c.tentative), (3, false));
        // Active keeps booting while each boot is marked good.
        for _ in 0..5 {
            assert_eq!(grub_boot(&mut e).to_string(), "cos:counted-try");
            mark_good(&mut e, "cos");
        }
        // Active starts failing: after 3 tries passive boots and is marked good; that must
        // not give active new tries, so passive stays the choice.
        assert_eq!(boots(&mut e, 3), ["cos:counted-try"; 3]);
        for _ in 0..4 {
            assert_eq!(
                grub_boot(&mut e).to_string(),
                "fallback:cos-tries-exhausted"
            );
            assert!(matches!(
                mark_good(&mut e, "fallback"),
                MarkedGood::TriesReset { max: 3, .. }
            ));
            assert_eq!(Counters::from_env(&e).expect("test setup").tries_cos, 0);
        }
        // A new arming (upgrade) gives active its tries back.
        arm(&mut e, 3).expect("test setup");
        assert_eq!(grub_boot(&mut e).to_string(), "cos:counted-try");
    }

    #[test]
    fn next_entry_is_one_shot_and_not_counted() {
        let mut e = GrubEnv::default();
        arm(&mut e, 3).expect("test setup");
        e.set(var::NEXT_ENTRY, "fallback").expect("test setup");
        assert_eq!(grub_boot(&mut e).to_string(), "fallback:next_entry");
        assert_eq!(e.get_raw(var::NEXT_ENTRY), Some(""));
        let c = Counters::from_env(&e).expect("test setup");
        assert_eq!((c.tries_cos, c.tries_fallback, c.tentative), (3, 3, false));
        assert_eq!(grub_boot(&mut e).to_string(), "cos:counted-try");
        // Unarmed too.
        let mut e = env_of(&[("next_entry", "recovery"), ("saved_entry", "fallback")]);
        assert_eq!(
            boots(&mut e, 3),
            [
                "recovery:next_entry",
                "fallback:saved_entry",
                "fallback:saved_entry"
            ]
        );
    }

    #[test]
    fn unarmed_boots_the_default_and_mark_good_only_clears_the_flag() {
        let mut e = env_of(&[("boot_assessment_tentative", "yes")]);
        assert_eq!(boots(&mut e, 2), ["cos:default", "cos:default"]);
        assert_eq!(e.get(var::TRIES_COS), None);
        assert_eq!(mark_good(&mut e, "cos"), MarkedGood::NotArmed);
        assert_eq!(e.get(var::TENTATIVE), None);
        assert_eq!(e.get(var::TRIES_COS), None);
    }

    #[test]
    fn grub_treats_odd_counters_as_exhausted() {
        for bad in ["0", "", "x", "10", "-1"] {
            let mut e = env_of(&[
                ("enable_boot_assessment", "yes"),
                ("kairos_tries_cos", bad),
                ("kairos_tries_fallback", "1"),
            ]);
            assert_eq!(
                grub_boot(&mut e).to_string(),
                "fallback:cos-tries-exhausted"
            );
            assert_eq!(e.get(var::TRIES_FALLBACK), Some("0"));
        }
        // "yes" only: anything else is unarmed.
        let e = env_of(&[("enable_boot_assessment", "1"), ("kairos_tries_cos", "3")]);
        assert_eq!(grub_choice(&e).reason, "default");
    }

    #[test]
    fn mark_good_repairs_a_bad_max() {
        let mut e = GrubEnv::default();
        arm(&mut e, 5).expect("test setup");
        e.set(var::MAX_TRIES, "many").expect("test setup");
        assert_eq!(
            mark_good(&mut e, "cos"),
            MarkedGood::TriesReset {
                var: var::TRIES_COS,
                max: DEFAULT_MAX_TRIES
            }
        );
        assert_eq!(e.get(var::MAX_TRIES), Some("3"));
        assert_eq!(e.get(var::TRIES_COS), Some("3"));
    }

    #[test]
    fn counters_survive_the_file_format() {
        let dir = tempfile::tempdir().expect("test setup");
        let f = dir.path().join("grubenv");
        let mut e = GrubEnv::default();
        arm(&mut e, 3).expect("test setup");
        for _ in 0..4 {
            grub_boot(&mut e);
            write(&f, &e).expect("test setup");
            e = read(&f).expect("test setup");
        }
        assert_eq!(e.get(var::BOOT_ENTRY), Some("fallback"));
        assert_eq!(
            Counters::from_env(&e).expect("test setup").tries_fallback,
            2
        );
    }
}
