//! Every cloud-config key the agent accepts, and what it does with it. A key is accepted
//! only when it is listed here, and each entry says either which test shows its effect or
//! that it is not supported (said out loud every time the config is loaded, and by
//! `kairos-agent validate`). Anything else is an unknown key (kept in the raw tree, warned).
//!
//! Paths: names joined by `.`; list items are transparent (`write_files.path` is the `path`
//! of every `write_files` entry); `*` is any one map key (`stages.*.files`, a stage's
//! name); a path ending in `.**` accepts everything below it as free-form data
//! (`k3s.config.**`: K3s' own flags).
//!
//! Sections are owned by the part of the agent that gives the keys their effect; keep each
//! section sorted by path.

/// What a key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Has an effect; the named test (a `fn` of that name under `agent/`, `build/`,
    /// `init/` or `tests/`) shows it.
    Shown(&'static str),
    /// Accepted so an upstream file loads; warned as not supported (the text says why or
    /// what to use instead) every time the config is loaded.
    Unsupported(&'static str),
}

/// One accepted key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub path: &'static str,
    pub support: Support,
}

const fn shown(path: &'static str, test: &'static str) -> Key {
    Key {
        path,
        support: Support::Shown(test),
    }
}

const fn unsupported(path: &'static str, why: &'static str) -> Key {
    Key {
        path,
        support: Support::Unsupported(why),
    }
}

/// The registry. Sections: top level and cloud-init; stages and steps; install, upgrade,
/// reset; k3s, kubevip, p2p; bundles.
pub const KEYS: &[Key] = &[
    // --- top level, cloud-init, config surface ---
    shown(
        "config_url",
        "config_url_is_fetched_and_an_unreachable_one_is_a_warning",
    ),
    // --- stages and steps ---
    // --- install, upgrade, reset ---
    // --- k3s, kubevip, p2p ---
    // --- bundles ---
    unsupported("k0s.**", "k0s is not supported by this agent; use k3s"),
    unsupported(
        "k0s-worker.**",
        "k0s is not supported by this agent; use k3s-agent",
    ),
];
