//! The partition plan of an install: SPEC §1's sizes, overridden by the cloud-config's
//! `install.partitions` (oem, recovery, state, persistent: `size` in MiB, `fs`) and
//! `install.extra-partitions` (created after persistent; formatted and labelled when `fs` is
//! set), as upstream's "Configuring partitions" describes. Pure: every check here runs before
//! anything is written, and a bad value is refused naming its key.

use crate::config::schema::{ExtraPartition, Install, PartitionSpec};

/// A filesystem the installer makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Ext2,
    Ext3,
    Ext4,
    Xfs,
}

impl Fs {
    pub const ALL: &'static [Fs] = &[Fs::Ext2, Fs::Ext3, Fs::Ext4, Fs::Xfs];

    pub fn parse(s: &str) -> Option<Fs> {
        Fs::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s.trim().to_ascii_lowercase())
    }

    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext2 => "ext2",
            Fs::Ext3 => "ext3",
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    /// The longest filesystem label it takes, in bytes.
    pub fn max_label(self) -> usize {
        match self {
            Fs::Xfs => 12,
            _ => 16,
        }
    }

    /// The least size mkfs accepts, in MiB (mkfs.xfs refuses filesystems under 300 MB).
    pub fn min_mib(self) -> u64 {
        match self {
            Fs::Xfs => 300,
            _ => 8,
        }
    }
}

/// One of `install.extra-partitions`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    /// The GPT partition name.
    pub name: String,
    /// The filesystem label (only with `fs`).
    pub label: Option<String>,
    /// MiB; 0: the rest of the disk.
    pub size: u64,
    /// None: created, not formatted.
    pub fs: Option<Fs>,
}

/// The filesystems of the four Kairos partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KairosFs {
    pub oem: Fs,
    pub recovery: Fs,
    pub state: Fs,
    pub persistent: Fs,
}

impl Default for KairosFs {
    fn default() -> Self {
        KairosFs {
            oem: Fs::Ext4,
            recovery: Fs::Ext4,
            state: Fs::Ext4,
            persistent: Fs::Ext4,
        }
    }
}

/// A refused `install.partitions` / `install.extra-partitions` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {what}; nothing was written")]
pub struct PlanError {
    pub key: String,
    pub what: String,
}

fn refuse(key: impl Into<String>, what: impl Into<String>) -> PlanError {
    PlanError {
        key: key.into(),
        what: what.into(),
    }
}

/// The Kairos partitions' names, which an extra partition may not take.
const RESERVED: &[&str] = &["bios", "efi", "oem", "recovery", "state", "persistent"];

/// What the cloud-config changes: sizes (None: SPEC's default), filesystems, extras.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configured {
    pub oem: Option<u64>,
    pub recovery: Option<u64>,
    pub state: Option<u64>,
    /// Some(0) or None: the rest of the disk.
    pub persistent: Option<u64>,
    pub fs: KairosFs,
    pub extras: Vec<Extra>,
}

impl Configured {
    /// Whether the cloud-config changed anything (the log and errors say so).
    pub fn is_default(&self) -> bool {
        *self == Configured::default()
    }
}

/// Checks `install.partitions` and `install.extra-partitions`. `min` are the least sizes the
/// source needs for recovery and state (MiB); a configured size below them is refused.
pub fn configure(
    install: &Install,
    min_recovery: u64,
    min_state: u64,
) -> Result<Configured, PlanError> {
    let mut c = Configured::default();
    let none = PartitionSpec::default();
    let parts = install.partitions.clone().unwrap_or_default();
    let spec = |p: &Option<PartitionSpec>| p.clone().unwrap_or_else(|| none.clone());
    // (name, spec, filesystems allowed, least size)
    let kairos: [(&str, PartitionSpec, &[Fs], u64); 4] = [
        ("oem", spec(&parts.oem), Fs::ALL, 16),
        // GRUB reads the images from state and recovery; the agent builds ext images there.
        (
            "recovery",
            spec(&parts.recovery),
            &[Fs::Ext2, Fs::Ext3, Fs::Ext4],
            min_recovery,
        ),
        (
            "state",
            spec(&parts.state),
            &[Fs::Ext2, Fs::Ext3, Fs::Ext4],
            min_state,
        ),
        ("persistent", spec(&parts.persistent), Fs::ALL, 32),
    ];
    for (name, s, allowed, least) in kairos {
        let key = format!("install.partitions.{name}");
        let fs = match s.fs.as_deref().map(str::trim).filter(|f| !f.is_empty()) {
            None => Fs::Ext4,
            Some(f) => Fs::parse(f)
                .filter(|f| allowed.contains(f))
                .ok_or_else(|| {
                    refuse(
                        format!("{key}.fs"),
                        format!(
                            "{f:?} is not a filesystem the {name} partition can have (one of {})",
                            names(allowed)
                        ),
                    )
                })?,
        };
        // Upstream: size 0 (or none) is the default size; for persistent, the rest of the disk.
        let size = s.size.map(u64::from).filter(|&n| n > 0);
        if let Some(n) = size {
            let least = least.max(fs.min_mib());
            if n < least {
                return Err(refuse(
                    format!("{key}.size"),
                    format!("{n} MiB is less than the {least} MiB the {name} partition needs"),
                ));
            }
        }
        match name {
            "oem" => (c.oem, c.fs.oem) = (size, fs),
            "recovery" => (c.recovery, c.fs.recovery) = (size, fs),
            "state" => (c.state, c.fs.state) = (size, fs),
            _ => (c.persistent, c.fs.persistent) = (size, fs),
        }
    }
    let mut rest: Option<String> = c
        .persistent
        .is_none()
        .then(|| "install.partitions.persistent".to_string());
    for (i, e) in install.extra_partitions.iter().enumerate() {
        let key = format!("install.extra-partitions[{i}]");
        let x = extra(e, &key)?;
        if x.size == 0 {
            if let Some(other) = &rest {
                let hint = if other.starts_with("install.partitions") {
                    "; give persistent a size to let an extra partition take the rest"
                } else {
                    ""
                };
                return Err(refuse(
                    format!("{key}.size"),
                    format!(
                        "0 (the rest of the disk), but {other} takes the rest already: only one partition may{hint}"
                    ),
                ));
            }
            rest = Some(key.clone());
        }
        if c.extras.iter().any(|o| o.name == x.name) {
            return Err(refuse(
                format!("{key}.name"),
                format!("{:?} is the name of another extra partition", x.name),
            ));
        }
        if let Some(l) = &x.label
            && c.extras.iter().any(|o| o.label.as_ref() == Some(l))
        {
            return Err(refuse(
                format!("{key}.label"),
                format!("{l:?} is the label of another extra partition"),
            ));
        }
        c.extras.push(x);
    }
    Ok(c)
}

fn names(fs: &[Fs]) -> String {
    fs.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
}

/// One extra partition, checked: a name (GPT: at most 36 characters, no spaces, not a Kairos
/// partition's), a known filesystem, a label that filesystem takes and no Kairos label.
fn extra(e: &ExtraPartition, key: &str) -> Result<Extra, PlanError> {
    let name = e
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            refuse(
                format!("{key}.name"),
                "missing: every extra partition needs a name",
            )
        })?;
    if name.chars().count() > 36 || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(refuse(
            format!("{key}.name"),
            format!("{name:?}: at most 36 characters, no spaces"),
        ));
    }
    if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(refuse(
            format!("{key}.name"),
            format!("{name:?} is a Kairos partition's name"),
        ));
    }
    let fs = match e.fs.as_deref().map(str::trim).filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => Some(Fs::parse(f).ok_or_else(|| {
            refuse(
                format!("{key}.fs"),
                format!(
                    "{f:?} is not a filesystem the installer makes (one of {})",
                    names(Fs::ALL)
                ),
            )
        })?),
    };
    let label = e
        .label
        .as_deref()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string);
    if let Some(l) = &label {
        let Some(f) = fs else {
            return Err(refuse(
                format!("{key}.label"),
                format!("{l:?} without an fs: a partition that is not formatted has no label"),
            ));
        };
        if l.len() > f.max_label() || l.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(refuse(
                format!("{key}.label"),
                format!(
                    "{l:?}: {} takes at most {} bytes, no spaces",
                    f.name(),
                    f.max_label()
                ),
            ));
        }
        if l.to_ascii_uppercase().starts_with("COS_") {
            return Err(refuse(
                format!("{key}.label"),
                format!("{l:?}: COS_ labels are the Kairos partitions' and images'"),
            ));
        }
    }
    let size = u64::from(e.size.unwrap_or(0));
    if let Some(f) = fs
        && size > 0
        && size < f.min_mib()
    {
        return Err(refuse(
            format!("{key}.size"),
            format!(
                "{size} MiB is less than the {} MiB {} needs",
                f.min_mib(),
                f.name()
            ),
        ));
    }
    Ok(Extra {
        name: name.to_string(),
        label,
        size,
        fs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(yaml: &str) -> Install {
        let text: String = yaml.lines().map(|l| format!("  {l}\n")).collect();
        crate::config::parse("test.yaml", &format!("install:\n{text}"), false)
            .expect("parses")
            .expect("a config")
            .config
            .install
            .expect("an install block")
    }

    fn err(yaml: &str) -> String {
        configure(&install(yaml), 100, 300)
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn install_partitions_sizes_and_filesystems_are_read() {
        let c = configure(
            &install(
                "partitions:\n  oem: {size: 96, fs: ext3}\n  recovery: {size: 0}\n  state: {size: 2000}\n  persistent: {size: 500, fs: xfs}\nextra-partitions:\n  - {Name: data, size: 0, fs: ext4, label: DATA}\n  - {name: raw, size: 10}\n",
            ),
            100,
            300,
        )
        .expect("ok");
        assert_eq!(
            (c.oem, c.recovery, c.state, c.persistent),
            (Some(96), None, Some(2000), Some(500))
        );
        assert_eq!(c.fs.oem, Fs::Ext3);
        assert_eq!(c.fs.persistent, Fs::Xfs);
        assert_eq!(c.fs.state, Fs::Ext4);
        assert_eq!(
            c.extras,
            [
                Extra {
                    name: "data".into(),
                    label: Some("DATA".into()),
                    size: 0,
                    fs: Some(Fs::Ext4)
                },
                Extra {
                    name: "raw".into(),
                    label: None,
                    size: 10,
                    fs: None
                },
            ]
        );
        assert!(
            configure(&Install::default(), 100, 300)
                .expect("ok")
                .is_default()
        );
    }

    #[test]
    fn bad_partition_values_are_refused_naming_the_key() {
        let e = err("partitions:\n  oem: {fs: btrfs}\n");
        assert!(
            e.starts_with("install.partitions.oem.fs: \"btrfs\" is not a filesystem"),
            "{e}"
        );
        assert!(e.ends_with("nothing was written"), "{e}");
        let e = err("partitions:\n  state: {fs: xfs}\n");
        assert!(e.starts_with("install.partitions.state.fs: \"xfs\""), "{e}");
        let e = err("partitions:\n  state: {size: 200}\n");
        assert!(
            e.starts_with("install.partitions.state.size: 200 MiB is less than the 300 MiB"),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {name: big, size: 0, fs: ext4}\n");
        assert!(
            e.starts_with("install.extra-partitions[0].size: 0 (the rest of the disk), but install.partitions.persistent takes the rest already"),
            "{e}"
        );
        let e = err(
            "partitions:\n  persistent: {size: 100}\nextra-partitions:\n  - {name: a, size: 0}\n  - {name: b, size: 0}\n",
        );
        assert!(
            e.starts_with("install.extra-partitions[1].size: 0 (the rest of the disk), but install.extra-partitions[0] takes the rest"),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {size: 10}\n");
        assert!(
            e.starts_with("install.extra-partitions[0].name: missing"),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {name: state, size: 10}\n");
        assert!(
            e.starts_with("install.extra-partitions[0].name: \"state\" is a Kairos"),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {name: x, size: 10, fs: zfs}\n");
        assert!(
            e.starts_with("install.extra-partitions[0].fs: \"zfs\""),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {name: x, size: 10, label: L}\n");
        assert!(
            e.starts_with("install.extra-partitions[0].label: \"L\" without an fs"),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {name: x, size: 400, fs: xfs, label: THIRTEEN_CHRS}\n");
        assert!(
            e.starts_with(
                "install.extra-partitions[0].label: \"THIRTEEN_CHRS\": xfs takes at most 12"
            ),
            "{e}"
        );
        let e = err("extra-partitions:\n  - {name: x, size: 10, fs: ext4, label: COS_DATA}\n");
        assert!(e.starts_with("install.extra-partitions[0].label"), "{e}");
        let e = err("extra-partitions:\n  - {name: x, size: 10}\n  - {name: x, size: 10}\n");
        assert!(e.starts_with("install.extra-partitions[1].name"), "{e}");
    }
}
