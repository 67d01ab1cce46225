//! kube-vip for a control-plane node (provider-kairos' `kubevip:` block): with
//! `kubevip.enable` (or just an `eip`), a K3s server gets `--tls-san=<eip>` and two
//! manifests in K3s' auto-deploy directory: kube-vip's RBAC (the one shipped here, or the
//! file at `manifest_url`) and the kube-vip DaemonSet (or Pod, `static_pod: true`) that holds
//! the virtual address on `interface` by ARP with leader election, as kube-vip's own
//! `manifest daemonset|pod` renders it for provider-kairos' settings. Nothing is fetched but
//! `manifest_url`: the manifest is rendered here from its fields.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Ctx;
use crate::config::{Fetch, Kubevip};
use crate::safe_fs::{FsError, write};

/// K3s applies every manifest in this directory (a server's).
pub const MANIFESTS_DIR: &str = "/var/lib/rancher/k3s/server/manifests";
/// The kube-vip DaemonSet or Pod (upstream's file name).
pub const MANIFEST: &str = "/var/lib/rancher/k3s/server/manifests/kubevip.yaml";
/// Its RBAC, or what `manifest_url` points at (upstream's file name).
pub const RBAC: &str = "/var/lib/rancher/k3s/server/manifests/kubevipmanifest.yaml";
/// kube-vip's image when `kubevip.version` is not set (provider-kairos' default).
pub const DEFAULT_VERSION: &str = "v1.0.1";
const IMAGE: &str = "ghcr.io/kube-vip/kube-vip";
/// What `manifest_url` may take, and how much of it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
const FETCH_MAX: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KubevipError {
    #[error("kubevip is enabled but kubevip.eip is not set: kube-vip needs the virtual address")]
    NoEip,
    #[error("kubevip.eip: {eip:?} is not an IP address")]
    BadEip { eip: String },
    #[error(
        "kubevip.interface is not set and {route} has no default route to take it from; set kubevip.interface"
    )]
    NoInterface { route: String },
    #[error("kubevip.interface: {0:?} is not an interface name")]
    BadInterface(String),
    #[error("kubevip.version: {0:?} is not an image tag")]
    BadVersion(String),
    #[error("kubevip.manifest_url {url}: {msg}")]
    Fetch { url: String, msg: String },
    #[error("kube-vip manifest: {0}")]
    Fs(FsError),
}

// By hand, not #[from]: that would also return it as the source, and the message prints it.
impl From<FsError> for KubevipError {
    fn from(e: FsError) -> KubevipError {
        KubevipError::Fs(e)
    }
}

/// Upstream's rule: `enable` when given, else on as soon as an `eip` is set.
pub fn enabled(kv: Option<&Kubevip>) -> bool {
    kv.is_some_and(|k| {
        k.enable
            .unwrap_or_else(|| k.eip.as_deref().is_some_and(|e| !e.trim().is_empty()))
    })
}

/// The virtual address, checked.
pub fn eip(kv: &Kubevip) -> Result<IpAddr, KubevipError> {
    let e = kv.eip.as_deref().map(str::trim).unwrap_or("");
    if e.is_empty() {
        return Err(KubevipError::NoEip);
    }
    e.parse()
        .map_err(|_| KubevipError::BadEip { eip: e.to_owned() })
}

/// The server's extra K3s arguments: its certificate also names the virtual address.
pub fn server_args(kv: Option<&Kubevip>) -> Result<Vec<String>, KubevipError> {
    match kv.filter(|_| enabled(kv)) {
        Some(k) => Ok(vec![format!("--tls-san={}", eip(k)?)]),
        None => Ok(Vec::new()),
    }
}

/// The interface of the default route in a `/proc/net/route` text (destination 0, up).
pub fn default_interface(route: &str) -> Option<String> {
    route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
        (f.get(1) == Some(&"00000000") && flags & 1 != 0).then(|| f[0].to_owned())
    })
}

fn check_word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '@'))
}

/// The kube-vip manifest for `ip` on `iface`: a DaemonSet on control-plane nodes, or a Pod
/// (`static_pod`). Control plane on port 6443, ARP, leader election (lease 5 s, renew 3 s,
/// retry 1 s), metrics on :2112, the address as a /32 (/128): provider-kairos' settings.
pub fn render(kv: &Kubevip, ip: IpAddr, iface: &str) -> Result<String, KubevipError> {
    if !check_word(iface) {
        return Err(KubevipError::BadInterface(iface.to_owned()));
    }
    let version = kv
        .version
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(DEFAULT_VERSION);
    if !check_word(version) {
        return Err(KubevipError::BadVersion(version.to_owned()));
    }
    let cidr = if ip.is_ipv4() { 32 } else { 128 };
    let env: Vec<(&str, String)> = vec![
        ("vip_arp", "\"true\"".into()),
        ("port", "\"6443\"".into()),
        ("vip_interface", iface.into()),
        ("vip_cidr", format!("\"{cidr}\"")),
        ("dns_mode", "first".into()),
        ("cp_enable", "\"true\"".into()),
        ("cp_namespace", "kube-system".into()),
        ("vip_leaderelection", "\"true\"".into()),
        ("vip_leasename", "plndr-cp-lock".into()),
        ("vip_leaseduration", "\"5\"".into()),
        ("vip_renewdeadline", "\"3\"".into()),
        ("vip_retryperiod", "\"1\"".into()),
        ("address", format!("\"{ip}\"")),
        ("prometheus_server", ":2112".into()),
    ];
    let ind = if kv.static_pod { "  " } else { "      " };
    let mut c = String::new();
    c.push_str(&format!(
        "{ind}containers:\n{ind}- args:\n{ind}  - manager\n{ind}  env:\n"
    ));
    c.push_str(&format!(
        "{ind}  - name: vip_nodename\n{ind}    valueFrom:\n{ind}      fieldRef:\n{ind}        fieldPath: spec.nodeName\n"
    ));
    for (k, v) in &env {
        c.push_str(&format!("{ind}  - name: {k}\n{ind}    value: {v}\n"));
    }
    c.push_str(&format!(
        "{ind}  image: {IMAGE}:{version}\n{ind}  imagePullPolicy: IfNotPresent\n{ind}  name: kube-vip\n{ind}  resources: {{}}\n{ind}  securityContext:\n{ind}    capabilities:\n{ind}      add:\n{ind}      - NET_ADMIN\n{ind}      - NET_RAW\n{ind}hostNetwork: true\n{ind}serviceAccountName: kube-vip\n"
    ));
    let head = "# kairos-agent: kube-vip for the control plane (cloud-config kubevip:)\n";
    Ok(if kv.static_pod {
        format!(
            "{head}apiVersion: v1\nkind: Pod\nmetadata:\n  name: kube-vip\n  namespace: kube-system\n  labels:\n    app.kubernetes.io/name: kube-vip\n    app.kubernetes.io/version: {version}\nspec:\n{c}"
        )
    } else {
        format!(
            "{head}apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: kube-vip-ds\n  namespace: kube-system\n  labels:\n    app.kubernetes.io/name: kube-vip-ds\n    app.kubernetes.io/version: {version}\nspec:\n  selector:\n    matchLabels:\n      app.kubernetes.io/name: kube-vip-ds\n  template:\n    metadata:\n      labels:\n        app.kubernetes.io/name: kube-vip-ds\n        app.kubernetes.io/version: {version}\n    spec:\n      affinity:\n        nodeAffinity:\n          requiredDuringSchedulingIgnoredDuringExecution:\n            nodeSelectorTerms:\n            - matchExpressions:\n              - key: node-role.kubernetes.io/master\n                operator: Exists\n            - matchExpressions:\n              - key: node-role.kubernetes.io/control-plane\n                operator: Exists\n{c}      tolerations:\n      - effect: NoSchedule\n        operator: Exists\n      - effect: NoExecute\n        operator: Exists\n  updateStrategy: {{}}\n"
        )
    })
}

/// kube-vip's service account and the rights it needs (services, nodes, endpoints, leases).
pub const RBAC_YAML: &str = "\
# kairos-agent: kube-vip's service account and rights (cloud-config kubevip:)
apiVersion: v1
kind: ServiceAccount
metadata:
  name: kube-vip
  namespace: kube-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  annotations:
    rbac.authorization.kubernetes.io/autoupdate: \"true\"
  name: system:kube-vip-role
rules:
- apiGroups: [\"\"]
  resources: [\"services\", \"services/status\", \"nodes\", \"endpoints\"]
  verbs: [\"list\", \"get\", \"watch\", \"update\"]
- apiGroups: [\"coordination.k8s.io\"]
  resources: [\"leases\"]
  verbs: [\"list\", \"get\", \"watch\", \"update\", \"create\"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:kube-vip-binding
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:kube-vip-role
subjects:
- kind: ServiceAccount
  name: kube-vip
  namespace: kube-system
";

/// Write both manifests under the root (0600: K3s runs as root); returns their paths.
/// The interface is `kubevip.interface`, else the default route's.
pub fn deploy(ctx: &Ctx, kv: &Kubevip, fetch: Fetch) -> Result<Vec<PathBuf>, KubevipError> {
    let ip = eip(kv)?;
    let iface = match kv
        .interface
        .as_deref()
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        Some(i) => i.to_owned(),
        None => {
            let route = ctx.path("/proc/net/route");
            let text = std::fs::read_to_string(&route).unwrap_or_default();
            default_interface(&text).ok_or_else(|| KubevipError::NoInterface {
                route: route.display().to_string(),
            })?
        }
    };
    let manifest = render(kv, ip, &iface)?;
    let rbac = match kv
        .manifest_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        Some(url) => fetch(url, FETCH_TIMEOUT, FETCH_MAX).map_err(|msg| KubevipError::Fetch {
            url: url.to_owned(),
            msg,
        })?,
        None => RBAC_YAML.as_bytes().to_vec(),
    };
    write(&ctx.root, Path::new(RBAC), &rbac, 0o600, None)?;
    write(
        &ctx.root,
        Path::new(MANIFEST),
        manifest.as_bytes(),
        0o600,
        None,
    )?;
    Ok(vec![ctx.path(RBAC), ctx.path(MANIFEST)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Tree;
    use serde_json::Value;

    fn kv(yaml: &str) -> Option<Kubevip> {
        crate::config::parse("t", yaml, false)
            .unwrap()
            .unwrap()
            .config
            .kubevip
    }

    #[test]
    fn kubevip_enabled_by_enable_or_by_an_eip() {
        assert!(!enabled(None));
        assert!(enabled(kv("kubevip: {eip: 10.0.0.9}\n").as_ref()));
        assert!(!enabled(
            kv("kubevip: {eip: 10.0.0.9, enable: false}\n").as_ref()
        ));
        assert!(enabled(
            kv("kubevip: {enabled: true, eip: 10.0.0.9}\n").as_ref()
        ));
        assert!(!enabled(kv("kubevip: {interface: eth0}\n").as_ref()));
        assert_eq!(
            server_args(kv("kubevip: {eip: 10.0.0.9}\n").as_ref()).unwrap(),
            ["--tls-san=10.0.0.9"]
        );
        assert!(
            server_args(kv("kubevip: {enable: false, eip: 1.2.3.4}\n").as_ref())
                .unwrap()
                .is_empty()
        );
        // Bad input names the key.
        let e = server_args(kv("kubevip: {enable: true}\n").as_ref()).unwrap_err();
        assert!(e.to_string().contains("kubevip.eip is not set"), "{e}");
        let e = server_args(kv("kubevip: {eip: 'vip.lan; rm'}\n").as_ref()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kubevip.eip: \"vip.lan; rm\" is not an IP address"
        );
    }

    #[test]
    fn kubevip_manifest_renders_daemonset_or_pod() {
        let k = kv("kubevip: {eip: 192.168.1.50, interface: ens3, version: v0.9.0}\n").unwrap();
        let y = render(&k, eip(&k).unwrap(), "ens3").unwrap();
        let v: Value = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(v["kind"], "DaemonSet");
        assert_eq!(v["metadata"]["namespace"], "kube-system");
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "ghcr.io/kube-vip/kube-vip:v0.9.0");
        let env = |n: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == n)
                .map(|e| e["value"].clone())
        };
        assert_eq!(env("address"), Some("192.168.1.50".into()));
        assert_eq!(env("vip_interface"), Some("ens3".into()));
        assert_eq!(env("vip_cidr"), Some("32".into()));
        assert_eq!(env("cp_enable"), Some("true".into()));
        assert_eq!(env("vip_arp"), Some("true".into()));
        assert_eq!(v["spec"]["template"]["spec"]["hostNetwork"], true);
        let pod = kv("kubevip: {eip: 'fd00::5', static_pod: true}\n").unwrap();
        let y = render(&pod, eip(&pod).unwrap(), "eth0").unwrap();
        let v: Value = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(v["kind"], "Pod");
        let c = &v["spec"]["containers"][0];
        assert_eq!(
            c["image"],
            format!("ghcr.io/kube-vip/kube-vip:{DEFAULT_VERSION}")
        );
        assert!(y.contains("value: \"128\""), "{y}");
        assert!(render(&k, eip(&k).unwrap(), "eth0\nx: y").is_err());
        let bad = kv("kubevip: {eip: 1.2.3.4, version: 'v1 evil'}\n").unwrap();
        assert!(matches!(
            render(&bad, eip(&bad).unwrap(), "eth0"),
            Err(KubevipError::BadVersion(_))
        ));
    }

    #[test]
    fn kubevip_deploy_writes_both_manifests() {
        let t = Tree::new();
        let no_fetch: Fetch = &|u, _, _| Err(format!("no network for {u}"));
        // No interface and no default route: said, naming the key.
        let k = kv("kubevip: {eip: 10.0.0.9}\n").unwrap();
        let e = deploy(&t.ctx, &k, no_fetch).unwrap_err().to_string();
        assert!(e.contains("set kubevip.interface"), "{e}");
        t.file(
            "/proc/net/route",
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
             eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
             eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n",
        );
        let paths = deploy(&t.ctx, &k, no_fetch).unwrap();
        assert_eq!(paths, [t.ctx.path(RBAC), t.ctx.path(MANIFEST)]);
        let m = std::fs::read_to_string(t.ctx.path(MANIFEST)).unwrap();
        assert!(m.contains("value: eth0"), "{m}");
        assert_eq!(
            std::fs::read_to_string(t.ctx.path(RBAC)).unwrap(),
            RBAC_YAML
        );
        // manifest_url replaces the RBAC; a failed fetch is an error naming the key.
        let k =
            kv("kubevip: {eip: 10.0.0.9, interface: br0, manifest_url: 'http://h/rbac.yaml'}\n")
                .unwrap();
        let e = deploy(&t.ctx, &k, no_fetch).unwrap_err().to_string();
        assert_eq!(
            e,
            "kubevip.manifest_url http://h/rbac.yaml: no network for http://h/rbac.yaml"
        );
        let fetched: Fetch = &|_, _, _| Ok(b"kind: Mine\n".to_vec());
        deploy(&t.ctx, &k, fetched).unwrap();
        assert_eq!(
            std::fs::read_to_string(t.ctx.path(RBAC)).unwrap(),
            "kind: Mine\n"
        );
        let m = std::fs::read_to_string(t.ctx.path(MANIFEST)).unwrap();
        assert!(m.contains("value: br0"), "{m}");
    }
}
