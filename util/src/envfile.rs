//! `KEY=value` files in the os-release style (/etc/os-release, /etc/kairos-release): one
//! reader for every place that asks them for a value.

/// The value of `key` in `text`, surrounding quotes removed; the first assignment wins.
/// `Some("")` when the key is there with an empty value.
pub fn value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_owned())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_quoted_or_not() {
        let t =
            "ID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12\"\nVERSION_ID='12'\nEMPTY=\nID_LIKE=x\n";
        assert_eq!(super::value(t, "ID").as_deref(), Some("debian"));
        assert_eq!(
            super::value(t, "PRETTY_NAME").as_deref(),
            Some("Debian GNU/Linux 12")
        );
        assert_eq!(super::value(t, "VERSION_ID").as_deref(), Some("12"));
        assert_eq!(super::value(t, "EMPTY").as_deref(), Some(""));
        assert_eq!(super::value(t, "VERSION"), None);
    }
}
