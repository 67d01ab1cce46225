//! Leader election and role assignment (SPEC.md section 7), as pure functions over the set of
//! live node UUIDs and the assignments already in the ledger.

use std::collections::BTreeMap;

/// FNV-1a, 32 bit: upstream's leader hash, so a mixed cluster agrees on the leader.
pub fn fnv32a(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The node UUID: machine-id and hostname, as upstream announces it.
pub fn node_uuid(machine_id: &str, hostname: &str) -> String {
    format!("{}-{}", machine_id.trim(), hostname.trim())
}

/// The live node with the highest FNV-32a of its UUID; ties (different UUIDs, same hash)
/// go to the greater UUID so every node picks the same one.
pub fn leader<S: AsRef<str>>(live: &[S]) -> Option<&str> {
    live.iter()
        .map(AsRef::as_ref)
        .max_by_key(|u| (fnv32a(u), *u))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Master,
    /// First server of an HA cluster (`--cluster-init`).
    MasterClusterInit,
    /// Further servers of an HA cluster, joining the first.
    MasterHa,
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::MasterClusterInit => "master/clusterinit",
            Role::MasterHa => "master/ha",
            Role::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "master" => Role::Master,
            "master/clusterinit" => Role::MasterClusterInit,
            "master/ha" => Role::MasterHa,
            "worker" => Role::Worker,
            _ => return None,
        })
    }

    /// Runs `k3s server`.
    pub fn is_server(self) -> bool {
        self != Role::Worker
    }

    /// The server the others join: the single master or the HA cluster-init one.
    pub fn is_primary(self) -> bool {
        matches!(self, Role::Master | Role::MasterClusterInit)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `p2p.auto.ha`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ha {
    pub enable: bool,
    /// Servers besides the cluster-init one.
    pub master_nodes: usize,
}

/// What the leader writes: every live node's role. Nothing before `minimum_nodes` are alive.
/// Roles already given stay (a K3s node does not change role); a node without one gets the
/// primary server role when no live node has it (the leader first, so a lone leader does
/// not wait for others), then HA servers while fewer than `master_nodes`, then worker.
pub fn assign(
    live: &[String],
    current: &BTreeMap<String, Role>,
    minimum_nodes: usize,
    ha: Ha,
) -> BTreeMap<String, Role> {
    let mut out: BTreeMap<String, Role> = live
        .iter()
        .filter_map(|u| current.get(u).map(|r| (u.clone(), *r)))
        .collect();
    if live.len() < minimum_nodes.max(1) {
        return out;
    }
    let mut unassigned: Vec<&String> = live.iter().filter(|u| !out.contains_key(*u)).collect();
    unassigned.sort();
    if let Some(l) = leader(live) {
        // Leader first among the unassigned.
        if let Some(pos) = unassigned.iter().position(|u| u.as_str() == l) {
            let lu = unassigned.remove(pos);
            unassigned.insert(0, lu);
        }
    }
    // A primary that was given before counts even if it is gone: its cluster exists and a
    // second primary would start a second cluster.
    let mut has_primary = current.values().any(|r| r.is_primary());
    let mut ha_servers = current.values().filter(|r| **r == Role::MasterHa).count();
    for u in unassigned {
        let role = if !has_primary {
            has_primary = true;
            if ha.enable {
                Role::MasterClusterInit
            } else {
                Role::Master
            }
        } else if ha.enable && ha_servers < ha.master_nodes {
            ha_servers += 1;
            Role::MasterHa
        } else {
            Role::Worker
        };
        out.insert(u.clone(), role);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("machine{i}-host{i}")).collect()
    }

    #[test]
    fn fnv_matches_reference_values() {
        // Reference vectors of FNV-1a 32.
        assert_eq!(fnv32a(""), 0x811c9dc5);
        assert_eq!(fnv32a("a"), 0xe40c292c);
        assert_eq!(fnv32a("foobar"), 0xbf9cf968);
    }

    #[test]
    fn leader_is_highest_hash_and_changes_when_it_leaves() {
        let live = uuids(5);
        let l = leader(&live).unwrap().to_owned();
        assert!(live.iter().all(|u| fnv32a(u) <= fnv32a(&l)));
        // Order of discovery does not matter.
        let mut rev = live.clone();
        rev.reverse();
        assert_eq!(leader(&rev), Some(l.as_str()));
        let rest: Vec<String> = live.iter().filter(|u| **u != l).cloned().collect();
        let l2 = leader(&rest).unwrap();
        assert_ne!(l2, l);
        assert!(rest.iter().all(|u| fnv32a(u) <= fnv32a(l2)));
        assert_eq!(leader::<String>(&[]), None);
    }

    #[test]
    fn assignment_waits_for_minimum_then_one_master() {
        let live = uuids(3);
        let none = BTreeMap::new();
        assert!(assign(&live[..1], &none, 2, Ha::default()).is_empty());
        let a = assign(&live, &none, 2, Ha::default());
        assert_eq!(a.len(), 3);
        assert_eq!(a.values().filter(|r| **r == Role::Master).count(), 1);
        assert_eq!(a.values().filter(|r| **r == Role::Worker).count(), 2);
        assert_eq!(
            a[leader(&live).unwrap()],
            Role::Master,
            "leader takes master"
        );
        // Stable: running again changes nothing; a newcomer becomes a worker.
        assert_eq!(assign(&live, &a, 2, Ha::default()), a);
        let mut more = live.clone();
        more.push("late-node".into());
        let b = assign(&more, &a, 2, Ha::default());
        assert_eq!(b["late-node"], Role::Worker);
        // The master is gone: nobody is promoted to a second primary.
        let master = a
            .iter()
            .find(|(_, r)| **r == Role::Master)
            .unwrap()
            .0
            .clone();
        let rest: Vec<String> = live.iter().filter(|u| **u != master).cloned().collect();
        let c = assign(&rest, &a, 2, Ha::default());
        assert!(c.values().all(|r| *r == Role::Worker));
        assert!(!c.contains_key(&master));
    }

    #[test]
    fn ha_gives_clusterinit_then_ha_servers() {
        let live = uuids(5);
        let ha = Ha {
            enable: true,
            master_nodes: 2,
        };
        let a = assign(&live, &BTreeMap::new(), 3, ha);
        let count = |r| a.values().filter(|x| **x == r).count();
        assert_eq!(count(Role::MasterClusterInit), 1);
        assert_eq!(count(Role::MasterHa), 2);
        assert_eq!(count(Role::Worker), 2);
        assert!(Role::MasterHa.is_server() && !Role::MasterHa.is_primary());
        for r in [
            Role::Master,
            Role::MasterClusterInit,
            Role::MasterHa,
            Role::Worker,
        ] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("auto"), None);
    }
}
