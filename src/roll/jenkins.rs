//! The few Jenkins API calls a roll needs: quiet-down (and its cancel), whether builds are
//! running, a clean stop (`/safeExit`), and `/login` with the `X-Jenkins` version header and the
//! `X-Instance-Identity` header (the public key of the instance identity, whose private key lives
//! in JENKINS_HOME: the same value before and after a roll proves the same JENKINS_HOME). CSRF
//! crumbs are fetched and sent with the session cookie they belong to. The API token is never
//! printed.

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A Jenkins API failure, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Jenkins at {url} did not answer {what}: {detail} (check --jenkins-url and that this machine can reach it)")]
    Unreachable {
        url: String,
        what: String,
        detail: String,
    },
    #[error("Jenkins at {url} refused {what} (HTTP {status}){hint}")]
    Status {
        url: String,
        what: String,
        status: u16,
        hint: String,
    },
    #[error("Jenkins at {url} gave an unexpected answer to {what}: {detail}")]
    BadAnswer {
        url: String,
        what: String,
        detail: String,
    },
    #[error("--jenkins-url {0}: {1}")]
    BadUrl(String, String),
    /// A change request (quiet-down, cancel) that failed before it was sent: Jenkins did not
    /// get it, so there is nothing to undo.
    #[error(transparent)]
    NotSent(Box<Error>),
}

impl Error {
    /// Whether the request surely never reached Jenkins (the connection or the TLS handshake
    /// failed, or the crumb that must come first could not be had).
    pub fn not_sent(&self) -> bool {
        matches!(self, Error::NotSent(_))
    }
}

/// What `/login` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginAnswer {
    pub status: u16,
    /// The `X-Jenkins` header: Jenkins' version. None: not Jenkins (or a proxy's error page).
    pub version: Option<String>,
    /// The `X-Instance-Identity` header: which JENKINS_HOME answers.
    pub identity: Option<String>,
}

impl LoginAnswer {
    /// Jenkins is serving: 200 with its version header.
    pub fn is_up(&self) -> bool {
        self.status == 200 && self.version.is_some()
    }
}

/// The builds running on the controller and its agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Busy {
    pub count: u64,
    /// The URLs of what runs, when Jenkins says.
    pub running: Vec<String>,
}

impl Busy {
    /// Without the builds whose URL starts with one of `ignored` (the build that runs the roll
    /// itself: `--ignore-build "$BUILD_URL"` in a Jenkinsfile; its pipeline's `node` blocks
    /// run under the same URL).
    pub fn ignoring(self, ignored: &[String]) -> Busy {
        if ignored.is_empty() {
            return self;
        }
        let before = self.running.len();
        let running: Vec<String> = self
            .running
            .into_iter()
            .filter(|url| !ignored.iter().any(|i| url.starts_with(i.as_str())))
            .collect();
        let removed = (before - running.len()) as u64;
        Busy {
            count: self.count.saturating_sub(removed),
            running,
        }
    }
}

pub struct Jenkins {
    base: String,
    auth: Option<String>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `(field, crumb, cookie)`: a crumb is only valid with the session it was issued to.
    crumb: Mutex<Option<(String, String, Option<String>)>>,
    timeout: Duration,
}

struct Answer {
    status: u16,
    version: Option<String>,
    identity: Option<String>,
    cookie: Option<String>,
    body: Bytes,
}

impl Jenkins {
    /// `credentials`: `user:api-token`.
    pub fn new(url: &str, credentials: Option<&str>) -> Result<Jenkins, Error> {
        let base = url.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| Error::BadUrl(url.to_string(), e.to_string()))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => {}
            _ => {
                return Err(Error::BadUrl(
                    url.to_string(),
                    "expected http://HOST[:PORT][/PATH] or https://…".to_string(),
                ))
            }
        }
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let builder = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
        {
            Ok(b) => b,
            // No system CA certificates: plain HTTP still works, HTTPS will fail to verify.
            Err(_) => {
                let config = rustls::ClientConfig::builder_with_provider(
                    rustls::crypto::aws_lc_rs::default_provider().into(),
                )
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::BadUrl(url.to_string(), format!("TLS setup: {e}")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let https = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(Jenkins {
            base,
            auth: credentials.map(|c| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(c.as_bytes())
                )
            }),
            client,
            crumb: Mutex::new(None),
            timeout: Duration::from_secs(15),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        what: &str,
        extra: &[(String, String)],
        auth: bool,
    ) -> Result<Answer, Error> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder().method(method).uri(&url).header(
            http::header::USER_AGENT,
            concat!("jbake/", env!("CARGO_PKG_VERSION")),
        );
        if auth {
            if let Some(a) = &self.auth {
                req = req.header(http::header::AUTHORIZATION, a);
            }
        }
        for (k, v) in extra {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::BadUrl(self.base.clone(), e.to_string()))?;
        let unreachable = |detail: String| Error::Unreachable {
            url: self.base.clone(),
            what: what.to_string(),
            detail,
        };
        let work = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut detail = error_chain(&e);
                if detail.contains("certificate") {
                    detail.push_str(
                        "; if Jenkins' certificate comes from a private CA, point SSL_CERT_FILE at that CA's PEM file",
                    );
                }
                let err = unreachable(detail);
                // No connection (refused, TLS handshake): the request was never sent.
                if e.is_connect() {
                    Error::NotSent(Box::new(err))
                } else {
                    err
                }
            })?;
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let version = header("x-jenkins");
            let identity = header("x-instance-identity");
            let cookie = resp
                .headers()
                .get_all(http::header::SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|c| c.split(';').next())
                .map(str::to_string)
                .collect::<Vec<_>>();
            let cookie = (!cookie.is_empty()).then(|| cookie.join("; "));
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(error_chain(&e)))?
                .to_bytes();
            Ok(Answer {
                status,
                version,
                identity,
                cookie,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(unreachable(format!(
                "no answer within {}s",
                self.timeout.as_secs()
            ))),
        }
    }

    fn refused(&self, what: &str, status: u16) -> Error {
        let hint = match status {
            401 => ": the credentials were not accepted (check the user:token in --jenkins-credentials)".to_string(),
            403 if self.auth.is_none() => ": pass --jenkins-credentials with an SSM parameter holding user:api-token".to_string(),
            403 => ": the user needs the Overall/Manage (or Administer) permission".to_string(),
            404 => ": is --jenkins-url the Jenkins root URL?".to_string(),
            _ => String::new(),
        };
        Error::Status {
            url: self.base.clone(),
            what: what.to_string(),
            status,
            hint,
        }
    }

    /// The CSRF crumb header and session cookie for a POST (None: Jenkins issues none).
    async fn crumb(&self) -> Result<Vec<(String, String)>, Error> {
        if let Ok(guard) = self.crumb.lock() {
            if let Some((field, crumb, cookie)) = guard.as_ref() {
                return Ok(headers(field, crumb, cookie.as_deref()));
            }
        }
        let a = self
            .call(
                http::Method::GET,
                "/crumbIssuer/api/json",
                "the CSRF crumb request",
                &[],
                true,
            )
            .await?;
        if a.status == 404 {
            return Ok(Vec::new());
        }
        if a.status != 200 {
            return Err(self.refused("the CSRF crumb request", a.status));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&a.body).map_err(|e| Error::BadAnswer {
                url: self.base.clone(),
                what: "the CSRF crumb request".into(),
                detail: e.to_string(),
            })?;
        let field = v["crumbRequestField"]
            .as_str()
            .unwrap_or("Jenkins-Crumb")
            .to_string();
        let crumb = v["crumb"].as_str().unwrap_or_default().to_string();
        let h = headers(&field, &crumb, a.cookie.as_deref());
        if let Ok(mut guard) = self.crumb.lock() {
            *guard = Some((field, crumb, a.cookie));
        }
        Ok(h)
    }

    async fn post(&self, path: &str, what: &str) -> Result<(), Error> {
        let extra = self
            .crumb()
            .await
            .map_err(|e| Error::NotSent(Box::new(e)))?;
        let a = self
            .call(http::Method::POST, path, what, &extra, true)
            .await?;
        // Jenkins answers these with a redirect to the root page.
        if (200..400).contains(&a.status) {
            Ok(())
        } else {
            Err(self.refused(what, a.status))
        }
    }

    /// Stops Jenkins from starting new builds (queued builds wait, and survive a restart).
    pub async fn quiet_down(&self) -> Result<(), Error> {
        self.post("/quietDown", "quiet-down").await
    }

    pub async fn cancel_quiet_down(&self) -> Result<(), Error> {
        self.post("/cancelQuietDown", "cancel quiet-down").await
    }

    /// Stops Jenkins cleanly once no build runs (it saves its queue, then exits): the JENKINS_HOME
    /// lease is released when it is gone.
    pub async fn safe_exit(&self) -> Result<(), Error> {
        self.post("/safeExit", "safe exit").await
    }

    /// Stops Jenkins at once (running builds are lost): for `--no-drain`.
    pub async fn exit(&self) -> Result<(), Error> {
        self.post("/exit", "exit").await
    }

    /// Whether the URL is plain HTTP (credentials would cross the network unencrypted).
    pub fn is_plain_http(&self) -> bool {
        self.base
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
    }

    /// The running builds: busy executors on every node, and flyweight (pipeline) executors.
    pub async fn busy(&self) -> Result<Busy, Error> {
        let what = "the executor status request";
        let a = self
            .call(
                http::Method::GET,
                "/computer/api/json?tree=busyExecutors,computer[displayName,executors[currentExecutable[url]],oneOffExecutors[currentExecutable[url]]]",
                what,
                &[],
                true,
            )
            .await?;
        if a.status != 200 {
            return Err(self.refused(what, a.status));
        }
        parse_busy(&a.body).map_err(|detail| Error::BadAnswer {
            url: self.base.clone(),
            what: what.into(),
            detail,
        })
    }

    /// GET `/login` (anonymous, as the load balancer's health check does).
    pub async fn login(&self) -> Result<LoginAnswer, Error> {
        let a = self
            .call(http::Method::GET, "/login", "GET /login", &[], false)
            .await?;
        Ok(LoginAnswer {
            status: a.status,
            version: a.version,
            identity: a.identity,
        })
    }
}

fn headers(field: &str, crumb: &str, cookie: Option<&str>) -> Vec<(String, String)> {
    let mut h = vec![(field.to_string(), crumb.to_string())];
    if let Some(c) = cookie {
        h.push(("Cookie".to_string(), c.to_string()));
    }
    h
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Counts what runs from `/computer/api/json`. Every executor with a `currentExecutable` is a
/// running build (or a pipeline's `node` block); flyweight executors run pipelines themselves.
pub fn parse_busy(body: &[u8]) -> Result<Busy, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut running = Vec::new();
    let mut seen_any = false;
    if let Some(computers) = v["computer"].as_array() {
        for c in computers {
            for list in ["executors", "oneOffExecutors"] {
                if let Some(execs) = c[list].as_array() {
                    seen_any = true;
                    for e in execs {
                        let cur = &e["currentExecutable"];
                        if !cur.is_null() {
                            running.push(cur["url"].as_str().unwrap_or("(a build)").to_string());
                        }
                    }
                }
            }
        }
    }
    let busy_field = v["busyExecutors"].as_u64();
    if !seen_any && busy_field.is_none() {
        return Err("neither busyExecutors nor computer[].executors in the answer".to_string());
    }
    let count = (running.len() as u64).max(busy_field.unwrap_or(0));
    Ok(Busy { count, running })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_busy_executors_and_flyweights() {
        let body = br#"{"busyExecutors":1,"computer":[
            {"displayName":"Built-In Node","executors":[{"currentExecutable":null}],
             "oneOffExecutors":[{"currentExecutable":{"url":"http://j/job/p/7/"}}]},
            {"displayName":"agent-1","executors":[{"currentExecutable":{"url":"http://j/job/a/3/"}},{"currentExecutable":null}],
             "oneOffExecutors":[]}]}"#;
        let b = parse_busy(body).expect("parses");
        assert_eq!(b.count, 2);
        assert_eq!(b.running, ["http://j/job/p/7/", "http://j/job/a/3/"]);
        // The roll's own build (a pipeline: its flyweight and node blocks) does not count.
        let own = b.clone().ignoring(&["http://j/job/p/7/".to_string()]);
        assert_eq!((own.count, own.running.len()), (1, 1));
        let none = b.ignoring(&["http://j/job/other/1/".to_string()]);
        assert_eq!(none.count, 2);
    }

    #[test]
    fn idle_and_bad_answers() {
        assert_eq!(
            parse_busy(br#"{"busyExecutors":0,"computer":[]}"#),
            Ok(Busy::default())
        );
        assert!(parse_busy(b"<html>").is_err());
        assert!(parse_busy(b"{}").is_err());
    }

    #[test]
    fn urls_are_checked() {
        assert!(Jenkins::new("ftp://x", None).is_err());
        assert!(Jenkins::new("not a url", None).is_err());
        assert!(Jenkins::new("http://jenkins.example:8080/", None).is_ok());
    }
}
