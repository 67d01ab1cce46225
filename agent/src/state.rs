//! `kairos-agent state`: what booted, why, the counters and the partitions, as one JSON object.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kairos_init::blockdev::{self, BlockDev};
use kairos_init::grubenv::{self, Counters, GrubEnv, var};
use kairos_init::labels;
use serde_json::{Map, Value, json};

use crate::{AgentError, Ctx, Outcome, load_env};

pub const TIMELINE: &str = "/run/kairos/boot-timeline.json";
pub const BOOT_IMAGE: &str = "/run/kairos/boot-image";
/// The timeline is a few KiB; anything much larger is not ours.
const MAX_TIMELINE_BYTES: u64 = 1 << 20;

const KAIROS_LABELS: &[&str] = &[
    labels::GRUB,
    labels::OEM,
    labels::RECOVERY,
    labels::STATE,
    labels::PERSISTENT,
    labels::ACTIVE,
    labels::PASSIVE,
    labels::SYSTEM,
];

pub fn state(
    ctx: &Ctx,
    pretty: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    let v = collect(ctx, err)?;
    let text = if pretty {
        serde_json::to_string_pretty(&v)
    } else {
        serde_json::to_string(&v)
    }
    .map_err(|e| AgentError::Output(e.into()))?;
    writeln!(out, "{text}").map_err(AgentError::Output)?;
    Ok(Outcome::Done)
}

/// The state object. Keys come out sorted (serde_json's map), so the output is stable.
pub fn collect(ctx: &Ctx, err: &mut dyn Write) -> Result<Value, AgentError> {
    let loaded = load_env(ctx, err)?;
    let reason = ctx.boot_reason();
    let mut s = Map::new();
    s.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    s.insert("mode".into(), json!(ctx.mode().unwrap_or("unknown")));
    s.insert("image".into(), json!(ctx.read_line(BOOT_IMAGE)));
    let entry = reason
        .as_deref()
        .map(|r| r.split_once(':').map_or(r, |(e, _)| e))
        .or(loaded.env.get(var::BOOT_ENTRY));
    s.insert("boot_entry".into(), json!(entry));
    s.insert("boot_reason".into(), json!(reason));
    match &loaded.problem {
        None => {
            s.insert("grubenv".into(), grubenv_json(&loaded.path, &loaded.env));
            s.insert(
                "boot_good".into(),
                json!(loaded.env.get(var::TENTATIVE) != Some("yes")),
            );
        }
        Some(e) => {
            s.insert("grubenv_error".into(), json!(e.to_string()));
            s.insert("boot_good".into(), Value::Null);
        }
    }
    s.insert("partitions".into(), partitions(ctx));
    match timeline(ctx) {
        Ok(t) => {
            s.insert("timeline".into(), t);
        }
        Err(e) => {
            s.insert("timeline".into(), Value::Null);
            s.insert("timeline_error".into(), json!(e));
        }
    }
    Ok(Value::Object(s))
}

fn grubenv_json(path: &Path, env: &GrubEnv) -> Value {
    let vars: Map<String, Value> = env.iter().map(|(k, v)| (k.into(), json!(v))).collect();
    let next = grubenv::grub_choice(env);
    let mut g = Map::new();
    g.insert("path".into(), json!(path.display().to_string()));
    g.insert("variables".into(), Value::Object(vars));
    g.insert("saved_entry".into(), json!(env.get(var::SAVED_ENTRY)));
    g.insert("next_entry".into(), json!(env.get(var::NEXT_ENTRY)));
    g.insert("last_entry".into(), json!(env.get(var::BOOT_ENTRY)));
    g.insert("last_reason".into(), json!(env.get(var::BOOT_REASON)));
    g.insert("next_boot".into(), json!(next.to_string()));
    match Counters::from_env(env) {
        Ok(c) => {
            g.insert("armed".into(), json!(c.armed));
            g.insert("tries_cos".into(), json!(c.tries_cos));
            g.insert("tries_fallback".into(), json!(c.tries_fallback));
            g.insert("max_tries".into(), json!(c.max));
            g.insert("tentative".into(), json!(c.tentative));
        }
        Err(e) => {
            g.insert("counters_error".into(), json!(e.to_string()));
        }
    }
    Value::Object(g)
}

/// The Kairos label of a device: its filesystem label, else the one its GPT name stands for
/// (a partition whose filesystem could not be probed).
fn kairos_label(d: &BlockDev) -> Option<&'static str> {
    let fs_label = d.fs.as_ref().and_then(|f| f.label.as_deref());
    if let Some(k) = KAIROS_LABELS.iter().find(|k| Some(**k) == fs_label) {
        return Some(k);
    }
    let part = d.partname.as_deref()?;
    KAIROS_LABELS
        .iter()
        .copied()
        .find(|l| labels::gpt_name_for(l) == Some(part))
}

fn partitions(ctx: &Ctx) -> Value {
    // The boot disk's, as kairos-init and upgrade/reset choose them; not another disk's.
    let devs = blockdev::scan_boot_disk(&ctx.root).devices;
    let mounts = std::fs::read_to_string(ctx.path("/proc/self/mounts"))
        .map(|t| parse_mounts(&t))
        .unwrap_or_default();
    let list = devs
        .iter()
        .filter_map(|d| {
            let label = kairos_label(d)?;
            let device = inside_root(ctx, &d.devnode);
            let mountpoints: Vec<&str> = mounts
                .iter()
                .filter(|(src, _)| same_device(ctx, src, &device, &d.devnode))
                .map(|(_, target)| target.as_str())
                .collect();
            Some(json!({
                "label": label,
                "device": device,
                "fstype": d.fs.as_ref().map(|f| f.fstype.name()),
                "gpt_name": d.partname,
                "mountpoints": mountpoints,
            }))
        })
        .collect();
    Value::Array(list)
}

/// `p` as the running system names it (without the --root prefix).
fn inside_root(ctx: &Ctx, p: &Path) -> String {
    match p.strip_prefix(&ctx.root) {
        Ok(rel) if ctx.root != Path::new("/") => format!("/{}", rel.display()),
        _ => p.display().to_string(),
    }
}

/// A mount source names the device directly or through a link (/dev/disk/by-label/...).
fn same_device(ctx: &Ctx, source: &str, device: &str, devnode: &Path) -> bool {
    if source == device {
        return true;
    }
    if !source.starts_with('/') {
        return false;
    }
    match (
        std::fs::canonicalize(ctx.path(source)),
        std::fs::canonicalize(devnode),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// (source, mount point) of each /proc/self/mounts line: kairos-init's one mount-table
/// parser, re-exported for the agent's callers.
pub use kairos_init::mountinfo::parse_mounts;

/// kairos-init's timeline, embedded as JSON; Ok(null) when there is none (not booted by it).
fn timeline(ctx: &Ctx) -> Result<Value, String> {
    let path: PathBuf = ctx.path(TIMELINE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Value::Null),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_TIMELINE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    fn state_of(t: &Tree) -> (Value, String) {
        let (r, out, err) = run(|o, e| state(&t.ctx, false, o, e));
        assert_eq!(r.unwrap(), Outcome::Done);
        assert_eq!(out.lines().count(), 1, "one line of JSON: {out}");
        (serde_json::from_str(&out).unwrap(), err)
    }

    /// A fake block device: sysfs entry plus a device node holding an ext4 superblock.
    fn disk(t: &Tree, name: &str, partname: Option<&str>, label: Option<&str>) {
        let sys = format!("/sys/class/block/{name}");
        t.file(&format!("{sys}/size"), "2048\n");
        let mut uevent = format!("DEVNAME={name}\nDEVTYPE=partition\n");
        if let Some(p) = partname {
            uevent.push_str(&format!("PARTNAME={p}\n"));
        }
        t.file(&format!("{sys}/uevent"), uevent);
        let mut node = vec![0u8; 4096];
        if let Some(l) = label {
            node[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
            node[1024 + 0x60..1024 + 0x64].copy_from_slice(&0x40u32.to_le_bytes());
            node[1024 + 120..1024 + 120 + l.len()].copy_from_slice(l.as_bytes());
        }
        t.file(&format!("/dev/{name}"), node);
    }

    #[test]
    fn a_counted_active_boot() {
        let t = Tree::new();
        t.file("/run/cos/active_mode", "");
        t.file(
            BOOT_IMAGE,
            "active image /cOS/active.img on LABEL=COS_STATE\n",
        );
        t.cmdline("root=LABEL=COS_ACTIVE cos-img/filename=/cOS/active.img rd.kairos.boot_reason=cos:counted-try");
        t.env(&[
            ("enable_boot_assessment", "yes"),
            ("kairos_max_tries", "3"),
            ("kairos_tries_cos", "2"),
            ("kairos_tries_fallback", "3"),
            ("boot_assessment_tentative", "yes"),
            ("kairos_boot_entry", "cos"),
            ("kairos_boot_reason", "counted-try"),
        ]);
        t.file(
            TIMELINE,
            r#"{"steps":[{"name":"modules","parent":null,"start_ms":1.0,"duration_ms":2.5}]}"#,
        );
        let (s, err) = state_of(&t);
        assert_eq!(err, "");
        assert_eq!(s["mode"], "active");
        assert_eq!(
            s["image"],
            "active image /cOS/active.img on LABEL=COS_STATE"
        );
        assert_eq!(s["boot_reason"], "cos:counted-try");
        assert_eq!(s["boot_entry"], "cos");
        assert_eq!(s["boot_good"], false);
        let g = &s["grubenv"];
        assert_eq!(g["armed"], true);
        assert_eq!(g["tries_cos"], 2);
        assert_eq!(g["tries_fallback"], 3);
        assert_eq!(g["max_tries"], 3);
        assert_eq!(g["tentative"], true);
        assert_eq!(g["next_boot"], "cos:counted-try");
        assert_eq!(g["last_reason"], "counted-try");
        assert_eq!(g["variables"]["kairos_tries_cos"], "2");
        assert_eq!(s["timeline"]["steps"][0]["name"], "modules");
        assert!(s.get("grubenv_error").is_none());
        assert_eq!(s["partitions"], json!([]));
    }

    #[test]
    fn nothing_known() {
        let t = Tree::new();
        let (s, err) = state_of(&t);
        assert_eq!(s["mode"], "unknown");
        assert_eq!(s["image"], Value::Null);
        assert_eq!(s["boot_reason"], Value::Null);
        assert_eq!(s["boot_entry"], Value::Null);
        assert_eq!(s["timeline"], Value::Null);
        assert_eq!(s["boot_good"], Value::Null);
        assert!(
            s["grubenv_error"]
                .as_str()
                .unwrap()
                .contains("No such file")
        );
        assert!(err.starts_with("kairos-agent: warning: "), "{err}");
    }

    #[test]
    fn corrupt_grubenv_is_reported_not_touched() {
        let t = Tree::new();
        t.file("/run/cos/passive_mode", "");
        t.cmdline("rd.kairos.boot_reason=fallback:cos-tries-exhausted");
        let mut block = grubenv::GrubEnv::default()
            .to_block(Path::new("x"))
            .unwrap()
            .to_vec();
        block.truncate(1000);
        t.file("/oem/grubenv", &block);
        let (s, err) = state_of(&t);
        let gp = t.ctx.grubenv_path();
        assert_eq!(
            s["grubenv_error"],
            format!(
                "{}: 1000 bytes, a GRUB environment block is exactly 1024",
                gp.display()
            )
        );
        assert!(err.contains(&gp.display().to_string()), "{err}");
        assert_eq!(s["mode"], "passive");
        assert_eq!(s["boot_entry"], "fallback");
        assert_eq!(std::fs::read(&gp).unwrap(), block);
    }

    #[test]
    fn boot_entry_falls_back_to_the_grubenv_and_bad_counters_are_named() {
        let t = Tree::new();
        t.env(&[("kairos_boot_entry", "fallback"), ("kairos_tries_cos", "x")]);
        let (s, _) = state_of(&t);
        assert_eq!(s["boot_entry"], "fallback");
        assert_eq!(s["boot_good"], true);
        assert_eq!(
            s["grubenv"]["counters_error"],
            "kairos_tries_cos=\"x\": expected one digit 0..9"
        );
    }

    #[test]
    fn bad_timeline_is_an_error_field() {
        let t = Tree::new();
        t.file(TIMELINE, "{not json");
        let (s, _) = state_of(&t);
        assert_eq!(s["timeline"], Value::Null);
        assert!(
            s["timeline_error"]
                .as_str()
                .unwrap()
                .contains("boot-timeline.json")
        );
    }

    #[test]
    fn partitions_with_labels_devices_and_mount_points() {
        let t = Tree::new();
        disk(&t, "vda1", Some("efi"), None);
        disk(&t, "vda2", Some("oem"), Some("COS_OEM"));
        disk(&t, "vda4", Some("state"), Some("COS_STATE"));
        disk(&t, "vda5", Some("data"), Some("OTHER"));
        disk(&t, "loop0", None, Some("COS_ACTIVE"));
        // A by-label link, as udev would make, named by a mount.
        std::fs::create_dir_all(t.ctx.path("/dev/disk/by-label")).unwrap();
        std::os::unix::fs::symlink("../../vda4", t.ctx.path("/dev/disk/by-label/COS_STATE"))
            .unwrap();
        t.file(
            "/proc/self/mounts",
            "/dev/loop0 / ext4 ro 0 0\n\
             /dev/vda2 /oem ext4 rw 0 0\n\
             /dev/vda2 /mnt/my\\040oem ext4 rw 0 0\n\
             /dev/disk/by-label/COS_STATE /run/initramfs/cos-state ext4 ro 0 0\n\
             proc /proc proc rw 0 0\n",
        );
        let (s, _) = state_of(&t);
        assert_eq!(
            s["partitions"],
            json!([
                {"label": "COS_ACTIVE", "device": "/dev/loop0", "fstype": "ext4",
                 "gpt_name": null, "mountpoints": ["/"]},
                {"label": "COS_GRUB", "device": "/dev/vda1", "fstype": null,
                 "gpt_name": "efi", "mountpoints": []},
                {"label": "COS_OEM", "device": "/dev/vda2", "fstype": "ext4",
                 "gpt_name": "oem", "mountpoints": ["/oem", "/mnt/my oem"]},
                {"label": "COS_STATE", "device": "/dev/vda4", "fstype": "ext4",
                 "gpt_name": "state", "mountpoints": ["/run/initramfs/cos-state"]},
            ])
        );
    }

    #[test]
    fn mounts_unescape() {
        assert_eq!(
            parse_mounts("a\\040b /x\\011y\\134z t o 0 0\nshort\n\\08 /\\400 x"),
            [
                ("a b".to_string(), "/x\ty\\z".to_string()),
                ("\\08".to_string(), "/\\400".to_string())
            ]
        );
    }

    #[test]
    fn pretty_output_is_the_same_object() {
        let t = Tree::new();
        t.env(&[]);
        let (r, out, _) = run(|o, e| state(&t.ctx, true, o, e));
        r.unwrap();
        assert!(out.lines().count() > 5);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["grubenv"]["next_boot"], "cos:default");
    }
}
