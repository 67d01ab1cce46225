//! `kairos-agent state`: what booted, why, the counters and the partitions, as one JSON object;
//! `state get KEY` prints one value of it (a dotted path, as `config get`). Besides our own
//! keys the object carries upstream's (kairos-sdk's runtime state) so scripts written for
//! Kairos work: `boot` (active_boot, passive_boot, recovery_boot, autoreset_boot,
//! livecd_boot, unknown), `uuid`, `oem`/`state`/`recovery`/`persistent` (found, mounted,
//! mount_point, name, label, filesystemlabel, type, read_only, size_bytes, uuid) and
//! `kairos` (version, flavor, flavor_release, init).

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

/// `kairos-agent state`'s arguments.
#[derive(Debug, clap::Args)]
pub struct StateArgs {
    /// Indented, several lines
    #[arg(long)]
    pub pretty: bool,
    #[command(subcommand)]
    pub action: Option<StateAction>,
}

#[derive(Debug, clap::Subcommand)]
pub enum StateAction {
    /// Print one value of the state: a scalar bare, a map or list as YAML; exit 1 when the
    /// key is absent. KEY is a dotted path: boot, oem.mounted, grubenv.tries_cos,
    /// partitions.0.label
    #[command(visible_alias = "g")]
    Get {
        #[arg(value_name = "KEY")]
        key: String,
    },
}

pub fn state_cmd(
    ctx: &Ctx,
    args: &StateArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, AgentError> {
    match &args.action {
        None => state(ctx, args.pretty, out, err),
        Some(StateAction::Get { key }) => {
            let v = collect(ctx, err)?;
            crate::configcmd::get(&v, key, "the boot state", out, err)
        }
    }
}

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
    let (parts, mut upstream) = partitions(ctx);
    for (key, label) in UPSTREAM_PARTITIONS {
        let p = upstream.remove(*label).unwrap_or_else(missing_partition);
        s.insert((*key).into(), p);
    }
    s.insert("partitions".into(), parts);
    s.insert("boot".into(), json!(upstream_boot(ctx.mode())));
    s.insert("uuid".into(), json!(node_uuid(ctx)));
    s.insert("kairos".into(), kairos_info(ctx));
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

/// The boot disk's Kairos partitions: our list, and upstream's per-label objects (keyed by
/// filesystem/Kairos label).
fn partitions(ctx: &Ctx) -> (Value, Map<String, Value>) {
    // The boot disk's, as kairos-init and upgrade/reset choose them; not another disk's.
    let devs = blockdev::scan_boot_disk(&ctx.root).devices;
    let table = std::fs::read_to_string(ctx.path("/proc/self/mounts")).unwrap_or_default();
    let mounts = parse_mounts(&table);
    let options = crate::upgrade::locate::mount_options(&table);
    let mut upstream = Map::new();
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
            let first = mountpoints.first().copied().unwrap_or("");
            let read_only = options
                .iter()
                .find(|(p, _)| p == first)
                .is_some_and(|(_, o)| crate::upgrade::locate::is_read_only(o));
            upstream.entry(label.to_string()).or_insert_with(|| {
                json!({
                    "found": true,
                    "mounted": !first.is_empty(),
                    "mount_point": first,
                    "name": device,
                    "label": d.partname.clone().unwrap_or_default(),
                    "filesystemlabel": d.fs.as_ref().and_then(|f| f.label.clone()).unwrap_or_default(),
                    "type": d.fs.as_ref().map(|f| f.fstype.name()).unwrap_or_default(),
                    "read_only": read_only,
                    "size_bytes": d.size_bytes,
                })
            });
            Some(json!({
                "label": label,
                "device": device,
                "fstype": d.fs.as_ref().map(|f| f.fstype.name()),
                "gpt_name": d.partname,
                "mountpoints": mountpoints,
            }))
        })
        .collect();
    (Value::Array(list), upstream)
}

/// Upstream's partition keys and the label each stands for.
const UPSTREAM_PARTITIONS: &[(&str, &str)] = &[
    ("oem", labels::OEM),
    ("state", labels::STATE),
    ("recovery", labels::RECOVERY),
    ("persistent", labels::PERSISTENT),
];

/// Upstream's object for a partition that is not there: every field zero, `found: false`.
fn missing_partition() -> Value {
    json!({
        "found": false,
        "mounted": false,
        "mount_point": "",
        "name": "",
        "label": "",
        "filesystemlabel": "",
        "type": "",
        "read_only": false,
        "size_bytes": 0,
    })
}

/// Upstream's `boot`: the mode kairos-init booted, in kairos-sdk's words.
pub fn upstream_boot(mode: Option<&str>) -> &'static str {
    match mode {
        Some("active") => "active_boot",
        Some("passive") => "passive_boot",
        Some("recovery") => "recovery_boot",
        Some("autoreset") => "autoreset_boot",
        Some("live") => "livecd_boot",
        _ => "unknown",
    }
}

/// Upstream's node `uuid`: `$UUID` when set, else `<machine-id>-<hostname>`; null without a
/// machine id.
fn node_uuid(ctx: &Ctx) -> Option<String> {
    if let Ok(u) = std::env::var("UUID")
        && !u.is_empty()
    {
        return Some(u);
    }
    let id = ctx
        .read_line("/etc/machine-id")
        .or_else(|| ctx.read_line("/var/lib/dbus/machine-id"))?;
    let host = ctx
        .read_line("/proc/sys/kernel/hostname")
        .or_else(|| ctx.read_line("/etc/hostname"))
        .unwrap_or_default();
    Some(kairos_p2p::roles::node_uuid(&id, &host))
}

/// Upstream's `kairos`: the image's /etc/kairos-release and the init system.
fn kairos_info(ctx: &Ctx) -> Value {
    let release = std::fs::read_to_string(ctx.path("/etc/kairos-release")).unwrap_or_default();
    let get = |k: &str| kairos_util::envfile::value(&release, k);
    let init = if ctx.path("/run/systemd/system").is_dir() {
        "systemd"
    } else if ctx.path("/run/openrc").is_dir() {
        "openrc"
    } else if ctx.read_line("/proc/1/comm").as_deref() == Some("kairos-init") {
        "kairos-init"
    } else {
        "unknown"
    };
    json!({
        "version": get("KAIROS_VERSION"),
        "flavor": get("KAIROS_FLAVOR"),
        "flavor_release": get("KAIROS_FLAVOR_RELEASE"),
        "image": get("KAIROS_IMAGE_REPO"),
        "init": init,
    })
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
    fn upstream_keys_for_scripts() {
        let t = Tree::new();
        t.file("/run/cos/active_mode", "");
        disk(&t, "vda2", Some("oem"), Some("COS_OEM"));
        disk(&t, "vda4", Some("state"), Some("COS_STATE"));
        t.file(
            "/proc/self/mounts",
            "/dev/vda2 /oem ext4 rw,relatime 0 0\n/dev/vda4 /run/initramfs/cos-state ext4 ro 0 0\n",
        );
        t.file("/etc/machine-id", "0123456789abcdef0123456789abcdef\n");
        t.file("/proc/sys/kernel/hostname", "node-3\n");
        t.file(
            "/etc/kairos-release",
            "KAIROS_VERSION=\"v0.1.0\"\nKAIROS_FLAVOR=\"debian\"\nKAIROS_FLAVOR_RELEASE=\"12\"\n",
        );
        t.file("/proc/1/comm", "kairos-init\n");
        let (s, _) = state_of(&t);
        assert_eq!(s["boot"], "active_boot");
        assert_eq!(s["uuid"], "0123456789abcdef0123456789abcdef-node-3");
        assert_eq!(
            s["oem"],
            json!({"found": true, "mounted": true, "mount_point": "/oem", "name": "/dev/vda2",
                   "label": "oem", "filesystemlabel": "COS_OEM", "type": "ext4",
                   "read_only": false, "size_bytes": 1048576})
        );
        assert_eq!(s["state"]["read_only"], true);
        assert_eq!(s["state"]["mount_point"], "/run/initramfs/cos-state");
        assert_eq!(s["persistent"]["found"], false);
        assert_eq!(s["persistent"]["mounted"], false);
        assert_eq!(s["recovery"]["name"], "");
        assert_eq!(
            s["kairos"],
            json!({"version": "v0.1.0", "flavor": "debian", "flavor_release": "12",
                   "image": null, "init": "kairos-init"})
        );
        assert_eq!(upstream_boot(Some("autoreset")), "autoreset_boot");
        assert_eq!(upstream_boot(Some("live")), "livecd_boot");
        assert_eq!(upstream_boot(None), "unknown");
    }

    #[test]
    fn state_get_prints_one_value_or_refuses() {
        let t = Tree::new();
        t.file("/run/cos/passive_mode", "");
        t.env(&[("kairos_tries_cos", "2")]);
        let get = |k: &str| {
            let a = StateArgs {
                pretty: false,
                action: Some(StateAction::Get { key: k.into() }),
            };
            run(|o, e| state_cmd(&t.ctx, &a, o, e))
        };
        let (r, out, _) = get("boot");
        assert_eq!(
            (r.unwrap(), out.as_str()),
            (Outcome::Done, "passive_boot\n")
        );
        let (_, out, _) = get("oem.mounted");
        assert_eq!(out, "false\n");
        let (_, out, _) = get("grubenv.variables.kairos_tries_cos");
        assert_eq!(out, "2\n");
        let (_, out, _) = get("grubenv.variables");
        assert_eq!(out, "kairos_tries_cos: \"2\"\n", "a map prints as YAML");
        let (r, out, err) = get("oem.size");
        assert_eq!(r.unwrap(), Outcome::Refused);
        assert_eq!(out, "");
        assert_eq!(
            err,
            "kairos-agent: key \"oem.size\" not found: oem has no \"size\" (in the boot state)\n"
        );
        // No subcommand: the whole object, as before.
        let a = StateArgs {
            pretty: false,
            action: None,
        };
        let (_, out, _) = run(|o, e| state_cmd(&t.ctx, &a, o, e));
        assert_eq!(out.lines().count(), 1);
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
