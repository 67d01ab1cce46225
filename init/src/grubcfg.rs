//! The Kairos grub.cfg (SPEC §2, §4): the entries `cos`, `fallback`, `recovery`, `statereset`,
//! the environment files, and the boot-assessment decision (counters per entry, saved by GRUB
//! before each counted try). Pure text generation, shared by `kairos-qemu disk` and the agent's
//! install; the variable names and reasons are those of [`crate::grubenv`].

use crate::grubenv::reason;

/// COS_STATE's GRUB directory (grub.cfg, the modules), relative to the partition's root.
pub const GRUB_DIR: &str = "grub2";

/// The prefix baked into a BIOS core.img on the Kairos layout: COS_STATE's [`GRUB_DIR`] on
/// partition 4 of the disk the BIOS loaded GRUB from.
pub const GRUB_PREFIX: &str = "(hd0,gpt4)/grub2";

/// [`GRUB_PREFIX`] for COS_STATE as partition `state_partition` (5 behind a hybrid disk's ESP).
pub fn grub_prefix(state_partition: u32) -> String {
    format!("(hd0,gpt{state_partition})/{GRUB_DIR}")
}

/// ext4 features GRUB 2.06 cannot read: a filesystem GRUB loads from is made without them
/// (`mkfs.ext4 -O ^feature`, when this e2fsprogs knows them).
pub const EXT4_FEATURES_GRUB_CANNOT_READ: &[&str] = &["metadata_csum_seed", "orphan_file"];

/// Kernel arguments every entry gets (SPEC §2; no `quiet`, ttyS0 last so it is /dev/console).
pub const BASE_CMDLINE: &str = "console=tty1 console=ttyS0,115200 net.ifnames=1 rd.cos.oemlabel=COS_OEM rd.cos.oemtimeout=10 panic=5 rd.emergency=reboot rd.shell=0 systemd.crash_reboot=yes";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubCfgOptions {
    /// Menu timeout in seconds (tests use 0).
    pub timeout: u32,
    /// Appended to the base command line of every entry.
    pub extra_cmdline: String,
}

impl Default for GrubCfgOptions {
    fn default() -> Self {
        Self {
            timeout: 1,
            extra_cmdline: String::new(),
        }
    }
}

/// Modules our configs (COS_STATE's grub.cfg, [`grub_cfg`], and the ESP stub) use on every
/// platform. Built into the image GRUB starts from, so nothing is read from disk; the one list
/// both platforms take it from, so a module a config starts using is added once.
pub const CFG_MODULES: &[&str] = &[
    "part_gpt",
    "ext2",
    "normal",
    "configfile",
    "loadenv",
    "test",
    "echo",
    "linux",
    "serial",
    "terminal",
    "loopback",
    "squash4",
    "search",
    "search_label",
    "regexp",
    "probe",
    "boot",
    "cat",
    "ls",
    "sleep",
    "halt",
    "reboot",
];

/// What BOOTX64.EFI needs besides [`CFG_MODULES`] (x86_64-efi names): the ESP's filesystem,
/// the firmware's console and graphics, the stub's `search --fs-uuid`.
pub const EFI_PLATFORM_MODULES: &[&str] = &[
    "fat",
    "terminfo",
    "search_fs_uuid",
    "gzio",
    "all_video",
    "efi_gop",
];

/// The modules of `lists`, in order, that exist as `NAME.mod` in GRUB's module directory
/// `dir`: a name the GRUB at hand lacks is dropped.
pub fn modules_in(dir: &std::path::Path, lists: &[&[&'static str]]) -> Vec<&'static str> {
    lists
        .iter()
        .flat_map(|l| l.iter().copied())
        .filter(|m| dir.join(format!("{m}.mod")).exists())
        .collect()
}

/// [`EFI_PLATFORM_MODULES`] and [`CFG_MODULES`] present in GRUB's x86_64-efi directory `dir`.
pub fn efi_modules_in(dir: &std::path::Path) -> Vec<&'static str> {
    modules_in(dir, &[EFI_PLATFORM_MODULES, CFG_MODULES])
}

/// Menu entry ids GRUB picks from (SPEC §4).
pub use crate::grubenv::ENTRIES as ENTRY_IDS;

/// Highest counter value GRUB can count down from: GRUB script has no
/// arithmetic, so each value is a branch of an if/elif chain.
pub const MAX_TRIES: u32 = 9;

/// Splits a kernel command line the way the kernel does (whitespace outside
/// double quotes separates; the quotes themselves go) and renders each
/// argument as one GRUB word. GRUB's `linux` puts double quotes back around
/// arguments containing spaces, so `a="b c"` reaches the kernel intact.
fn grub_words(cmdline: &str) -> Vec<String> {
    crate::cmdline::words(cmdline)
        .map(|a| grub_quote(&a))
        .collect()
}

/// GRUB's menu on the first serial port (what boot tests read) and the screen, at the speed
/// of the kernel's `console=ttyS0,115200`.
const GRUB_CONSOLE: &str =
    "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console";

/// `cmdline`'s [`grub_words`], each after a space: what goes after the fixed arguments of a
/// `linux` line.
fn grub_args(cmdline: &str) -> String {
    grub_words(cmdline)
        .iter()
        .map(|w| format!(" {w}"))
        .collect()
}

/// Quotes a word for GRUB script only when it has characters GRUB would interpret.
fn grub_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.,:/=+-@%^~".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

struct Entry {
    id: &'static str,
    title_suffix: &'static str,
    /// Variable holding the partition the image is on (`state` is set globally).
    image: &'static str,
    loopdev: &'static str,
    cmdline: &'static str,
    extra_var: &'static str,
}

// Each entry has its own loop device: GRUB 2.06 refuses to re-create an existing
// name ("device name already exists"), so a fallback entry reusing loop0 would
// read the broken image the failed entry had attached.
const ENTRIES: &[Entry] = &[
    Entry {
        id: "cos",
        title_suffix: "",
        image: "/cOS/active.img",
        loopdev: "loop0",
        cmdline: "root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img",
        extra_var: "extra_active_cmdline",
    },
    Entry {
        id: "fallback",
        title_suffix: " (fallback)",
        image: "/cOS/passive.img",
        loopdev: "loop1",
        cmdline: "root=LABEL=COS_PASSIVE cos-img/filename=/cOS/passive.img",
        extra_var: "extra_passive_cmdline",
    },
    Entry {
        id: "recovery",
        title_suffix: " recovery",
        image: "(${recroot})/cOS/recovery.squashfs",
        loopdev: "loop2",
        cmdline: "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs",
        extra_var: "extra_recovery_cmdline",
    },
    Entry {
        id: "statereset",
        title_suffix: " state reset (auto)",
        image: "(${recroot})/cOS/recovery.squashfs",
        loopdev: "loop3",
        cmdline: "root=live:LABEL=COS_RECOVERY rd.live.dir=/ rd.live.squashimg=/cOS/recovery.squashfs kairos.reset",
        extra_var: "extra_recovery_cmdline",
    },
];

/// Emits `set kairos_dec=<var - 1>` when `var` holds 1..=9, else leaves
/// `kairos_dec` empty: 0, unset and garbage all count as no tries left.
fn decrement_chain(var: &str, indent: &str) -> String {
    let mut s = format!("{indent}set kairos_dec=\n");
    for n in 1..=MAX_TRIES {
        let kw = if n == 1 { "if" } else { "elif" };
        s.push_str(&format!(
            "{indent}{kw} [ \"${{{var}}}\" = {n} ]; then\n{indent}  set kairos_dec={}\n",
            n - 1
        ));
    }
    s.push_str(&format!("{indent}fi\n"));
    s
}

/// The part of grub.cfg that decides what to boot, given the variables
/// `load_env` set, `env_file` (the block to save to) and `env_ok` (non-empty
/// when that block loaded). Sets `kairos_boot_entry` and `kairos_boot_reason`,
/// saves the counters before a counted try, clears a used `next_entry`.
/// Sourceable on its own, which the decision tests in QEMU rely on.
pub fn decision_script() -> String {
    let cos_chain = decrement_chain("kairos_tries_cos", "      ");
    let fallback_chain = decrement_chain("kairos_tries_fallback", "        ");
    format!(
        r#"# Which entry, and why: saved below, and passed as rd.kairos.boot_reason=<entry>:<reason>.
set kairos_boot_entry=
set kairos_boot_reason=
if [ -n "${{next_entry}}" ]; then
  # One-shot: honoured only once clearing it on disk worked, so it cannot stick.
  set kairos_next="${{next_entry}}"
  set next_entry=
  if [ -n "${{env_ok}}" ]; then
    if save_env -f "${{env_file}}" next_entry; then
      set kairos_boot_entry="${{kairos_next}}"
      set kairos_boot_reason={next_entry}
    fi
  fi
  if [ -z "${{kairos_boot_entry}}" ]; then
    echo "KAIROS-GRUB: ignoring next_entry=${{kairos_next}}: cannot clear it"
  fi
fi
# Boot assessment: each try is counted down and saved before it boots; active's
# tries first, then passive's, then recovery. Counters hold 0..{max}; anything else is 0.
if [ -z "${{kairos_boot_entry}}" ]; then
  if [ -n "${{env_ok}}" ]; then
    if [ "${{enable_boot_assessment}}" = yes ]; then
{cos_chain}      if [ -n "${{kairos_dec}}" ]; then
        set kairos_tries_cos="${{kairos_dec}}"
        set kairos_boot_entry=cos
        set kairos_boot_reason={counted}
      else
{fallback_chain}        if [ -n "${{kairos_dec}}" ]; then
          set kairos_tries_fallback="${{kairos_dec}}"
          set kairos_boot_entry=fallback
          set kairos_boot_reason={cos_exhausted}
        else
          set kairos_boot_entry=recovery
          set kairos_boot_reason={all_exhausted}
        fi
      fi
      if [ "${{kairos_boot_reason}}" != {all_exhausted} ]; then
        set boot_assessment_tentative=yes
        set kairos_saved=
        if save_env -f "${{env_file}}" kairos_tries_cos kairos_tries_fallback boot_assessment_tentative; then
          set kairos_saved=yes
        fi
        if [ -z "${{kairos_saved}}" ]; then
          # An uncounted try could repeat forever: recovery instead.
          echo "KAIROS-GRUB: cannot save the boot counters: booting recovery"
          set kairos_boot_entry=recovery
          set kairos_boot_reason={unwritable}
        fi
      fi
    fi
  fi
fi
if [ -z "${{kairos_boot_entry}}" ]; then
  if [ -n "${{saved_entry}}" ]; then
    set kairos_boot_entry="${{saved_entry}}"
    set kairos_boot_reason={saved}
  else
    set kairos_boot_entry=cos
    set kairos_boot_reason={default}
  fi
fi
if [ -n "${{env_ok}}" ]; then
  save_env -f "${{env_file}}" kairos_boot_entry kairos_boot_reason
fi
# (GRUB wraps serial output at 80 columns: each echo stays shorter.)
echo "KAIROS-GRUB: chose ${{kairos_boot_entry}}:${{kairos_boot_reason}}"
echo "KAIROS-GRUB: tries cos=${{kairos_tries_cos}} fallback=${{kairos_tries_fallback}} tentative=${{boot_assessment_tentative}}"
"#,
        max = MAX_TRIES,
        next_entry = reason::NEXT_ENTRY,
        counted = reason::COUNTED_TRY,
        cos_exhausted = reason::COS_TRIES_EXHAUSTED,
        all_exhausted = reason::ALL_TRIES_EXHAUSTED,
        unwritable = reason::GRUBENV_UNWRITABLE,
        saved = reason::SAVED_ENTRY,
        default = reason::DEFAULT,
    )
}

/// GRUB script defining `kairos_scan`: the first partition of the disk `${kairos_disk}`
/// carrying each Kairos label, in `kairos_state`, `kairos_oem` and `kairos_recovery`
/// (GRUB device names without parentheses). Partitions of other disks are never looked at.
fn scan_function() -> String {
    r#"function kairos_scan {
  set kairos_state=
  set kairos_oem=
  set kairos_recovery=
  for kairos_part in (${kairos_disk},*); do
    set kairos_label=
    set kairos_name=
    probe --set=kairos_label --label "${kairos_part}"
    regexp --set=1:kairos_name '^[(](.*)[)]$' "${kairos_part}"
    if [ "${kairos_label}" = COS_STATE ]; then
      if [ -z "${kairos_state}" ]; then set kairos_state="${kairos_name}"; fi
    elif [ "${kairos_label}" = COS_OEM ]; then
      if [ -z "${kairos_oem}" ]; then set kairos_oem="${kairos_name}"; fi
    elif [ "${kairos_label}" = COS_RECOVERY ]; then
      if [ -z "${kairos_recovery}" ]; then set kairos_recovery="${kairos_name}"; fi
    fi
  done
}
"#
    .to_string()
}

/// The ESP's grub.cfg (UEFI): `$root` starts at the ESP GRUB was loaded from; COS_STATE is
/// taken from that disk, from any disk (said on screen) only when it has none; then
/// COS_STATE's `grub2/grub.cfg` is loaded.
pub fn esp_grub_cfg() -> String {
    format!(
        r#"# Kairos ESP: COS_STATE from the disk this GRUB was loaded from.
set kairos_disk=
regexp --set=1:kairos_disk '^([^,]+)' "${{root}}"
{scan}kairos_scan
if [ -n "${{kairos_state}}" ]; then
  set root="${{kairos_state}}"
else
  echo "KAIROS-GRUB: no COS_STATE on ${{kairos_disk}}, the disk GRUB was loaded from: searching every disk"
  search --no-floppy --label --set=root COS_STATE
fi
set prefix=($root)/{GRUB_DIR}
configfile ($root)/{GRUB_DIR}/grub.cfg
"#,
        scan = scan_function()
    )
}

/// The part of grub.cfg that fixes the boot disk: the disk of `$root` (COS_STATE through
/// core.img's prefix under BIOS, the ESP stub's choice under UEFI). COS_STATE, COS_OEM and
/// COS_RECOVERY come from that disk only (`state`, `oem`, `recroot`); another disk's COS_STATE
/// is searched for only when the boot disk has none, and then its disk supplies the rest.
/// The kernel learns which COS_STATE it was through `rd.kairos.state_uuid` (`kairos_state_arg`).
pub fn boot_disk_script() -> String {
    format!(
        r#"# The boot disk: the one GRUB read this file from. Kairos partitions come from it only.
{scan}set kairos_disk=
regexp --set=1:kairos_disk '^([^,]+)' "${{root}}"
kairos_scan
if [ -z "${{kairos_state}}" ]; then
  echo "KAIROS-GRUB: no COS_STATE on ${{kairos_disk}}: searching every disk"
  set kairos_any=
  search --no-floppy --label --set=kairos_any COS_STATE
  set kairos_disk=
  regexp --set=1:kairos_disk '^([^,]+)' "${{kairos_any}}"
  if [ -n "${{kairos_disk}}" ]; then
    kairos_scan
  fi
fi
set state="${{kairos_state}}"
set oem="${{kairos_oem}}"
set recroot="${{kairos_recovery}}"
set kairos_state_uuid=
set kairos_state_arg=
if [ -n "${{state}}" ]; then
  set root="${{state}}"
  probe --set=kairos_state_uuid --fs-uuid "(${{state}})"
fi
if [ -n "${{kairos_state_uuid}}" ]; then
  set kairos_state_arg="rd.kairos.state_uuid=${{kairos_state_uuid}}"
fi
echo "KAIROS-GRUB: boot disk ${{kairos_disk}} state=${{state}} oem=${{oem}} recovery=${{recroot}}"
"#,
        scan = scan_function()
    )
}

/// The grub.cfg for `COS_STATE:/grub2/grub.cfg`. Prints `KAIROS-GRUB:` lines
/// on the console so boot tests can see what GRUB chose.
pub fn grub_cfg(opts: &GrubCfgOptions) -> String {
    let base = format!("{BASE_CMDLINE}{}", grub_args(&opts.extra_cmdline));
    let mut s = format!(
        r#"# Kairos GRUB configuration (generated by kairos-qemu).
{GRUB_CONSOLE}
echo "KAIROS-GRUB: start"
set timeout={timeout}
set timeout_style=menu

{boot_disk}
# Environment: COS_STATE:/grub_oem_env first, then COS_OEM:/grubenv, whose values win.
# A grubenv that does not load (garbage, cut before its header) is neither used nor written.
if [ -f /grub_oem_env ]; then
  load_env -f /grub_oem_env
fi
set env_file=
set env_ok=
if [ -n "${{oem}}" ]; then
  if [ -f "(${{oem}})/grubenv" ]; then
    set env_file="(${{oem}})/grubenv"
    if load_env -f "${{env_file}}"; then
      set env_ok=yes
    else
      echo "KAIROS-GRUB: invalid ${{env_file}}: not using it"
    fi
  fi
fi

{decision}
set default="${{kairos_boot_entry}}"
# Entries GRUB cannot load fall through to the others (0 cos, 1 fallback, 2 recovery),
# never back to the one that failed.
if [ -n "${{default_fallback}}" ]; then
  set fallback="${{default_fallback}}"
elif [ "${{kairos_boot_entry}}" = cos ]; then
  set fallback="1 2"
elif [ "${{kairos_boot_entry}}" = fallback ]; then
  set fallback="2 0"
elif [ "${{kairos_boot_entry}}" = recovery ]; then
  set fallback="0 1"
elif [ "${{kairos_boot_entry}}" = statereset ]; then
  set fallback="2 0 1"
else
  set fallback="0 1 2"
fi
set menu_title=Kairos
if [ -n "${{default_menu_entry}}" ]; then
  set menu_title="${{default_menu_entry}}"
fi
# Menu entries run in a new context that sees only exported variables.
export kairos_boot_entry
export kairos_boot_reason
export recroot
export kairos_state_arg
export extra_cmdline
export extra_active_cmdline
export extra_passive_cmdline
export extra_recovery_cmdline
echo "KAIROS-GRUB: default=${{default}} fallback=${{fallback}}"
"#,
        timeout = opts.timeout,
        decision = decision_script(),
        boot_disk = boot_disk_script(),
    );
    for e in ENTRIES {
        s.push_str(&format!(
            r#"
menuentry "${{menu_title}}{suffix}" --id {id} {{
  set kairos_reason="${{kairos_boot_reason}}"
  if [ "${{kairos_boot_entry}}" != {id} ]; then
    set kairos_reason={menu}
  fi
  echo "KAIROS-GRUB: entry={id} reason=${{kairos_reason}}"
  loopback {dev} {image}
  linux ({dev})/boot/vmlinuz {base} {cmdline} rd.kairos.boot_reason={id}:${{kairos_reason}} ${{kairos_state_arg}} ${{extra_cmdline}} ${{{extra}}}
  initrd ({dev})/boot/initrd
}}
"#,
            suffix = e.title_suffix,
            id = e.id,
            menu = reason::MENU,
            dev = e.loopdev,
            image = e.image,
            cmdline = e.cmdline,
            extra = e.extra_var,
        ));
    }
    s.push_str(
        r#"
# Site additions on COS_STATE, as upstream.
if [ -f /grubcustom ]; then
  source /grubcustom
fi
if [ -f /grubmenu ]; then
  source /grubmenu
fi
"#,
    );
    s
}

// ---- Live media (`kairos-build iso`) ----

/// What a live medium's GRUB needs besides [`CFG_MODULES`] and its platform's list: the ISO's
/// filesystem, the MBR the hybrid image carries for USB sticks, the UUID search that finds the
/// medium. Names exist for both i386-pc and x86_64-efi.
pub const LIVE_MODULES: &[&str] = &["iso9660", "part_msdos", "search_fs_uuid"];

/// Where the live medium keeps GRUB's configuration (the same directory name as COS_STATE's).
pub const LIVE_GRUB_DIR: &str = "/boot/grub2";
/// The kernel and initramfs on the medium (upstream Kairos ISOs use these names).
pub const LIVE_KERNEL: &str = "/boot/kernel";
pub const LIVE_INITRD: &str = "/boot/initrd";
/// The image's root tree on the medium (`rd.live.squashimg`, relative to `rd.live.dir=/`).
pub const LIVE_SQUASHFS: &str = "rootfs.squashfs";

/// The live entries' menu ids: the default live system (`install-mode`: pairing by QR code),
/// the live system without pairing, and the unattended install.
pub mod live_entry {
    pub const LIVE: &str = "live";
    pub const NO_PAIRING: &str = "live-nopair";
    pub const INSTALL: &str = "install";
}

/// The command line words that make the unattended install: the agent reads configuration
/// keys from the command line as `kairos.config=KEY=VALUE` (SPEC §2), merged last.
pub const LIVE_INSTALL_ARGS: &str = "kairos.config=install.auto=true";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCfgOptions {
    /// The ISO's volume id, which `root=live:CDLABEL=` names.
    pub label: String,
    pub timeout: u32,
    /// Appended to every entry's command line.
    pub extra_cmdline: String,
}

/// The base command line of every live entry (before `install-mode` and the extras).
pub fn live_cmdline(label: &str) -> String {
    format!(
        "root=live:CDLABEL={label} rd.live.dir=/ rd.live.squashimg={LIVE_SQUASHFS} rd.cos.disable console=tty1 console=ttyS0,115200"
    )
}

/// The configuration built into the medium's BOOTX64.EFI and El Torito core image, run before
/// any menu: it points `root` at the medium (the ISO's UUID, i.e. its modification date as
/// xorriso set it; the volume label only when no filesystem has that UUID) and `prefix` at
/// [`LIVE_GRUB_DIR`], whose grub.cfg GRUB's normal mode then reads. GRUB runs this file with
/// its rescue parser (no `if`), so the fallback comes first and the UUID search, when it
/// succeeds, overrides it.
pub fn live_early_cfg(iso_uuid: &str, label: &str) -> String {
    format!(
        "search --no-floppy --label --set=root {label}\nsearch --no-floppy --fs-uuid --set=root {iso_uuid}\nset prefix=($root){LIVE_GRUB_DIR}\n"
    )
}

/// The medium's `/boot/grub2/grub.cfg`: menu on the serial port and the screen; the live
/// system by default, the live system without pairing, and the unattended install (chosen
/// once, from the menu, by whoever boots the medium).
pub fn live_grub_cfg(opts: &LiveCfgOptions) -> String {
    let extra = grub_args(&opts.extra_cmdline);
    let base = live_cmdline(&opts.label);
    let mut s = format!(
        r#"# Kairos live medium (generated by kairos-build iso).
{GRUB_CONSOLE}
echo "KAIROS-GRUB: live medium root=${{root}} platform=${{grub_platform}}"
set timeout={timeout}
set timeout_style=menu
set default={default}
"#,
        timeout = opts.timeout,
        default = live_entry::LIVE,
    );
    for (id, title, args) in [
        (live_entry::LIVE, "Kairos (live)", "install-mode"),
        (live_entry::NO_PAIRING, "Kairos (live, no pairing)", ""),
        (
            live_entry::INSTALL,
            "Install Kairos to disk (unattended)",
            &*format!("install-mode {LIVE_INSTALL_ARGS}"),
        ),
    ] {
        let args = if args.is_empty() {
            String::new()
        } else {
            format!(" {args}")
        };
        s.push_str(&format!(
            r#"
menuentry "{title}" --id {id} {{
  echo "KAIROS-GRUB: entry={id}"
  linux {LIVE_KERNEL} {base}{args}{extra}
  initrd {LIVE_INITRD}
}}
"#
        ));
    }
    s
}

/// A volume id `root=live:CDLABEL=` and GRUB can use unquoted: 1 to 32 characters of
/// A-Z, 0-9 and `_` (ISO 9660's d-characters). The reason when it is not one.
pub fn check_live_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("is empty".into());
    }
    if label.len() > 32 {
        return Err(format!(
            "is {} characters; an ISO 9660 volume id has at most 32",
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_'))
    {
        return Err(format!(
            "has {c:?}; an ISO 9660 volume id is made of A-Z, 0-9 and _"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GRUB's own parser accepts what we generate, when grub-script-check is installed.
    #[test]
    fn grub_script_check_accepts_the_configs() {
        let Ok(probe) = std::process::Command::new("grub-script-check")
            .arg("--help")
            .output()
        else {
            panic!(
                "grub-script-check not installed (`kairos-qemu setup` installs grub-common): a test that cannot run fails, it never passes"
            );
        };
        drop(probe);
        let dir = tempfile::tempdir().expect("test setup");
        for (name, text) in [
            ("grub.cfg", grub_cfg(&GrubCfgOptions::default())),
            ("esp.cfg", esp_grub_cfg()),
            (
                "live.cfg",
                live_grub_cfg(&LiveCfgOptions {
                    label: "COS_LIVE".into(),
                    timeout: 5,
                    extra_cmdline: "a=\"b c\"".into(),
                }),
            ),
            (
                "early.cfg",
                live_early_cfg("2026-12-07-02-50-40-00", "COS_LIVE"),
            ),
        ] {
            let f = dir.path().join(name);
            std::fs::write(&f, &text).expect("test setup");
            let out = std::process::Command::new("grub-script-check")
                .arg(&f)
                .output()
                .expect("grub-script-check runs");
            assert!(
                out.status.success(),
                "{name}: {}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn the_esp_takes_cos_state_from_its_own_disk() {
        let c = esp_grub_cfg();
        assert!(c.contains("regexp --set=1:kairos_disk '^([^,]+)' \"${root}\"\n"));
        assert!(c.contains(
            "kairos_scan\nif [ -n \"${kairos_state}\" ]; then\n  set root=\"${kairos_state}\"\n"
        ));
        assert!(c.ends_with("set prefix=($root)/grub2\nconfigfile ($root)/grub2/grub.cfg\n"));
    }

    #[test]
    fn words_are_quoted_for_grub() {
        assert_eq!(
            grub_words(r#" rd.kairos.debug  a="b c" x=$y it's "#),
            vec!["rd.kairos.debug", "'a=b c'", "'x=$y'", r"'it'\''s'"]
        );
        assert!(grub_words("").is_empty());
    }

    #[test]
    fn cfg_has_entries_and_cmdlines() {
        let cfg = grub_cfg(&GrubCfgOptions {
            timeout: 0,
            extra_cmdline: "rd.kairos.debug".into(),
        });
        assert!(cfg.contains("set timeout=0\n"));
        for id in ["cos", "fallback", "recovery", "statereset"] {
            assert!(cfg.contains(&format!("--id {id} {{")), "{id}");
            assert!(
                cfg.contains(&format!("rd.kairos.boot_reason={id}:${{kairos_reason}} ")),
                "{id}"
            );
            assert!(cfg.contains(&format!(
                "echo \"KAIROS-GRUB: entry={id} reason=${{kairos_reason}}\""
            )));
        }
        assert!(cfg.contains(&format!(
            "linux (loop0)/boot/vmlinuz {BASE_CMDLINE} rd.kairos.debug root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img rd.kairos.boot_reason=cos:${{kairos_reason}} ${{kairos_state_arg}} ${{extra_cmdline}} ${{extra_active_cmdline}}\n"
        )));
        assert!(cfg.contains("loopback loop2 (${recroot})/cOS/recovery.squashfs\n"));
        assert!(cfg.contains(
            "rd.live.squashimg=/cOS/recovery.squashfs kairos.reset rd.kairos.boot_reason=statereset:"
        ));
        assert!(!cfg.contains("quiet"));
        // Issue 15 item 2: no label is searched on every disk but COS_STATE, and that only
        // when the boot disk has none.
        assert_eq!(cfg.matches("search ").count(), 1, "{cfg}");
        assert!(cfg.contains("search --no-floppy --label --set=kairos_any COS_STATE\n"));
        assert!(cfg.contains("for kairos_part in (${kairos_disk},*); do\n"));
        assert!(
            cfg.contains("set kairos_state_arg=\"rd.kairos.state_uuid=${kairos_state_uuid}\"\n")
        );
        assert!(grub_cfg(&GrubCfgOptions::default()).contains("\nset timeout=1\n"));
    }
    #[test]
    fn the_live_config_boots_the_medium_s_squashfs() {
        let cfg = live_grub_cfg(&LiveCfgOptions {
            label: "COS_LIVE".into(),
            timeout: 5,
            extra_cmdline: "rd.kairos.debug a=\"b c\"".into(),
        });
        assert!(cfg.contains("\nset timeout=5\n"), "{cfg}");
        assert!(cfg.contains("\nset default=live\n"), "{cfg}");
        assert!(cfg.contains(
            "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
        ));
        let base = "root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs rd.cos.disable console=tty1 console=ttyS0,115200";
        assert!(cfg.contains(&format!(
            "menuentry \"Kairos (live)\" --id live {{\n  echo \"KAIROS-GRUB: entry=live\"\n  linux /boot/kernel {base} install-mode rd.kairos.debug 'a=b c'\n  initrd /boot/initrd\n}}\n"
        )), "{cfg}");
        assert!(cfg.contains(&format!(
            "--id live-nopair {{\n  echo \"KAIROS-GRUB: entry=live-nopair\"\n  linux /boot/kernel {base} rd.kairos.debug 'a=b c'\n"
        )), "{cfg}");
        assert!(cfg.contains(&format!(
            "menuentry \"Install Kairos to disk (unattended)\" --id install {{\n  echo \"KAIROS-GRUB: entry=install\"\n  linux /boot/kernel {base} install-mode kairos.config=install.auto=true rd.kairos.debug 'a=b c'\n"
        )), "{cfg}");
        assert_eq!(cfg.matches("menuentry ").count(), 3);
        // Only the install entry installs.
        assert_eq!(cfg.matches("install.auto").count(), 1);
        // No extras: no trailing space.
        let plain = live_grub_cfg(&LiveCfgOptions {
            label: "X".into(),
            timeout: 0,
            extra_cmdline: String::new(),
        });
        assert!(plain.contains("rd.live.squashimg=rootfs.squashfs rd.cos.disable console=tty1 console=ttyS0,115200 install-mode\n"), "{plain}");
        assert!(plain.contains("console=ttyS0,115200\n  initrd"), "{plain}");
    }

    #[test]
    fn the_early_config_finds_the_medium_by_uuid_then_label() {
        let c = live_early_cfg("2026-12-07-02-50-40-00", "COS_LIVE");
        assert_eq!(
            c,
            "search --no-floppy --label --set=root COS_LIVE\nsearch --no-floppy --fs-uuid --set=root 2026-12-07-02-50-40-00\nset prefix=($root)/boot/grub2\n"
        );
        // The rescue parser runs it: plain commands only.
        assert!(!c.contains("if ") && !c.contains("fi\n"));
    }

    #[test]
    fn live_labels_are_iso9660_volume_ids() {
        for ok in ["COS_LIVE", "A", "KAIROS_2_0", &"X".repeat(32)] {
            assert_eq!(check_live_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "cos_live",
            "COS-LIVE",
            "COS LIVE",
            "COS\"LIVE",
            "É",
            &"X".repeat(33),
        ] {
            assert!(check_live_label(bad).is_err(), "{bad}");
        }
        assert!(
            check_live_label(&"X".repeat(33))
                .unwrap_err()
                .contains("33 characters")
        );
        assert!(check_live_label("a").unwrap_err().contains("'a'"));
    }
}
