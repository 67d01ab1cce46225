//! `config_url` and `downloads` over HTTPS, against a local server whose certificate comes
//! from a CA made here: trusted through `SSL_CERT_FILE` (the system bundle's code path), a
//! certificate from another CA refused with the URL named, a download whose sha256 does not
//! match never written.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).expect("CA certificate");
    Ca { cert, key }
}

/// An HTTPS server on `l` (127.0.0.1) with a certificate for that address signed by `ca`,
/// answering each path in `routes`.
fn serve(l: TcpListener, ca: &Ca, routes: Vec<(String, Vec<u8>)>) {
    let key = KeyPair::generate().expect("server key");
    let p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
    let cert = p
        .signed_by(&key, &ca.cert, &ca.key)
        .expect("server certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
    let config = Arc::new(config);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(tcp) = s else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            // A client that refuses the certificate ends the handshake: an error here.
            while !req.ends_with(b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let reply = match routes.iter().find(|(p, _)| p == path) {
                Some((_, body)) => {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = tls.write_all(&reply);
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// `kairos-agent --root ROOT run-stage boot` trusting only the CA in `ca_file`.
fn run_boot(root: &Path, ca_file: &Path) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kairos-agent"))
        .arg("--root")
        .arg(root)
        .args(["run-stage", "boot"])
        .env("SSL_CERT_FILE", ca_file)
        .env_remove("SSL_CERT_DIR")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .output()
        .expect("running kairos-agent");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn config_url_and_downloads_over_https_with_a_test_ca() {
    let d = tempfile::tempdir().expect("tempdir");
    let ours = ca("kairos test CA");
    let other = ca("some other CA");
    let ca_file = d.path().join("ca.pem");
    let other_file = d.path().join("other.pem");
    std::fs::write(&ca_file, ours.cert.pem()).expect("CA file");
    std::fs::write(&other_file, other.cert.pem()).expect("CA file");
    let blob = b"an artifact\n".to_vec();
    let right = sha256_hex(&blob);
    let wrong = sha256_hex(b"something else");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("https://{}", l.local_addr().expect("address"));
    let config = format!(
        "#cloud-config\nstages:\n  boot:\n  - name: marker\n    files:\n    - {{path: /etc/from-https, content: fetched}}\n  - name: good\n    downloads:\n    - {{path: /etc/good.bin, url: '{base}/blob', sha256: {right}}}\n  - name: bad\n    downloads:\n    - {{path: /etc/bad.bin, url: '{base}/blob', sha256: {wrong}}}\n"
    );
    serve(
        l,
        &ours,
        vec![
            ("/c.yaml".into(), config.into_bytes()),
            ("/blob".into(), blob.clone()),
        ],
    );
    let url = format!("{base}/c.yaml");
    let tree = |name: &str| {
        let root = d.path().join(name);
        std::fs::create_dir_all(root.join("proc")).expect("mkdir");
        std::fs::create_dir_all(root.join("oem")).expect("mkdir");
        std::fs::write(root.join("proc/cmdline"), format!("config_url={url}\n")).expect("cmdline");
        root
    };

    // Trusted: the config applies; the download with the right digest lands, the other not.
    let root = tree("trusted");
    let (code, err) = run_boot(&root, &ca_file);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/from-https"))
            .ok()
            .as_deref(),
        Some("fetched"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(root.join("etc/good.bin")).ok(),
        Some(blob),
        "{err}"
    );
    assert!(!root.join("etc/bad.bin").exists(), "{err}");
    assert!(
        err.contains(&format!(
            "step \"bad\": FAILED: downloads: {base}/blob: sha256 is {right}, expected {wrong}; /etc/bad.bin not written"
        )),
        "{err}"
    );
    // One step failed: logged above; without strict run-stage still exits 0 (upstream).
    assert_eq!(code, Some(0), "{err}");

    // A certificate from a CA the agent does not trust: refused, the URL named, nothing applied.
    let root = tree("untrusted");
    let (code, err) = run_boot(&root, &other_file);
    assert!(!root.join("etc/from-https").exists(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains(&format!("config_url {url}: ")))
        .unwrap_or_else(|| panic!("no error naming {url}: {err}"));
    println!("refused: {line}");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert_eq!(code, Some(0), "{err}");
}
