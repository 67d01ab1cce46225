//! The node's cloud-config from all its sources: the files and the kernel command line
//! ([`config::load_with`]) and the `config_url`s, fetched over HTTP(S) by [`crate::http`].
//! Above both so the config model stays the bottom layer.

use std::time::Duration;

use crate::Ctx;
use crate::config::{self, LoadOptions, Loaded};

/// Every source under `ctx`'s root, merged; `config_url`s fetched when `opts.fetch`.
pub fn load(ctx: &Ctx, opts: &LoadOptions) -> Loaded {
    config::load_with(ctx, opts, &fetch)
}

/// The agent's HTTP(S) client as a [`config::Fetch`] (config_url, kube-vip's manifest_url).
pub fn fetch(url: &str, timeout: Duration, max: u64) -> Result<Vec<u8>, String> {
    crate::http::get(url, timeout, max).map_err(|e| e.to_string())
}
