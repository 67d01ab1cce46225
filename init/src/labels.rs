//! Kairos names that form the on-disk contract (SPEC.md section 1).

pub const STATE: &str = "COS_STATE";
pub const RECOVERY: &str = "COS_RECOVERY";
pub const OEM: &str = "COS_OEM";
pub const PERSISTENT: &str = "COS_PERSISTENT";
pub const ACTIVE: &str = "COS_ACTIVE";
pub const PASSIVE: &str = "COS_PASSIVE";
pub const SYSTEM: &str = "COS_SYSTEM";
pub const GRUB: &str = "COS_GRUB";

pub const ACTIVE_IMG: &str = "/cOS/active.img";
pub const PASSIVE_IMG: &str = "/cOS/passive.img";
pub const RECOVERY_IMG: &str = "/cOS/recovery.img";
pub const RECOVERY_SQUASHFS: &str = "/cOS/recovery.squashfs";

/// The GPT partition name Kairos gives the partition carrying `label`, so a partition whose
/// filesystem cannot be probed is still found by its table entry.
pub fn gpt_name_for(label: &str) -> Option<&'static str> {
    Some(match label {
        STATE => "state",
        RECOVERY => "recovery",
        OEM => "oem",
        PERSISTENT => "persistent",
        GRUB => "efi",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt_names_follow_spec() {
        assert_eq!(gpt_name_for(STATE), Some("state"));
        assert_eq!(gpt_name_for(PERSISTENT), Some("persistent"));
        assert_eq!(gpt_name_for("COS_ACTIVE"), None);
    }
}
