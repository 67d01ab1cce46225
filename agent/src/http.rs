//! A bounded GET for `config_url` and `downloads`: HTTPS verified against the system's CA
//! certificates (reqwest with rustls, the stack oci-client already links; `SSL_CERT_FILE`
//! names another bundle), plain HTTP only when the URL says `http://`. An overall deadline
//! and a size cap, so an unreachable or endless server is an error, never a hang.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("only http:// and https:// URLs are supported")]
    Scheme,
    #[error("setting up the HTTP client (HTTPS needs the system's CA certificates): {0}")]
    Client(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Request(String),
    #[error("server said {0}")]
    Status(String),
    #[error("more than {0} bytes")]
    TooLarge(u64),
}

/// Redirects followed.
const MAX_REDIRECTS: usize = 5;

/// The error with its causes (reqwest says "error sending request" and hides why, e.g. the
/// certificate that was refused).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Up to [`MAX_REDIRECTS`], never from https:// to http://.
fn redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|a| {
        let downgrade =
            a.url().scheme() == "http" && a.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            a.error("redirect from https:// to http:// refused")
        } else if a.previous().len() > MAX_REDIRECTS {
            a.error("too many redirects")
        } else {
            a.follow()
        }
    })
}

/// GET `url`; the body, at most `max` bytes, within `timeout` in all.
pub fn get(url: &str, timeout: Duration, max: u64) -> Result<Vec<u8>, HttpError> {
    let lower = url.to_ascii_lowercase();
    if !lower.starts_with("http://") && !lower.starts_with("https://") {
        return Err(HttpError::Scheme);
    }
    let builder = || {
        reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(redirects())
            .user_agent(concat!("kairos-agent/", env!("CARGO_PKG_VERSION")))
    };
    // Without a CA bundle the verifier cannot be built; a plain-HTTP URL still works then
    // (with no roots at all, a redirect to https:// fails verification).
    let client = builder()
        .build()
        .or_else(|e| {
            if lower.starts_with("http://") {
                builder().tls_certs_only(Vec::new()).build()
            } else {
                Err(e)
            }
        })
        .map_err(|e| HttpError::Client(chain(&e)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HttpError::Client(e.to_string()))?;
    let fail = |e: reqwest::Error| {
        if e.is_timeout() {
            HttpError::Timeout(timeout)
        } else {
            HttpError::Request(chain(&e))
        }
    };
    rt.block_on(async {
        let mut resp = client.get(url).send().await.map_err(fail)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(HttpError::Status(status.to_string()));
        }
        if resp.content_length().is_some_and(|l| l > max) {
            return Err(HttpError::TooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(fail)? {
            if (body.len() + chunk.len()) as u64 > max {
                return Err(HttpError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Instant;

    fn serve_once(response: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("address").port();
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
        assert_eq!(
            get(&url, Duration::from_secs(5), 100).expect("get"),
            b"hello"
        );
        let url = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!(
            get(&url, Duration::from_secs(5), 100).expect("get"),
            b"abcde"
        );
        let url = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        let r = get(&url, Duration::from_secs(5), 100);
        assert!(
            matches!(&r, Err(HttpError::Status(s)) if s == "404 Not Found"),
            "{r:?}"
        );
        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        assert!(matches!(
            get(&url, Duration::from_secs(5), 4),
            Err(HttpError::TooLarge(4))
        ));
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/", l.local_addr().expect("address"));
        let start = Instant::now();
        let r = get(&url, Duration::from_millis(300), 100);
        assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
        drop(l);
        assert!(matches!(
            get("ftp://x/", Duration::from_secs(1), 1),
            Err(HttpError::Scheme)
        ));
    }
}
