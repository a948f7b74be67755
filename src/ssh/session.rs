//! Connecting: retries with backoff until a deadline, host key verification, public key auth.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::{self, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};

use super::Error;

/// `user@host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    /// Parses `user@host`, `user@host:port` and `user@[v6addr]:port`.
    pub fn parse(s: &str) -> Result<Target, String> {
        let (user, rest) = s
            .split_once('@')
            .ok_or_else(|| format!("'{s}' is not USER@HOST[:PORT]"))?;
        if user.is_empty() {
            return Err(format!("'{s}' has no user before '@'"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| format!("'{s}': missing ']' after the IPv6 address"))?;
            (h.to_string(), tail.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (rest.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("'{s}' has no host"));
        }
        let port = match port {
            None => 22,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("'{s}': '{p}' is not a port number"))?,
        };
        Ok(Target {
            user: user.to_string(),
            host,
            port,
        })
    }

    /// `host:port` as shown in messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.user, self.addr())
    }
}

/// How the server's host key is checked. There is no silent "accept anything".
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// The key must be exactly this one (`--host-key 'ssh-ed25519 AAAA…'`).
    Pinned(PublicKey),
    /// The key must be recorded for this host in an OpenSSH known_hosts file.
    KnownHosts(PathBuf),
    /// Accept any key (`--insecure-ignore-host-key`); the caller says so loudly.
    Insecure,
}

impl HostKeyPolicy {
    /// Parses an OpenSSH public key line: `ssh-ed25519 AAAA… [comment]`.
    pub fn parse_pinned(s: &str) -> Result<HostKeyPolicy, String> {
        let mut parts = s.split_whitespace();
        let (alg, b64) = match (parts.next(), parts.next()) {
            (Some(a), Some(b)) => (a, b),
            (Some(b), None) => ("", b),
            _ => return Err("an empty host key".to_string()),
        };
        let key = keys::parse_public_key_base64(b64)
            .map_err(|e| format!("'{s}' is not an SSH public key: {e}"))?;
        if !alg.is_empty() && key.algorithm().as_str() != alg {
            return Err(format!(
                "the key says it is '{alg}' but its data is '{}'",
                key.algorithm().as_str()
            ));
        }
        Ok(HostKeyPolicy::Pinned(key))
    }
}

/// The private key to log in with.
#[derive(Clone)]
pub enum Identity {
    /// An OpenSSH private key file (`--identity`).
    File(PathBuf),
    /// A key held only in memory (a build's temporary key: never written to disk).
    Key(Arc<PrivateKey>),
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::File(p) => write!(f, "{}", p.display()),
            Identity::Key(k) => write!(f, "in-memory {} key", k.algorithm().as_str()),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::File(p) => write!(f, "{}", p.display()),
            Identity::Key(_) => write!(f, "the build's temporary key"),
        }
    }
}

/// Options for [`Session::connect`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub target: Target,
    pub identity: Identity,
    pub host_key: HostKeyPolicy,
    /// Keep trying (refused, reset, not yet authorised) until this much time has passed.
    pub deadline: Duration,
    /// Keepalive interval; the connection is declared dead after 4 unanswered.
    pub keepalive: Duration,
    /// Reach the target through this jump host (`ssh -J`), e.g. a bastion in the VPC.
    pub jump: Option<Jump>,
}

/// A jump host: its own login and its own host key check; the target's connection is tunnelled
/// through it (a `direct-tcpip` channel), so the target's host key is still verified end to end.
#[derive(Debug, Clone)]
pub struct Jump {
    pub target: Target,
    pub identity: Identity,
    pub host_key: HostKeyPolicy,
}

/// What the server showed and what we concluded, shared with the russh handler.
#[derive(Debug, Default)]
struct Seen {
    fingerprint: Option<String>,
    rejection: Option<String>,
}

struct Client {
    target: Target,
    policy: HostKeyPolicy,
    seen: Arc<Mutex<Seen>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        presented: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = &presented.public_key();
        let fp = key.fingerprint(HashAlg::Sha256).to_string();
        let verdict = match &self.policy {
            HostKeyPolicy::Insecure => Ok(()),
            HostKeyPolicy::Pinned(pinned) => {
                if pinned.key_data() == key.key_data() {
                    Ok(())
                } else {
                    Err(format!(
                        "the server presented {} {fp}, but --host-key pins {} {}. If the machine was \
                         rebuilt, update the pin; otherwise someone may be intercepting the connection",
                        key.algorithm().as_str(),
                        pinned.algorithm().as_str(),
                        pinned.fingerprint(HashAlg::Sha256)
                    ))
                }
            }
            HostKeyPolicy::KnownHosts(path) => {
                match keys::check_known_hosts_path(&self.target.host, self.target.port, key, path) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "{} is not in {} (the server presented {} {fp}); add it, or pin it with \
                         --host-key",
                        self.target.addr(),
                        path.display(),
                        key.algorithm().as_str()
                    )),
                    Err(keys::Error::KeyChanged { line }) => Err(format!(
                        "the host key of {} CHANGED: {}:{line} records another key, the server \
                         presented {} {fp}. If the machine was rebuilt, remove that line; \
                         otherwise someone may be intercepting the connection",
                        self.target.addr(),
                        path.display(),
                        key.algorithm().as_str()
                    )),
                    Err(e) => Err(format!("cannot read {}: {e}", path.display())),
                }
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.fingerprint = Some(format!("{} {fp}", key.algorithm().as_str()));
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                seen.rejection = Some(why);
                Ok(false)
            }
        }
    }
}

/// One authenticated SSH connection.
pub struct Session {
    handle: Handle<Client>,
    /// The jump host's connection, kept open as long as the tunnel through it.
    jump: Option<Handle<Client>>,
    pub target: Target,
    /// The host key's fingerprint, e.g. `ssh-ed25519 SHA256:…`.
    pub host_key_fingerprint: String,
    /// How many connection attempts it took.
    pub attempts: u32,
}

fn load_identity(path: &Path) -> Result<PrivateKey, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Identity {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    keys::decode_secret_key(&text, None).map_err(|e| Error::Identity {
        path: path.to_path_buf(),
        detail: match e {
            keys::Error::KeyIsEncrypted => {
                "it is encrypted with a passphrase; use an unencrypted key (e.g. in a 0600 file) \
                 or an agent-less copy"
                    .to_string()
            }
            other => format!("not a private key jbake can read ({other})"),
        },
    })
}

/// Why one attempt failed, and whether trying again can help.
enum Attempt {
    Retry(String),
    /// The server refused the key: the target may still be booting (retry), a jump host is not.
    Rejected(Error),
    Fatal(Error),
}

fn key_of(identity: &Identity) -> Result<Arc<PrivateKey>, Error> {
    match identity {
        Identity::File(path) => Ok(Arc::new(load_identity(path)?)),
        Identity::Key(k) => Ok(k.clone()),
    }
}

/// One hop: who to log in as, how to check the host, and over what.
struct Hop<'a> {
    target: &'a Target,
    identity: &'a Identity,
    key: &'a Arc<PrivateKey>,
    policy: &'a HostKeyPolicy,
}

impl Session {
    /// Connects, retrying refused/reset/timed-out connections and rejected authentication (an
    /// instance whose cloud-init has not installed the key yet) with backoff until the deadline.
    /// A host key that fails verification is never retried, nor is a jump host that rejects
    /// its key.
    pub async fn connect(opts: &ConnectOptions) -> Result<Session, Error> {
        let key = key_of(&opts.identity)?;
        let jump_key = match &opts.jump {
            Some(j) => Some(key_of(&j.identity)?),
            None => None,
        };
        let start = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = match Self::attempt(opts, &key, jump_key.as_ref()).await {
                Ok((handle, fp, jump)) => {
                    return Ok(Session {
                        handle,
                        jump,
                        target: opts.target.clone(),
                        host_key_fingerprint: fp,
                        attempts,
                    })
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(why)) => why,
                Err(Attempt::Rejected(e)) => e.to_string(),
            };
            let waited = start.elapsed();
            if waited >= opts.deadline {
                return Err(Error::ConnectTimeout {
                    target: opts.target.addr(),
                    waited,
                    last,
                });
            }
            tracing::debug!(
                attempt = attempts,
                "connect to {} failed: {last}; retrying",
                opts.target
            );
            tokio::time::sleep(backoff.min(opts.deadline - waited)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn attempt(
        opts: &ConnectOptions,
        key: &Arc<PrivateKey>,
        jump_key: Option<&Arc<PrivateKey>>,
    ) -> Result<(Handle<Client>, String, Option<Handle<Client>>), Attempt> {
        let hop = Hop {
            target: &opts.target,
            identity: &opts.identity,
            key,
            policy: &opts.host_key,
        };
        let (Some(jump), Some(jump_key)) = (&opts.jump, jump_key) else {
            let (handle, fp) = Self::login(opts, &hop, None).await?;
            return Ok((handle, fp, None));
        };
        let via = Hop {
            target: &jump.target,
            identity: &jump.identity,
            key: jump_key,
            policy: &jump.host_key,
        };
        let (jump_handle, _) = match Self::login(opts, &via, None).await {
            // The jump host is not booting: a rejected key there is a configuration error.
            Err(Attempt::Rejected(e)) => return Err(Attempt::Fatal(e)),
            Err(Attempt::Retry(why)) => {
                return Err(Attempt::Retry(format!(
                    "jump host {}: {why}",
                    jump.target.addr()
                )))
            }
            other => other?,
        };
        let channel = jump_handle
            .channel_open_direct_tcpip(
                opts.target.host.clone(),
                u32::from(opts.target.port),
                "127.0.0.1",
                0,
            )
            .await
            .map_err(|e| {
                Attempt::Retry(format!(
                    "jump host {} could not open a tunnel to {}: {}",
                    jump.target.addr(),
                    opts.target.addr(),
                    describe_connect_error(&e)
                ))
            })?;
        let (handle, fp) = Self::login(opts, &hop, Some(channel.into_stream())).await?;
        Ok((handle, fp, Some(jump_handle)))
    }

    /// TCP (or the given tunnel), SSH handshake with host key check, public key login.
    async fn login(
        opts: &ConnectOptions,
        hop: &Hop<'_>,
        tunnel: Option<russh::ChannelStream<client::Msg>>,
    ) -> Result<(Handle<Client>, String), Attempt> {
        let config = Arc::new(client::Config {
            keepalive_interval: Some(opts.keepalive),
            keepalive_max: 4,
            nodelay: true,
            ..Default::default()
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let handler = Client {
            target: hop.target.clone(),
            policy: hop.policy.clone(),
            seen: seen.clone(),
        };
        let per_attempt = Duration::from_secs(15).min(opts.deadline.max(Duration::from_secs(1)));
        let connected = match tunnel {
            None => {
                let addr = (hop.target.host.as_str(), hop.target.port);
                tokio::time::timeout(per_attempt, client::connect(config, addr, handler)).await
            }
            Some(stream) => {
                tokio::time::timeout(per_attempt, client::connect_stream(config, stream, handler))
                    .await
            }
        };
        let take_seen = || {
            let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
            (s.fingerprint.take(), s.rejection.take())
        };
        let mut handle = match connected {
            Err(_) => return Err(Attempt::Retry("timed out".to_string())),
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                if let (_, Some(why)) = take_seen() {
                    return Err(Attempt::Fatal(Error::HostKey {
                        target: hop.target.addr(),
                        detail: why,
                    }));
                }
                return Err(Attempt::Retry(describe_connect_error(&e)));
            }
        };
        let fingerprint = take_seen().0.unwrap_or_default();
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let auth = handle
            .authenticate_publickey(
                hop.target.user.clone(),
                PrivateKeyWithHashAlg::new(hop.key.clone(), hash),
            )
            .await
            .map_err(|e| Attempt::Retry(describe_connect_error(&e)))?;
        if !auth.success() {
            return Err(Attempt::Rejected(Error::AuthRejected {
                target: hop.target.addr(),
                user: hop.target.user.clone(),
                identity: hop.identity.to_string(),
            }));
        }
        Ok((handle, fingerprint))
    }

    /// Opens a new session channel on this connection.
    pub(crate) async fn open_channel(
        &self,
    ) -> Result<russh::Channel<russh::client::Msg>, russh::Error> {
        self.handle.channel_open_session().await
    }

    /// Politely closes the connection (and the jump host's).
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        if let Some(jump) = self.jump {
            let _ = jump
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }
}

fn describe_connect_error(e: &russh::Error) -> String {
    match e {
        russh::Error::IO(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::ConnectionReset => "connection reset".to_string(),
            _ => io.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("admin@10.0.0.5").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("admin", "10.0.0.5", 22)
        );
        let t = Target::parse("u@localhost:2222").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.port, 2222);
        let t = Target::parse("u@[::1]:2200").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (t.host.as_str(), t.port, t.addr()),
            ("::1", 2200, "[::1]:2200".to_string())
        );
        for bad in [
            "nohost",
            "@h",
            "u@",
            "u@h:0",
            "u@h:99999",
            "u@h:x",
            "u@[::1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn pinned_keys() {
        let ok =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ me@x";
        assert!(HostKeyPolicy::parse_pinned(ok).is_ok());
        let wrong_alg =
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        assert!(HostKeyPolicy::parse_pinned(wrong_alg).is_err());
        assert!(HostKeyPolicy::parse_pinned("ssh-ed25519 notbase64!!").is_err());
        assert!(HostKeyPolicy::parse_pinned("").is_err());
    }
}
