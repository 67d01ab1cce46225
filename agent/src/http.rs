//! A bounded plain-HTTP GET for `config_url` and `downloads`: std sockets with timeouts and
//! an overall deadline, so an unreachable server is an error after `timeout`, never a hang.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("only http:// URLs are supported")]
    Scheme,
    #[error("malformed URL")]
    Url,
    #[error("cannot resolve {host}: {why}")]
    Resolve { host: String, why: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server said {0}")]
    Status(String),
    #[error("malformed response: {0}")]
    Response(String),
    #[error("more than {0} bytes")]
    TooLarge(u64),
    #[error("too many redirects")]
    Redirects,
}

struct Url {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, HttpError> {
    let rest = url.strip_prefix("http://").ok_or(HttpError::Scheme)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    // No credentials in URLs; an IPv6 literal is bracketed.
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or(HttpError::Url)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| HttpError::Url)?,
            None => 80,
        };
        (h.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| HttpError::Url)?),
            None => (authority.to_owned(), 80),
        }
    };
    if host.is_empty() {
        return Err(HttpError::Url);
    }
    Ok(Url {
        host,
        port,
        path: path.to_owned(),
    })
}

/// Addresses for `host`: a literal, /etc/hosts, else the resolver on a thread that is
/// abandoned at the deadline (getaddrinfo itself cannot be given a timeout).
fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, HttpError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for line in hosts.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut w = line.split_whitespace();
            if let Some(ip) = w.next().and_then(|ip| ip.parse::<IpAddr>().ok())
                && w.any(|n| n.eq_ignore_ascii_case(host))
            {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
        }
    }
    let (tx, rx) = mpsc::channel();
    let h = format!("{host}:{port}");
    std::thread::spawn(move || {
        let _ = tx.send(h.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(a)) if !a.is_empty() => Ok(a),
        Ok(Ok(_)) => Err(HttpError::Resolve {
            host: host.into(),
            why: "no address".into(),
        }),
        Ok(Err(e)) => Err(HttpError::Resolve {
            host: host.into(),
            why: e.to_string(),
        }),
        Err(_) => Err(HttpError::Resolve {
            host: host.into(),
            why: format!("no answer within {timeout:?}"),
        }),
    }
}

/// GET `url` (plain HTTP, following up to 5 redirects); the body, at most `max` bytes.
pub fn get(url: &str, timeout: Duration, max: u64) -> Result<Vec<u8>, HttpError> {
    let deadline = Instant::now() + timeout;
    let mut url = url.to_owned();
    for _ in 0..6 {
        match get_once(&url, deadline, timeout, max)? {
            Fetched::Body(b) => return Ok(b),
            Fetched::Redirect(to) => {
                url = if to.starts_with('/') {
                    let u = parse_url(&url)?;
                    format!("http://{}:{}{to}", u.host, u.port)
                } else {
                    to
                };
            }
        }
    }
    Err(HttpError::Redirects)
}

enum Fetched {
    Body(Vec<u8>),
    Redirect(String),
}

fn left(deadline: Instant, timeout: Duration) -> Result<Duration, HttpError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(HttpError::Timeout(timeout))
}

fn get_once(
    url: &str,
    deadline: Instant,
    timeout: Duration,
    max: u64,
) -> Result<Fetched, HttpError> {
    let u = parse_url(url)?;
    let addrs = resolve(&u.host, u.port, left(deadline, timeout)?)?;
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, left(deadline, timeout)?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some((a, e)),
        }
    }
    let mut s = match (stream, last) {
        (Some(s), _) => s,
        (None, Some((a, source))) => {
            return Err(HttpError::Connect {
                addr: a.to_string(),
                source,
            });
        }
        (None, None) => return Err(HttpError::Timeout(timeout)),
    };
    s.set_write_timeout(Some(left(deadline, timeout)?))?;
    let host = if u.host.contains(':') {
        format!("[{}]", u.host)
    } else {
        u.host.clone()
    };
    let host = if u.port == 80 {
        host
    } else {
        format!("{host}:{}", u.port)
    };
    // One write: a server that answers after the first segment must not see a half request.
    let req = format!(
        "GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: kairos-agent/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        u.path,
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(req.as_bytes())?;
    // Headers are small; the cap leaves room for them over the body's limit.
    let cap = max + 64 * 1024;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        s.set_read_timeout(Some(left(deadline, timeout)?))?;
        let n = match s.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::Timeout(timeout));
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() as u64 > cap {
            return Err(HttpError::TooLarge(max));
        }
    }
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::Response("no end of headers".into()))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut body = buf[end + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| HttpError::Response(format!("status line {status_line:?}")))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    if matches!(code, 301 | 302 | 303 | 307 | 308) {
        let to = header("location")
            .ok_or_else(|| HttpError::Response("redirect without Location".into()))?;
        return Ok(Fetched::Redirect(to));
    }
    if code != 200 {
        return Err(HttpError::Status(
            status_line.split_once(' ').map_or("", |x| x.1).to_owned(),
        ));
    }
    if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        if body.len() < len {
            return Err(HttpError::Response(format!(
                "{} of {len} bytes",
                body.len()
            )));
        }
        body.truncate(len);
    }
    if body.len() as u64 > max {
        return Err(HttpError::TooLarge(max));
    }
    Ok(Fetched::Body(body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| HttpError::Response("bad chunk".into()))?;
        let size_text = String::from_utf8_lossy(&b[..nl]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Response(format!("bad chunk size {size_text:?}")))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        let data = b
            .get(..size)
            .ok_or_else(|| HttpError::Response("short chunk".into()))?;
        out.extend_from_slice(data);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(response: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = s.write_all(response);
            }
        });
        format!("http://127.0.0.1:{port}/config.yaml")
    }

    #[test]
    fn fetches_a_body() {
        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(get(&url, Duration::from_secs(5), 100).unwrap(), b"hello");
        let url = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!(get(&url, Duration::from_secs(5), 100).unwrap(), b"abcde");
        let url = serve_once(b"HTTP/1.1 404 Not Found\r\n\r\n");
        assert!(
            matches!(get(&url, Duration::from_secs(5), 100), Err(HttpError::Status(s)) if s == "404 Not Found")
        );
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let start = Instant::now();
        let r = get(&url, Duration::from_millis(300), 100);
        assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
        drop(l);
        assert!(matches!(
            get("https://x/", Duration::from_secs(1), 1),
            Err(HttpError::Scheme)
        ));
    }
}
