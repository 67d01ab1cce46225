//! Kernel command line → typed [`BootRequest`] (SPEC.md §2).
//!
//! Pure: the caller reads `/proc/cmdline`. Any input, however hostile, yields a request plus
//! warnings; nothing here panics, and the work is linear in the input length.

use std::borrow::Cow;
use std::time::Duration;

use crate::labels;
use crate::syntax::clean_path;
// Shared with the layout file; re-exported under their old home.
pub use crate::syntax::{OVERLAY_FORMS, Overlay, parse_overlay, split_volume};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    Active,
    Passive,
    Recovery,
    Live,
}

/// `rd.kairos.pause=NAME`: a point where kairos-init stops for good, so a test harness can cut
/// the power there (the QEMU power-cut tests of the COS_PERSISTENT grow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PausePoint {
    /// The new GPT entries and backup are written and synced; the primary header is not
    /// switched yet.
    GrowEntries,
    /// The GPT is switched and the kernel told; the filesystem is not grown yet.
    GrowGpt,
}

impl PausePoint {
    pub const ALL: [PausePoint; 2] = [PausePoint::GrowEntries, PausePoint::GrowGpt];

    pub fn name(self) -> &'static str {
        match self {
            PausePoint::GrowEntries => "grow-entries",
            PausePoint::GrowGpt => "grow-gpt",
        }
    }
}

/// Where a live (squashfs) root comes from: `root=live:<device> rd.live.dir= rd.live.squashimg=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSource {
    /// "LABEL=COS_RECOVERY", "CDLABEL=COS_LIVE", ...
    pub device: String,
    /// `rd.live.dir`, default "/".
    pub dir: String,
    /// `rd.live.squashimg`, default "rootfs.squashfs".
    pub squashimg: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRequest {
    /// Derived per SPEC §2 from substrings; autoreset is Recovery with `reset`.
    pub mode: BootMode,
    /// `kairos.reset` present.
    pub reset: bool,
    /// Raw value of `root=`.
    pub root: Option<String>,
    /// Label from `root=LABEL=X` (not set for `root=live:`).
    pub root_label: Option<String>,
    /// `cos-img/filename=`, an absolute path on the state (or recovery) partition.
    pub image: Option<String>,
    /// `root=live:...`; also set for the recovery squashfs entry.
    pub live: Option<LiveSource>,
    /// `rd.cos.oemlabel` / `rd.immucore.oemlabel`.
    pub oem_label: String,
    /// `rd.cos.oemtimeout` / `rd.immucore.oemtimeout`.
    pub oem_timeout: Duration,
    /// `rd.cos.overlay` / `rd.immucore.overlay`; None means the layout file or its default.
    pub overlay: Option<Overlay>,
    /// `rd.cos.mount=LABEL=x:/mnt` (repeatable) as ("LABEL=x", "/mnt").
    pub extra_mounts: Vec<(String, String)>,
    /// `rd.cos.debugrw`.
    pub debugrw: bool,
    /// `rd.cos.disable`.
    pub disable: bool,
    /// `rd.kairos.init=`: program to exec after switch_root. The kernel's own `init=` is not
    /// ours (it names this binary) and is ignored.
    pub init: Option<String>,
    /// Root device wait: `rd.kairos.timeout=`, else `rd.immucore.sysrootwait=`.
    pub timeout: Duration,
    /// `rd.kairos.rebootdelay=`: pause before rebooting when nothing can boot.
    pub reboot_delay: Duration,
    /// `rd.kairos.debug` or `rd.immucore.debug`.
    pub debug: bool,
    /// `rd.kairos.boot_reason=` set by GRUB, logged by the init.
    pub boot_reason: Option<String>,
    /// `rd.kairos.state_uuid=`: the filesystem UUID of the COS_STATE GRUB booted from. Its
    /// disk is the boot disk: every other Kairos partition is taken from that disk only.
    pub state_uuid: Option<String>,
    /// Every `console=` device ("ttyS0,115200" -> "ttyS0"), in order.
    pub consoles: Vec<String>,
    /// False when `fsck.mode=skip`.
    pub fsck: bool,
    /// `rd.kairos.pause=`: test hook, see [`PausePoint`].
    pub pause: Option<PausePoint>,
}

/// Upstream immucore waits 120 s for the root device. Local disks on an edge box enumerate in
/// a few seconds, and a device that has not appeared by then is better handled by falling back
/// (reboot into the next entry) than by stalling the box for two minutes; 30 s still covers
/// slow USB sticks and SAN paths.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_OEM_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_REBOOT_DELAY: Duration = Duration::from_secs(10);
/// Any wait longer than an hour is a typo, not an intent.
pub const MAX_TIMEOUT_SECS: u64 = 3600;
pub const DEFAULT_LIVE_DIR: &str = "/";
pub const DEFAULT_LIVE_SQUASHIMG: &str = "rootfs.squashfs";

impl Default for BootRequest {
    fn default() -> Self {
        BootRequest {
            mode: BootMode::Active,
            reset: false,
            root: None,
            root_label: None,
            image: None,
            live: None,
            oem_label: labels::OEM.to_owned(),
            oem_timeout: DEFAULT_OEM_TIMEOUT,
            overlay: None,
            extra_mounts: Vec::new(),
            debugrw: false,
            disable: false,
            init: None,
            timeout: DEFAULT_TIMEOUT,
            reboot_delay: DEFAULT_REBOOT_DELAY,
            debug: false,
            boot_reason: None,
            state_uuid: None,
            consoles: Vec::new(),
            fsck: true,
            pause: None,
        }
    }
}

/// A malformed known parameter; its default was kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel parameter `{param}`: {message}")]
pub struct Warning {
    pub param: String,
    pub message: String,
}

/// The parameters that take one value (or are flags); `rd.cos.mount` and `console`
/// accumulate and are handled apart.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Root,
    Image,
    LiveDir,
    LiveSquash,
    OemLabel,
    OemTimeout,
    Overlay,
    DebugRw,
    Disable,
    CosDebug,
    SysrootWait,
    Init,
    Timeout,
    RebootDelay,
    KairosDebug,
    BootReason,
    StateUuid,
    FsckMode,
    Pause,
}
const SLOTS: usize = Slot::Pause as usize + 1;

/// Known names → slot, and whether the name is the `rd.immucore.` form (which wins).
const PARAMS: &[(&str, Slot, bool)] = &[
    ("root", Slot::Root, false),
    ("cos-img/filename", Slot::Image, false),
    ("rd.live.dir", Slot::LiveDir, false),
    ("rd.live.squashimg", Slot::LiveSquash, false),
    ("rd.cos.oemlabel", Slot::OemLabel, false),
    ("rd.immucore.oemlabel", Slot::OemLabel, true),
    ("rd.cos.oemtimeout", Slot::OemTimeout, false),
    ("rd.immucore.oemtimeout", Slot::OemTimeout, true),
    ("rd.cos.overlay", Slot::Overlay, false),
    ("rd.immucore.overlay", Slot::Overlay, true),
    ("rd.cos.debugrw", Slot::DebugRw, false),
    ("rd.immucore.debugrw", Slot::DebugRw, true),
    ("rd.cos.disable", Slot::Disable, false),
    ("rd.immucore.disable", Slot::Disable, true),
    ("rd.cos.debug", Slot::CosDebug, false),
    ("rd.immucore.debug", Slot::CosDebug, true),
    ("rd.cos.sysrootwait", Slot::SysrootWait, false),
    ("rd.immucore.sysrootwait", Slot::SysrootWait, true),
    ("rd.kairos.init", Slot::Init, false),
    ("rd.kairos.timeout", Slot::Timeout, false),
    ("rd.kairos.rebootdelay", Slot::RebootDelay, false),
    ("rd.kairos.debug", Slot::KairosDebug, false),
    ("rd.kairos.boot_reason", Slot::BootReason, false),
    ("rd.kairos.state_uuid", Slot::StateUuid, false),
    ("fsck.mode", Slot::FsckMode, false),
    ("rd.kairos.pause", Slot::Pause, false),
];

/// One occurrence: the canonical name (for warnings) and the value (None for a bare flag).
type Seen<'a> = (&'static str, Option<Cow<'a, str>>);

/// What the command line said, before validation.
struct Raw<'a> {
    slots: [Option<Seen<'a>>; SLOTS],
    from_immucore: [bool; SLOTS],
    mounts_cos: Vec<Seen<'a>>,
    mounts_immucore: Vec<Seen<'a>>,
    consoles: Vec<Option<Cow<'a, str>>>,
}

impl<'a> Raw<'a> {
    fn set(&mut self, slot: Slot, name: &'static str, immucore: bool, value: Option<Cow<'a, str>>) {
        let i = slot as usize;
        let (Some(cur), Some(imm)) = (self.slots.get_mut(i), self.from_immucore.get_mut(i)) else {
            return;
        };
        // rd.immucore.X wins over rd.cos.X whatever the order; otherwise the last one wins.
        if *imm && !immucore {
            return;
        }
        *cur = Some((name, value));
        *imm = immucore;
    }

    fn take(&mut self, slot: Slot) -> Option<Seen<'a>> {
        self.slots.get_mut(slot as usize).and_then(Option::take)
    }
}

/// Kernel `isspace` for the ASCII range (includes vertical tab, unlike `is_ascii_whitespace`).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Kernel-style tokens: whitespace separates, double quotes group and are removed.
struct Tokens<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Cow<'a, str>;

    fn next(&mut self) -> Option<Cow<'a, str>> {
        let b = self.s.as_bytes();
        let mut i = self.pos;
        while b.get(i).is_some_and(|&c| is_space(c)) {
            i += 1;
        }
        if i >= b.len() {
            self.pos = i;
            return None;
        }
        let start = i;
        let (mut quoted, mut any_quote) = (false, false);
        while let Some(&c) = b.get(i) {
            if c == b'"' {
                quoted = !quoted;
                any_quote = true;
            } else if !quoted && is_space(c) {
                break;
            }
            i += 1;
        }
        self.pos = i;
        // start and i sit on ASCII bytes or the end, so this slice is always valid.
        let raw = self.s.get(start..i)?;
        Some(if any_quote {
            Cow::Owned(raw.replace('"', ""))
        } else {
            Cow::Borrowed(raw)
        })
    }
}

/// The words of a kernel command line as the kernel splits them: whitespace separates, double
/// quotes group (`kairos.config="a.b=x y"`) and are removed.
pub fn words(raw: &str) -> impl Iterator<Item = Cow<'_, str>> {
    Tokens { s: raw, pos: 0 }
}

/// The part of `raw` before a lone `--`: what follows is init's argv, not kernel parameters.
fn params_part(raw: &str) -> &str {
    let mut tokens = Tokens { s: raw, pos: 0 };
    while let Some(tok) = tokens.next() {
        if tok == "--" {
            return raw.get(..tokens.pos).unwrap_or(raw);
        }
    }
    raw
}

/// Mode per SPEC §2, first match wins: `kairos.reset` (recovery, and the bool says reset),
/// COS_ACTIVE, COS_PASSIVE, COS_RECOVERY|COS_SYSTEM|recovery-mode,
/// live:LABEL|live:CDLABEL|netboot; `None` when no marker is there.
fn marked_mode(s: &str) -> Option<(BootMode, bool)> {
    if s.contains("kairos.reset") {
        Some((BootMode::Recovery, true))
    } else if s.contains(labels::ACTIVE) {
        Some((BootMode::Active, false))
    } else if s.contains(labels::PASSIVE) {
        Some((BootMode::Passive, false))
    } else if s.contains(labels::RECOVERY)
        || s.contains(labels::SYSTEM)
        || s.contains("recovery-mode")
    {
        Some((BootMode::Recovery, false))
    } else if s.contains("live:LABEL") || s.contains("live:CDLABEL") || s.contains("netboot") {
        Some((BootMode::Live, false))
    } else {
        None
    }
}

/// Mode per SPEC §2; without any marker kairos-init boots the active image.
fn derive_mode(s: &str) -> (BootMode, bool) {
    marked_mode(s).unwrap_or((BootMode::Active, false))
}

/// The mode a kernel command line asks for, by the markers of SPEC §2 (the ones kairos-init
/// decides by), looking only before a lone `--`; `None` when no marker is there (kairos-init
/// then boots the active image, but nothing says it was asked to).
pub fn boot_mode(raw: &str) -> Option<BootMode> {
    marked_mode(params_part(raw)).map(|(mode, _)| mode)
}

struct Warnings(Vec<Warning>);

impl Warnings {
    fn push(&mut self, param: &str, message: impl Into<String>) {
        self.0.push(Warning {
            param: param.to_owned(),
            message: message.into(),
        });
    }

    /// The value of a key=value parameter; warns on the flag form and on an empty value.
    fn value<'a>(
        &mut self,
        seen: Option<Seen<'a>>,
        default: &str,
    ) -> Option<(&'static str, Cow<'a, str>)> {
        let (name, v) = seen?;
        match v {
            None => self.push(
                name,
                format!("needs a value (`{name}=...`); using {default}"),
            ),
            Some(v) if v.is_empty() => self.push(name, format!("empty value; using {default}")),
            Some(v) => return Some((name, v)),
        }
        None
    }

    /// Whole seconds, capped at [`MAX_TIMEOUT_SECS`].
    fn seconds(&mut self, seen: Option<Seen<'_>>, default: Duration) -> Option<Duration> {
        let dflt = format!("the default {} s", default.as_secs());
        let (name, v) = self.value(seen, &dflt)?;
        // Digits only: u64::from_str would also take "+5", and "-1" or "2.5" must be refused.
        let n = if v.bytes().all(|b| b.is_ascii_digit()) {
            v.parse::<u64>().ok()
        } else {
            None
        };
        let Some(n) = n else {
            self.push(
                name,
                format!("{v:?} is not a whole number of seconds; using {dflt}"),
            );
            return None;
        };
        if n > MAX_TIMEOUT_SECS {
            self.push(
                name,
                format!("{n} s is too long; capped at {MAX_TIMEOUT_SECS} s"),
            );
            return Some(Duration::from_secs(MAX_TIMEOUT_SECS));
        }
        Some(Duration::from_secs(n))
    }

    /// A flag: bare means on; a value must read as a boolean.
    fn flag(&mut self, seen: Option<Seen<'_>>) -> Option<bool> {
        let (name, v) = seen?;
        let Some(v) = v else { return Some(true) };
        match &*v {
            "1" | "y" | "yes" | "true" | "on" => Some(true),
            "0" | "n" | "no" | "false" | "off" => Some(false),
            _ => {
                self.push(name, format!("{v:?} is not a boolean; treated as off"));
                None
            }
        }
    }

    /// An absolute path, normalised; anything else is refused.
    fn path(&mut self, seen: Option<Seen<'_>>) -> Option<String> {
        let (name, v) = self.value(seen, "none")?;
        match clean_path(&v) {
            Ok(p) => Some(p),
            Err(e) => {
                self.push(name, format!("{e}; ignored"));
                None
            }
        }
    }
}

/// Parse a kernel command line. Unknown parameters are ignored; malformed known ones are
/// reported and keep their default.
pub fn parse(cmdline: &str) -> (BootRequest, Vec<Warning>) {
    let mut raw = Raw {
        slots: [const { None }; SLOTS],
        from_immucore: [false; SLOTS],
        mounts_cos: Vec::new(),
        mounts_immucore: Vec::new(),
        consoles: Vec::new(),
    };
    let mut tokens = Tokens { s: cmdline, pos: 0 };
    // Everything after a lone `--` is init's argv, so it neither sets params nor the mode.
    let mut end = cmdline.len();
    while let Some(tok) = tokens.next() {
        if tok == "--" {
            end = tokens.pos;
            break;
        }
        // Split at the first '='; values keep borrowing the input when the token did.
        let (key, value): (&str, Option<Cow<'_, str>>) = match &tok {
            Cow::Borrowed(t) => match t.split_once('=') {
                Some((k, v)) => (k, Some(Cow::Borrowed(v))),
                None => (t, None),
            },
            Cow::Owned(t) => match t.split_once('=') {
                Some((k, v)) => (k, Some(Cow::Owned(v.to_owned()))),
                None => (t, None),
            },
        };
        match key {
            "console" => raw.consoles.push(value),
            "rd.cos.mount" => raw.mounts_cos.push(("rd.cos.mount", value)),
            "rd.immucore.mount" => raw.mounts_immucore.push(("rd.immucore.mount", value)),
            _ => {
                if let Some(&(name, slot, imm)) = PARAMS.iter().find(|(n, ..)| *n == key) {
                    raw.set(slot, name, imm, value);
                }
            }
        }
    }

    let mut w = Warnings(Vec::new());
    let mut req = BootRequest::default();
    let (mode, reset) = derive_mode(cmdline.get(..end).unwrap_or(cmdline));
    req.mode = mode;
    req.reset = reset;

    let live_dir = w.value(raw.take(Slot::LiveDir), DEFAULT_LIVE_DIR);
    let live_squash = w.value(raw.take(Slot::LiveSquash), DEFAULT_LIVE_SQUASHIMG);
    if let Some((name, root)) = w.value(raw.take(Slot::Root), "none") {
        if let Some(dev) = root.strip_prefix("live:") {
            if dev.is_empty() {
                w.push(name, "`live:` needs a device such as LABEL=COS_LIVE");
            } else {
                req.live = Some(LiveSource {
                    device: dev.to_owned(),
                    dir: live_dir
                        .map_or_else(|| DEFAULT_LIVE_DIR.to_owned(), |(_, v)| v.into_owned()),
                    squashimg: live_squash.map_or_else(
                        || DEFAULT_LIVE_SQUASHIMG.to_owned(),
                        |(_, v)| v.into_owned(),
                    ),
                });
            }
        } else if let Some(label) = root.strip_prefix("LABEL=") {
            if label.is_empty() {
                w.push(name, "`LABEL=` without a label");
            } else {
                req.root_label = Some(label.to_owned());
            }
        }
        req.root = Some(root.into_owned());
    }

    req.image = w.path(raw.take(Slot::Image));
    if let Some((_, v)) = w.value(raw.take(Slot::OemLabel), labels::OEM) {
        req.oem_label = v.into_owned();
    }
    if let Some(d) = w.seconds(raw.take(Slot::OemTimeout), DEFAULT_OEM_TIMEOUT) {
        req.oem_timeout = d;
    }
    if let Some((name, v)) = w.value(raw.take(Slot::Overlay), "the layout's overlay") {
        req.overlay = parse_overlay(&v);
        if req.overlay.is_none() {
            w.push(
                name,
                format!("{v:?} is not {OVERLAY_FORMS}; using the layout's overlay"),
            );
        }
    }

    let mounts = if raw.mounts_immucore.is_empty() {
        std::mem::take(&mut raw.mounts_cos)
    } else {
        std::mem::take(&mut raw.mounts_immucore)
    };
    for seen in mounts {
        let Some((name, v)) = w.value(Some(seen), "no extra mount") else {
            continue;
        };
        let Some((spec, mnt)) = split_volume(&v) else {
            w.push(name, format!("{v:?} is not SPEC:/mountpoint; ignored"));
            continue;
        };
        match clean_path(mnt) {
            Ok(mnt) => req.extra_mounts.push((spec.to_owned(), mnt)),
            Err(e) => w.push(name, format!("{e}; ignored")),
        }
    }

    req.debugrw = w.flag(raw.take(Slot::DebugRw)).unwrap_or(false);
    req.disable = w.flag(raw.take(Slot::Disable)).unwrap_or(false);
    let cos_debug = w.flag(raw.take(Slot::CosDebug)).unwrap_or(false);
    req.debug = w.flag(raw.take(Slot::KairosDebug)).unwrap_or(false) || cos_debug;
    req.init = w.path(raw.take(Slot::Init));

    // rd.kairos.timeout wins over immucore's name for the same wait, whatever the order.
    let sysrootwait = w.seconds(raw.take(Slot::SysrootWait), DEFAULT_TIMEOUT);
    let kairos_timeout = w.seconds(raw.take(Slot::Timeout), DEFAULT_TIMEOUT);
    if let Some(d) = kairos_timeout.or(sysrootwait) {
        req.timeout = d;
    }
    if let Some(d) = w.seconds(raw.take(Slot::RebootDelay), DEFAULT_REBOOT_DELAY) {
        req.reboot_delay = d;
    }
    req.boot_reason = w
        .value(raw.take(Slot::BootReason), "none")
        .map(|(_, v)| v.into_owned());
    if let Some((name, v)) = w.value(raw.take(Slot::StateUuid), "the first COS_STATE") {
        // What GRUB's `probe --fs-uuid` prints: hex digits and dashes.
        if !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            req.state_uuid = Some(v.to_ascii_lowercase());
        } else {
            w.push(name, format!("{v:?} is not a filesystem UUID; ignored"));
        }
    }

    if let Some((name, v)) = w.value(raw.take(Slot::FsckMode), "auto") {
        match &*v {
            "skip" => req.fsck = false,
            "auto" | "force" => {}
            _ => w.push(
                name,
                format!("{v:?} is not auto, force or skip; using auto"),
            ),
        }
    }

    if let Some((name, v)) = w.value(raw.take(Slot::Pause), "no pause") {
        req.pause = PausePoint::ALL.into_iter().find(|p| p.name() == v);
        if req.pause.is_none() {
            let known: Vec<&str> = PausePoint::ALL.iter().map(|p| p.name()).collect();
            w.push(
                name,
                format!("{v:?} is not one of {}; no pause", known.join(", ")),
            );
        }
    }

    for v in raw.consoles {
        let Some((_, v)) = w.value(Some(("console", v)), "no console") else {
            continue;
        };
        let dev = v.split(',').next().unwrap_or_default();
        if dev.is_empty() {
            w.push("console", format!("{v:?} names no device; ignored"));
        } else {
            req.consoles.push(dev.to_owned());
        }
    }

    (req, w.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "console=tty1 net.ifnames=1 rd.cos.oemlabel=COS_OEM rd.cos.oemtimeout=10 \
                        panic=5 rd.emergency=reboot rd.shell=0 systemd.crash_reboot=yes console=ttyS0";

    fn line(entry: &str) -> String {
        format!("BOOT_IMAGE=(loop0)/boot/vmlinuz {BASE} {entry}")
    }

    fn ok(s: &str) -> BootRequest {
        let (req, warnings) = parse(s);
        assert!(warnings.is_empty(), "{s}: {warnings:?}");
        req
    }

    /// Parse expecting exactly one warning, about `param`.
    fn warned(s: &str, param: &str) -> BootRequest {
        let (req, warnings) = parse(s);
        assert_eq!(warnings.len(), 1, "{s}: {warnings:?}");
        assert_eq!(warnings[0].param, param, "{s}: {warnings:?}");
        req
    }

    fn base_request() -> BootRequest {
        BootRequest {
            oem_timeout: Duration::from_secs(10),
            consoles: vec!["tty1".into(), "ttyS0".into()],
            ..BootRequest::default()
        }
    }

    #[test]
    fn state_uuid_from_grub() {
        let (req, w) = parse("rd.kairos.state_uuid=1B4E28BA-2FA1-11D2-883F-0016D3CCA427");
        assert_eq!(
            req.state_uuid.as_deref(),
            Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
        );
        assert!(w.is_empty(), "{w:?}");
        for bad in [
            "rd.kairos.state_uuid=",
            "rd.kairos.state_uuid",
            "rd.kairos.state_uuid=../x",
        ] {
            let (req, w) = parse(bad);
            assert_eq!(req.state_uuid, None, "{bad}");
            assert_eq!(w.len(), 1, "{bad}");
        }
        assert_eq!(parse("").0.state_uuid, None);
    }

    #[test]
    fn empty_is_default() {
        assert_eq!(ok(""), BootRequest::default());
        assert_eq!(ok("   \t\n"), BootRequest::default());
        let d = BootRequest::default();
        assert_eq!(d.mode, BootMode::Active);
        assert_eq!(d.oem_label, "COS_OEM");
        assert_eq!(d.timeout, Duration::from_secs(30));
        assert_eq!(d.reboot_delay, Duration::from_secs(10));
        assert!(d.fsck);
    }

    #[test]
    fn active_entry() {
        let req = ok(&line(
            "root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img",
        ));
        assert_eq!(
            req,
            BootRequest {
                mode: BootMode::Active,
                root: Some("LABEL=COS_ACTIVE".into()),
                root_label: Some("COS_ACTIVE".into()),
                image: Some("/cOS/active.img".into()),
                ..base_request()
            }
        );
    }

    #[test]
    fn passive_entry() {
        let req = ok(&line(
            "root=LABEL=COS_PASSIVE cos-img/filename=/cOS/passive.img upgrade_failure",
        ));
        assert_eq!(
            req,
            BootRequest {
                mode: BootMode::Passive,
                root: Some("LABEL=COS_PASSIVE".into()),
                root_label: Some("COS_PASSIVE".into()),
                image: Some("/cOS/passive.img".into()),
                ..base_request()
            }
        );
    }

    #[test]
    fn recovery_squashfs_entry() {
        let req = ok(&line(
            "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs",
        ));
        assert_eq!(
            req,
            BootRequest {
                mode: BootMode::Recovery,
                root: Some("live:LABEL=COS_RECOVERY".into()),
                live: Some(LiveSource {
                    device: "LABEL=COS_RECOVERY".into(),
                    dir: "/".into(),
                    squashimg: "/cOS/recovery.squashfs".into(),
                }),
                ..base_request()
            }
        );
    }

    #[test]
    fn recovery_img_entry() {
        let req = ok(&line(
            "root=LABEL=COS_SYSTEM cos-img/filename=/cOS/recovery.img",
        ));
        assert_eq!(
            req,
            BootRequest {
                mode: BootMode::Recovery,
                root: Some("LABEL=COS_SYSTEM".into()),
                root_label: Some("COS_SYSTEM".into()),
                image: Some("/cOS/recovery.img".into()),
                ..base_request()
            }
        );
    }

    #[test]
    fn statereset_entry() {
        let req = ok(&line(
            "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs kairos.reset",
        ));
        assert_eq!(req.mode, BootMode::Recovery);
        assert!(req.reset);
        assert_eq!(
            req.live.as_ref().map(|l| l.squashimg.as_str()),
            Some("/cOS/recovery.squashfs")
        );
        // kairos.reset is checked first, even against an active root.
        let req = ok("root=LABEL=COS_ACTIVE kairos.reset");
        assert_eq!((req.mode, req.reset), (BootMode::Recovery, true));
    }

    #[test]
    fn live_cd() {
        let req = ok(
            "BOOT_IMAGE=/boot/kernel console=tty1 console=ttyS0,115200n8 \
                      root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs \
                      rd.cos.disable cdroot install-mode nodepair.enable",
        );
        assert_eq!(
            req,
            BootRequest {
                mode: BootMode::Live,
                root: Some("live:CDLABEL=COS_LIVE".into()),
                live: Some(LiveSource {
                    device: "CDLABEL=COS_LIVE".into(),
                    dir: "/".into(),
                    squashimg: "rootfs.squashfs".into(),
                }),
                disable: true,
                consoles: vec!["tty1".into(), "ttyS0".into()],
                ..BootRequest::default()
            }
        );
        // Live defaults for dir and squashimg.
        let live = ok("root=live:LABEL=X").live;
        assert_eq!(
            live.map(|l| (l.dir, l.squashimg)),
            Some(("/".into(), "rootfs.squashfs".into()))
        );
        assert_eq!(ok("netboot").mode, BootMode::Live);
        assert_eq!(ok("recovery-mode").mode, BootMode::Recovery);
    }

    #[test]
    fn immucore_wins_over_cos_in_any_order() {
        for s in [
            "rd.immucore.oemlabel=A rd.cos.oemlabel=B",
            "rd.cos.oemlabel=B rd.immucore.oemlabel=A",
        ] {
            assert_eq!(ok(s).oem_label, "A", "{s}");
        }
        let req = ok(
            "rd.immucore.overlay=tmpfs:10% rd.cos.overlay=LABEL=X rd.cos.oemtimeout=3 \
                      rd.immucore.oemtimeout=7 rd.cos.oemtimeout=9",
        );
        assert_eq!(req.overlay, Some(Overlay::Tmpfs { size: "10%".into() }));
        assert_eq!(req.oem_timeout, Duration::from_secs(7));
        let req =
            ok("rd.cos.mount=LABEL=a:/a rd.immucore.mount=LABEL=b:/b rd.cos.mount=LABEL=c:/c");
        assert_eq!(
            req.extra_mounts,
            vec![("LABEL=b".to_owned(), "/b".to_owned())]
        );
        // rd.kairos.timeout beats sysrootwait in either order.
        assert_eq!(
            ok("rd.kairos.timeout=4 rd.immucore.sysrootwait=9").timeout,
            Duration::from_secs(4)
        );
        assert_eq!(
            ok("rd.immucore.sysrootwait=9 rd.kairos.timeout=4").timeout,
            Duration::from_secs(4)
        );
        assert_eq!(
            ok("rd.immucore.sysrootwait=9").timeout,
            Duration::from_secs(9)
        );
        assert!(ok("rd.immucore.debug").debug);
        assert!(ok("rd.kairos.debug").debug);
    }

    #[test]
    fn last_one_wins_and_mounts_accumulate() {
        let req = ok(
            "rd.cos.oemlabel=A rd.cos.oemlabel=B rd.cos.mount=LABEL=a:/mnt/a \
                      rd.cos.mount=UUID=1234:/mnt/b rd.cos.mount=LABEL=x:y:/mnt/c//",
        );
        assert_eq!(req.oem_label, "B");
        assert_eq!(
            req.extra_mounts,
            vec![
                ("LABEL=a".to_owned(), "/mnt/a".to_owned()),
                ("UUID=1234".to_owned(), "/mnt/b".to_owned()),
                ("LABEL=x:y".to_owned(), "/mnt/c".to_owned()),
            ]
        );
    }

    #[test]
    fn quotes_and_full_request() {
        let req = ok(
            r#"root="LABEL=COS_ACTIVE" "rd.cos.oemlabel=MY OEM" rd.kairos.boot_reason="after upgrade"
                       rd.kairos.init=/sbin/myinit rd.kairos.rebootdelay=0 fsck.mode=skip rd.cos.debugrw
                       rd.cos.overlay=UUID=abcd rd.kairos.debug=0"#,
        );
        assert_eq!(req.root_label.as_deref(), Some("COS_ACTIVE"));
        assert_eq!(req.oem_label, "MY OEM");
        assert_eq!(req.boot_reason.as_deref(), Some("after upgrade"));
        assert_eq!(req.init.as_deref(), Some("/sbin/myinit"));
        assert_eq!(req.reboot_delay, Duration::ZERO);
        assert!(!req.fsck);
        assert!(req.debugrw);
        assert!(!req.debug);
        assert_eq!(
            req.overlay,
            Some(Overlay::Device {
                spec: "UUID=abcd".into()
            })
        );
        // An unclosed quote swallows the rest, like the kernel.
        let req = ok(r#"rd.cos.oemlabel="A B rd.cos.oemtimeout=1"#);
        assert_eq!(req.oem_label, "A B rd.cos.oemtimeout=1");
        assert_eq!(req.oem_timeout, Duration::from_secs(5));
    }

    #[test]
    fn double_dash_ends_our_params() {
        let req = ok("root=LABEL=COS_PASSIVE -- rd.kairos.debug COS_ACTIVE kairos.reset");
        assert!(!req.debug);
        assert_eq!((req.mode, req.reset), (BootMode::Passive, false));
        // A quoted "--" is still a lone -- once quotes are removed, as in the kernel; but --x is not.
        assert!(!ok(r#""--" rd.kairos.debug"#).debug);
        assert!(ok("--x rd.kairos.debug").debug);
    }

    #[test]
    fn unknown_params_are_silent() {
        assert_eq!(
            ok("foo bar=baz = == =x init=/sbin/init quiet splash"),
            BootRequest::default()
        );
    }

    #[test]
    fn malformed_params_warn_and_keep_defaults() {
        let d = BootRequest::default();
        let secs = Duration::from_secs;
        assert_eq!(
            warned("rd.kairos.timeout=abc", "rd.kairos.timeout").timeout,
            d.timeout
        );
        assert_eq!(
            warned("rd.kairos.timeout=2.5", "rd.kairos.timeout").timeout,
            d.timeout
        );
        assert_eq!(
            warned("rd.kairos.timeout=+5", "rd.kairos.timeout").timeout,
            d.timeout
        );
        assert_eq!(
            warned("rd.kairos.timeout", "rd.kairos.timeout").timeout,
            d.timeout
        );
        assert_eq!(
            warned("rd.kairos.timeout=", "rd.kairos.timeout").timeout,
            d.timeout
        );
        assert_eq!(
            warned(
                "rd.kairos.timeout=99999999999999999999",
                "rd.kairos.timeout"
            )
            .timeout,
            d.timeout
        );
        assert_eq!(
            warned("rd.kairos.timeout=3601", "rd.kairos.timeout").timeout,
            secs(3600)
        );
        assert_eq!(ok("rd.kairos.timeout=3600").timeout, secs(3600));
        assert_eq!(
            warned("rd.cos.oemtimeout=-1", "rd.cos.oemtimeout").oem_timeout,
            d.oem_timeout
        );
        assert_eq!(
            warned("rd.immucore.sysrootwait=x", "rd.immucore.sysrootwait").timeout,
            d.timeout
        );
        assert_eq!(
            warned("rd.kairos.rebootdelay=1e3", "rd.kairos.rebootdelay").reboot_delay,
            d.reboot_delay
        );
        // A malformed rd.kairos.timeout falls back to a good sysrootwait, not the default.
        let (req, w) = parse("rd.immucore.sysrootwait=9 rd.kairos.timeout=x");
        assert_eq!((req.timeout, w.len()), (secs(9), 1));

        assert_eq!(
            warned("cos-img/filename=cOS/a.img", "cos-img/filename").image,
            None
        );
        assert_eq!(
            warned("cos-img/filename=/cOS/../a.img", "cos-img/filename").image,
            None
        );
        assert_eq!(warned("cos-img/filename", "cos-img/filename").image, None);
        assert_eq!(
            warned("rd.cos.overlay=tmpfs:huge", "rd.cos.overlay").overlay,
            None
        );
        assert_eq!(
            warned("rd.immucore.overlay=/dev/sdb", "rd.immucore.overlay").overlay,
            None
        );
        assert_eq!(warned("rd.cos.overlay", "rd.cos.overlay").overlay, None);
        assert!(
            warned("rd.cos.mount=LABEL=x", "rd.cos.mount")
                .extra_mounts
                .is_empty()
        );
        assert!(
            warned("rd.cos.mount=LABEL=x:mnt", "rd.cos.mount")
                .extra_mounts
                .is_empty()
        );
        assert!(
            warned("rd.cos.mount=:/mnt", "rd.cos.mount")
                .extra_mounts
                .is_empty()
        );
        assert!(
            warned("rd.cos.mount=LABEL=x:/", "rd.cos.mount")
                .extra_mounts
                .is_empty()
        );
        assert!(
            warned("rd.cos.mount=LABEL=x:/a/../b", "rd.cos.mount")
                .extra_mounts
                .is_empty()
        );
        assert!(
            warned("rd.cos.mount", "rd.cos.mount")
                .extra_mounts
                .is_empty()
        );
        assert_eq!(
            warned("rd.kairos.init=sbin/init", "rd.kairos.init").init,
            None
        );
        assert_eq!(warned("rd.kairos.init", "rd.kairos.init").init, None);
        let req = warned("root=", "root");
        assert_eq!((req.root, req.root_label), (None, None));
        assert_eq!(warned("root", "root").root, None);
        assert_eq!(warned("root=LABEL=", "root").root_label, None);
        assert_eq!(warned("root=live:", "root").live, None);
        assert_eq!(
            warned("rd.cos.oemlabel=", "rd.cos.oemlabel").oem_label,
            "COS_OEM"
        );
        assert!(!warned("rd.cos.debugrw=maybe", "rd.cos.debugrw").debugrw);
        assert!(warned("fsck.mode=sometimes", "fsck.mode").fsck);
        assert_eq!(
            warned("rd.kairos.boot_reason=", "rd.kairos.boot_reason").boot_reason,
            None
        );
        assert!(warned("console=,115200", "console").consoles.is_empty());
        assert!(warned("console", "console").consoles.is_empty());
        let live = warned("root=live:LABEL=X rd.live.squashimg=", "rd.live.squashimg").live;
        assert_eq!(live.map(|l| l.squashimg), Some("rootfs.squashfs".into()));
    }

    #[test]
    fn pause_points() {
        assert_eq!(
            ok("rd.kairos.pause=grow-entries").pause,
            Some(PausePoint::GrowEntries)
        );
        assert_eq!(
            ok("rd.kairos.pause=grow-gpt").pause,
            Some(PausePoint::GrowGpt)
        );
        assert_eq!(ok("").pause, None);
        assert_eq!(
            warned("rd.kairos.pause=grow", "rd.kairos.pause").pause,
            None
        );
        assert_eq!(warned("rd.kairos.pause", "rd.kairos.pause").pause, None);
        assert_eq!(warned("rd.kairos.pause=", "rd.kairos.pause").pause, None);
        let (_, w) = parse("rd.kairos.pause=later");
        assert_eq!(
            w[0].to_string(),
            "kernel parameter `rd.kairos.pause`: \"later\" is not one of grow-entries, grow-gpt; no pause"
        );
    }

    #[test]
    fn warning_display() {
        let (_, w) = parse("rd.kairos.timeout=abc");
        assert_eq!(
            w[0].to_string(),
            "kernel parameter `rd.kairos.timeout`: \"abc\" is not a whole number of seconds; using the default 30 s"
        );
    }

    /// xorshift64: deterministic pseudo-random input without a dependency.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn garbage_never_panics() {
        const PIECES: &[&str] = &[
            "root=",
            "live:",
            "LABEL=",
            "\"",
            "=",
            " ",
            "--",
            "rd.cos.mount=",
            ":/",
            "rd.immucore.",
            "rd.kairos.timeout=",
            "tmpfs:",
            "%",
            "console=",
            ",",
            "cos-img/filename=",
            "rd.cos.overlay=",
            "9999999999999999999999",
            "..",
        ];
        for seed in 1..=20u64 {
            let mut next = rng(seed);
            let printable: String = (0..8192)
                .map(|_| (b' ' + (next() % 95) as u8) as char)
                .collect();
            let bytes: Vec<u8> = (0..8192).map(|_| next() as u8).collect();
            let lossy = String::from_utf8_lossy(&bytes).into_owned();
            let mut mixed = String::new();
            while mixed.len() < 8192 {
                mixed.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
            for s in [&printable, &lossy, &mixed] {
                let (req, _) = parse(s);
                assert!(req.timeout <= Duration::from_secs(MAX_TIMEOUT_SECS));
                assert!(req.oem_timeout <= Duration::from_secs(MAX_TIMEOUT_SECS));
            }
        }
    }
}
