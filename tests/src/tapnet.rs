//! A private LAN for one VM: a network namespace holding a tap device with an address on the
//! host side. QEMU runs inside the namespace (`BootSpec::netns`) with `-netdev tap`; commands
//! that talk to the guest (`kairos-agent register`) run there too (`ip netns exec`). Nothing
//! is routed anywhere else; `Drop` deletes the namespace and with it the tap device.

use std::process::Command;

use anyhow::{Context, Result, bail};

pub struct TapLan {
    pub ns: String,
    pub tap: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {args:?}"))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TapLan {
    /// Namespace `kt-<label>-<pid>` with `tap0` at `host_ip`/24, up, and a multicast route
    /// (mDNS needs one; nothing else has a way out).
    pub fn new(label: &str, host_ip: &str) -> Result<TapLan> {
        if !rustix::process::geteuid().is_root() {
            bail!("a tap LAN needs root (ip netns, tuntap): run the tests as root, as CI does");
        }
        let ns = format!("kt-{label}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        ip(&["netns", "add", &ns])?;
        let lan = TapLan {
            ns,
            tap: "tap0".into(),
        };
        let n = lan.ns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "tap0",
        ])?;
        ip(&["-n", n, "link", "set", "tap0", "up"])?;
        ip(&["-n", n, "route", "add", "224.0.0.0/4", "dev", "tap0"])?;
        Ok(lan)
    }

    /// QEMU arguments for a virtio NIC on the tap device (QEMU must run in the namespace).
    pub fn qemu_args(&self) -> Vec<String> {
        [
            "-netdev",
            &format!("tap,id=lan,ifname={},script=no,downscript=no", self.tap),
            "-device",
            "virtio-net-pci,netdev=lan,mac=52:54:00:4b:54:01",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `cmd` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

impl Drop for TapLan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
