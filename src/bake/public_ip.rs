//! This machine's public IPv4 address, for the build's security group (`--ssh-cidr` overrides):
//! asked over HTTPS (rustls, the system's CA certificates; `SSL_CERT_FILE` adds one), so nobody
//! on the path can hand jbake another address and open the build instance's SSH port to it.

use std::net::Ipv4Addr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Where the address is asked by default.
pub const DEFAULT_URL: &str = "https://checkip.amazonaws.com/";
/// The environment variable that names another HTTPS endpoint answering the caller's address
/// as text (a mirror, a proxy of your own).
pub const URL_ENV: &str = "JBAKE_CHECKIP_URL";
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PublicIpError {
    #[error("{URL_ENV}={0} is not an https:// URL (jbake asks for this machine's address over HTTPS only)")]
    NotHttps(String),
    #[error(
        "cannot discover this machine's public IP for the security group ({url}: {detail}): \
         pass --ssh-cidr (e.g. --ssh-cidr 203.0.113.7/32)"
    )]
    Lookup { url: String, detail: String },
}

/// The endpoint to ask: `JBAKE_CHECKIP_URL`, or [`DEFAULT_URL`]; refused unless HTTPS.
pub fn url() -> Result<String, PublicIpError> {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_string());
    match url.parse::<http::Uri>() {
        Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => Ok(url),
        _ => Err(PublicIpError::NotHttps(url)),
    }
}

/// Asks `url` (HTTPS) for this machine's IPv4 address.
pub async fn lookup(url: &str) -> Result<Ipv4Addr, PublicIpError> {
    let fail = |detail: String| PublicIpError::Lookup {
        url: url.to_string(),
        detail,
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| fail(e.to_string()))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider)
        .map_err(|e| fail(format!("no CA certificates to verify it with: {e}")))?
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let request = http::Request::get(uri)
        .header("user-agent", concat!("jbake/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new())
        .map_err(|e| fail(e.to_string()))?;
    let ask = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(fail(format!("HTTP {}", response.status())));
        }
        let body = Limited::new(response.into_body(), 1024)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    };
    let text = tokio::time::timeout(TIMEOUT, ask)
        .await
        .map_err(|_| fail("no answer within 10s".to_string()))??;
    text.parse::<Ipv4Addr>()
        .map_err(|_| fail(format!("unexpected answer {text:?}")))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
