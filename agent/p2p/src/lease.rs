//! VPN address leases: each node claims one address of the range in the ledger
//! (`vpn/lease/<uuid>` = address) and keeps it in `<root>/usr/local/.kairos/lease`, so the
//! same node gets the same address after a reboot.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::roles::fnv32a;
use kairos_util::{IoError, IoResultExt};

pub const DEFAULT_RANGE: &str = "10.1.0.0/24";
pub const LEASE_FILE: &str = "usr/local/.kairos/lease";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("VPN address range {0:?} is not an IPv4 CIDR like 10.1.0.0/24")]
    Range(String),
    #[error("VPN address range {range} has no free address ({taken} taken)")]
    Full { range: String, taken: usize },
    #[error(transparent)]
    Io(#[from] IoError),
}

/// An IPv4 range; hosts exclude the network and broadcast addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Range {
    pub fn parse(s: &str) -> Result<Range, LeaseError> {
        let bad = || LeaseError::Range(s.to_owned());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        // /31 and /32 leave no room for two nodes.
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Range {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    pub fn contains_host(&self, ip: Ipv4Addr) -> bool {
        let off = u32::from(ip).wrapping_sub(u32::from(self.network));
        off >= 1 && off < self.size() - 1
    }

    fn host(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + offset)
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The address for node `me`: the remembered one if it is in the range and no other node
/// holds it, else the first free host probing from a point given by the UUID's hash (so
/// nodes starting together rarely pick the same one).
pub fn choose(
    range: Range,
    me: &str,
    leases: &BTreeMap<String, Ipv4Addr>,
    remembered: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, LeaseError> {
    let taken_by_other = |ip: Ipv4Addr| leases.iter().any(|(u, a)| u != me && *a == ip);
    if let Some(ip) = remembered
        && range.contains_host(ip)
        && !taken_by_other(ip)
    {
        return Ok(ip);
    }
    let hosts = range.size() - 2;
    let start = fnv32a(me) % hosts;
    (0..hosts)
        .map(|i| range.host(1 + (start + i) % hosts))
        .find(|ip| !taken_by_other(*ip))
        .ok_or_else(|| LeaseError::Full {
            range: range.to_string(),
            taken: leases.len(),
        })
}

/// Two nodes claimed one address: the one with the smaller UUID keeps it, the other must
/// choose again (and re-address its interface if it is up). `claims`: (node, address) as
/// seen in the ledger, and the claims on `mine` this node refused because its own claim had
/// settled first (once both have, each refuses the other's, so neither ledger holds both:
/// the refusals are what shows the clash). Both sides decide alike, so exactly one moves.
/// True when `me` has to yield.
pub fn must_yield<'a>(
    me: &str,
    mine: Ipv4Addr,
    claims: impl IntoIterator<Item = (&'a str, Ipv4Addr)>,
) -> bool {
    claims.into_iter().any(|(u, a)| a == mine && u < me)
}

pub fn lease_path(root: &Path) -> PathBuf {
    root.join(LEASE_FILE)
}

/// The remembered address; a missing or unreadable file is no lease.
pub fn load(root: &Path) -> Option<Ipv4Addr> {
    std::fs::read_to_string(lease_path(root))
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub fn store(root: &Path, ip: Ipv4Addr) -> Result<(), LeaseError> {
    let path = lease_path(root);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir, "creating the lease file's directory")?;
    }
    // Write then rename: a crash never leaves half an address.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{ip}\n")).at(&tmp, "writing the lease")?;
    std::fs::rename(&tmp, &path).at(&path, "renaming the new lease into place")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Range {
        Range::parse(DEFAULT_RANGE).unwrap()
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(
            Range::parse("10.1.0.7/24").unwrap().network,
            Ipv4Addr::new(10, 1, 0, 0)
        );
        for bad in [
            "10.1.0.0",
            "10.1.0.0/33",
            "10.1.0.0/31",
            "x/24",
            "10.1.0/24",
        ] {
            assert!(Range::parse(bad).is_err(), "{bad}");
        }
        assert!(r().contains_host(Ipv4Addr::new(10, 1, 0, 1)));
        assert!(!r().contains_host(Ipv4Addr::new(10, 1, 0, 0)));
        assert!(!r().contains_host(Ipv4Addr::new(10, 1, 0, 255)));
        assert!(!r().contains_host(Ipv4Addr::new(10, 2, 0, 5)));
    }

    #[test]
    fn no_duplicates_and_remembered_address_is_kept() {
        let mut leases = BTreeMap::new();
        for i in 0..254 {
            let me = format!("node{i}");
            let ip = choose(r(), &me, &leases, None).unwrap();
            assert!(r().contains_host(ip));
            assert!(!leases.values().any(|a| *a == ip), "{ip} twice");
            leases.insert(me, ip);
        }
        assert!(matches!(
            choose(r(), "one-too-many", &leases, None),
            Err(LeaseError::Full { taken: 254, .. })
        ));
        // Our own entry does not block us; a remembered address is reused.
        let mine = leases["node7"];
        assert_eq!(choose(r(), "node7", &leases, Some(mine)).unwrap(), mine);
        let mut few = BTreeMap::new();
        few.insert("other".to_string(), Ipv4Addr::new(10, 1, 0, 9));
        assert_eq!(
            choose(r(), "me", &few, Some(Ipv4Addr::new(10, 1, 0, 42))).unwrap(),
            Ipv4Addr::new(10, 1, 0, 42)
        );
        // Remembered but now held by another node, or outside the range: choose anew.
        let got = choose(r(), "me", &few, Some(Ipv4Addr::new(10, 1, 0, 9))).unwrap();
        assert_ne!(got, Ipv4Addr::new(10, 1, 0, 9));
        let got = choose(r(), "me", &few, Some(Ipv4Addr::new(192, 168, 0, 9))).unwrap();
        assert!(r().contains_host(got));
    }

    #[test]
    fn clash_resolves_to_the_smaller_uuid() {
        let ip = Ipv4Addr::new(10, 1, 0, 5);
        let mut leases = BTreeMap::new();
        leases.insert("aaa".to_string(), ip);
        leases.insert("bbb".to_string(), ip);
        fn seen(l: &BTreeMap<String, Ipv4Addr>) -> Vec<(&str, Ipv4Addr)> {
            l.iter().map(|(u, a)| (u.as_str(), *a)).collect()
        }
        assert!(must_yield("bbb", ip, seen(&leases)));
        assert!(!must_yield("aaa", ip, seen(&leases)));
        // Each ledger holds only its own claim; the other's was refused (its own had
        // settled): the refused claims decide the same way on both sides.
        let only_b = BTreeMap::from([("bbb".to_owned(), ip)]);
        let only_a = BTreeMap::from([("aaa".to_owned(), ip)]);
        let refused_by_b = [("aaa", ip)];
        let refused_by_a = [("bbb", ip)];
        assert!(must_yield(
            "bbb",
            ip,
            seen(&only_b).into_iter().chain(refused_by_b)
        ));
        assert!(!must_yield(
            "aaa",
            ip,
            seen(&only_a).into_iter().chain(refused_by_a)
        ));
        // Another address, or only a larger UUID: keep it.
        assert!(!must_yield(
            "bbb",
            ip,
            [("aaa", Ipv4Addr::new(10, 1, 0, 6))]
        ));
        assert!(!must_yield("bbb", ip, [("ccc", ip)]));
        // The one that yields chooses past both claims.
        let mut both = leases.clone();
        both.remove("bbb");
        let again = choose(r(), "bbb", &both, None).unwrap();
        assert_ne!(again, ip);
    }

    #[test]
    fn lease_file_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), None);
        store(dir.path(), Ipv4Addr::new(10, 1, 0, 77)).unwrap();
        assert_eq!(load(dir.path()), Some(Ipv4Addr::new(10, 1, 0, 77)));
        std::fs::write(lease_path(dir.path()), "garbage").unwrap();
        assert_eq!(load(dir.path()), None);
    }
}
