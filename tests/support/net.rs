//! Small network pieces for the image tests, all std, each stopped on drop:
//!
//! - [`FileServer`]: serves the files of a folder over plain HTTP on a given address (the
//!   instance's GATEWAY), the stand-in for a download site such as get.jenkins.io.
//! - [`Forwarder`]: a TCP port on the GATEWAY forwarded to a port on 127.0.0.1 (moto), so the
//!   instance reaches exactly that one loopback service and nothing else (or to another
//!   address: [`Forwarder::start_to`]).
//! - [`http`]: a one-shot HTTP/1.1 request (like a load balancer's health check).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A listener thread that runs `serve` per connection until dropped.
struct Acceptor {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn start(
        bind: &str,
        serve: impl Fn(TcpStream) + Send + Sync + Clone + 'static,
    ) -> std::io::Result<Acceptor> {
        let listener = TcpListener::bind((bind, 0))?;
        let addr = listener.local_addr()?;
        // Polled, so that it stops even when its address is gone (the instance's veth).
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let serve = serve.clone();
                        std::thread::spawn(move || serve(conn));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Acceptor {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `GET /path` from a folder (no listing, no `..`).
pub struct FileServer {
    acceptor: Acceptor,
}

impl FileServer {
    pub fn start(bind: &str, root: impl Into<PathBuf>) -> FileServer {
        let root: PathBuf = root.into();
        let acceptor = Acceptor::start(bind, move |conn| {
            let _ = serve_file(conn, &root);
        })
        .unwrap_or_else(|e| panic!("file server on {bind}: {e}"));
        FileServer { acceptor }
    }

    /// `http://ADDR:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.acceptor.addr)
    }
}

fn serve_file(conn: TcpStream, root: &std::path::Path) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut conn = conn;
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let file = root.join(path.trim_start_matches('/'));
    let body = if request.starts_with("GET ") && !path.contains("..") {
        std::fs::read(&file).ok()
    } else {
        None
    };
    match body {
        Some(body) => {
            write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            conn.write_all(&body)?;
        }
        None => conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?,
    }
    conn.flush()
}

/// `bind:PORT` → `127.0.0.1:target_port`, byte for byte.
pub struct Forwarder {
    acceptor: Acceptor,
}

impl Forwarder {
    /// Listens on `bind` (the port is chosen by the system; see [`port`](Self::port)).
    pub fn start(bind: &str, target_port: u16) -> Forwarder {
        let acceptor = Acceptor::start(bind, move |client| {
            if let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)) {
                pipe(client, upstream);
            }
        })
        .unwrap_or_else(|e| panic!("forwarder on {bind}: {e}"));
        Forwarder { acceptor }
    }

    /// Listens on `bind` and forwards to `target` (`host:port`): e.g. one instance's GATEWAY
    /// to another instance's sshd, the only way between their network namespaces.
    pub fn start_to(bind: &str, target: SocketAddr) -> Forwarder {
        let acceptor = Acceptor::start(bind, move |client| {
            if let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                pipe(client, upstream);
            }
        })
        .unwrap_or_else(|e| panic!("forwarder on {bind} to {target}: {e}"));
        Forwarder { acceptor }
    }

    pub fn port(&self) -> u16 {
        self.acceptor.addr.port()
    }

    /// `http://ADDR:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.acceptor.addr)
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one = std::thread::spawn(move || copy_then_close(a, b2));
    copy_then_close(b, a2);
    let _ = one.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// A response: status, headers (names lowercased), body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn http(
    method: &str,
    host: &str,
    port: u16,
    path: &str,
    body: &str,
) -> std::io::Result<Response> {
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| std::io::Error::other(format!("{host}:{port}: {e}")))?;
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// An EC2 instance metadata service stand-in (IMDSv2 only: a token first, then the
/// metadata): the region and one instance role whose credentials are the given keys.
pub struct Imds {
    acceptor: Acceptor,
}

impl Imds {
    pub fn start(bind: &str, region: &str, key_id: &str, secret: &str) -> Imds {
        let token = format!("imds-token-{}", std::process::id());
        let region = region.to_string();
        let creds = serde_json::json!({
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": key_id,
            "SecretAccessKey": secret,
            "Token": "",
            "Expiration": "2099-01-01T00:00:00Z",
        })
        .to_string();
        let acceptor = Acceptor::start(bind, move |conn| {
            let _ = serve_imds(conn, &token, &region, &creds);
        })
        .unwrap_or_else(|e| panic!("IMDS on {bind}: {e}"));
        Imds { acceptor }
    }

    /// `http://ADDR:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.acceptor.addr)
    }
}

fn serve_imds(conn: TcpStream, token: &str, region: &str, creds: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("PUT", "/latest/api/token")
            if header("x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
        {
            (200, token.to_string())
        }
        ("GET", _) if header("x-aws-ec2-metadata-token") != Some(token) => {
            (401, String::new()) // IMDSv1 is off, as it should be
        }
        ("GET", "/latest/meta-data/placement/region") => (200, region.to_string()),
        ("GET", "/latest/meta-data/iam/security-credentials/") => {
            (200, "jbake-test-role".to_string())
        }
        ("GET", "/latest/meta-data/iam/security-credentials/jbake-test-role") => {
            (200, creds.to_string())
        }
        _ => (404, String::new()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
