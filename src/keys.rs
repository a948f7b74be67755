//! `jbake keys`: the SSH key pair the controller uses to log in to its agents, kept in SSM
//! Parameter Store and rotated without downtime.
//!
//! Parameters (under `--prefix`, default `/devops-tools/jenkins`, the names the original
//! system and the recipes' defaults use, kept although the key is ed25519):
//! - `PREFIX/id_rsa`: the controller's private key, SecureString (KMS: `--kms-key-id`, else the
//!   account's `alias/aws/ssm`); the controller image reads it at boot and then periodically.
//! - `PREFIX/id_rsa.pub`: the public keys agents accept, one per line; the agent image's key
//!   sync makes `authorized_keys` exactly these lines.
//! - `PREFIX/id_rsa.next`: only during a rotation: the new private key before it becomes the
//!   controller's (so an interrupted rotation resumes with the same key).
//!
//! The key is generated here, in memory; only SSM ever stores the private half; jbake prints
//! fingerprints only. A rotation (`rotate`, later `finish`):
//! 1. the new private key → `.next`; 2. `.pub` = old + new (agents accept both);
//! 3. wait `--agent-sync` after that write, so every agent's key sync ran;
//! 4. `id_rsa` = the new key (the controller switches at its next refresh), `.next` deleted;
//! 5. `finish`, once `--controller-sync` has passed since step 4: `.pub` = the new key only.
//!
//! Every step is checked against what SSM holds, so `rotate` resumes an interrupted rotation
//! and `finish` refuses to remove the key the controller may still use.

use std::time::{Duration, SystemTime};

use rand::Rng;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

use crate::aws::{self, Aws};
use crate::util::fmt_duration;

pub const DEFAULT_PREFIX: &str = "/devops-tools/jenkins";

/// The three parameter names of a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub private: String,
    pub public: String,
    pub next: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        let p = prefix.trim_end_matches('/');
        Names {
            private: format!("{p}/id_rsa"),
            public: format!("{p}/id_rsa.pub"),
            next: format!("{p}/id_rsa.next"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Aws(#[from] aws::Error),
    #[error("{parameter} already exists: the key pair is set up (`jbake keys show`); `jbake keys rotate` replaces the key")]
    AlreadyInitialised { parameter: String },
    #[error("{parameter} does not exist: run `jbake keys init` first")]
    NotInitialised { parameter: String },
    #[error("{parameter} does not hold an OpenSSH private key ({detail}); nothing was changed")]
    BadPrivateKey { parameter: String, detail: String },
    #[error("line {line} of {parameter} is not an SSH public key ({detail}); nothing was changed")]
    BadPublicKey {
        parameter: String,
        line: usize,
        detail: String,
    },
    #[error("the controller's key ({fingerprint}, in {private}) is not among the keys agents accept ({public}): the controller cannot log in to them; fix the parameters by hand (or `jbake keys rotate` after `jbake keys finish`)")]
    Inconsistent {
        fingerprint: String,
        private: String,
        public: String,
    },
    #[error("a rotation's window is open ({public} holds {count} keys): run `jbake keys finish` once the controller uses the new key, then rotate again")]
    WindowOpen { public: String, count: usize },
    #[error(
        "a rotation is not complete ({next} exists): run `jbake keys rotate` to complete it first"
    )]
    RotationPending { next: String },
    #[error("the controller switched to the new key {ago} ago and may still use the old one until its next refresh: wait {wait} more (run `jbake keys finish` again then), or pass --controller-sync with its real refresh interval")]
    TooSoon { ago: String, wait: String },
    #[error("cannot generate the key: {0}")]
    Generate(String),
}

impl Error {
    /// Whether nothing was changed because of the state or the input (exit 2).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Error::Aws(_) | Error::Generate(_))
    }
}

/// One SSM parameter as read.
#[derive(Debug, Clone)]
pub struct Param {
    pub value: String,
    pub version: i64,
    pub modified: Option<SystemTime>,
}

/// A key as shown: never its private half.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub fingerprint: String,
    pub algorithm: String,
    pub comment: String,
}

impl KeyInfo {
    fn of(k: &PublicKey) -> KeyInfo {
        KeyInfo {
            fingerprint: k.fingerprint(HashAlg::Sha256).to_string(),
            algorithm: k.algorithm().as_str().to_string(),
            comment: k.comment().to_string(),
        }
    }
}

/// What `show` reports (and the other commands print at the end).
#[derive(Debug, Clone, serde::Serialize)]
pub struct State {
    pub private_parameter: String,
    pub public_parameter: String,
    /// The controller's key (from the private key's public half).
    pub controller: Option<KeyInfo>,
    pub controller_version: Option<i64>,
    pub controller_since: Option<String>,
    /// What agents accept, in the parameter's order (newest last).
    pub accepted: Vec<KeyInfo>,
    /// A rotation was interrupted before the controller got the new key.
    pub pending: Option<KeyInfo>,
    /// `steady`, `window-open`, `rotation-pending`, `not-initialised`, `inconsistent`.
    pub phase: String,
}

fn generate(comment: &str) -> Result<PrivateKey, Error> {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill(&mut seed);
    let mut key: PrivateKey = Ed25519Keypair::from_seed(&seed).into();
    seed.fill(0);
    key.set_comment(comment);
    Ok(key)
}

fn openssh_private(k: &PrivateKey) -> Result<String, Error> {
    k.to_openssh(LineEnding::LF)
        .map(|z| z.to_string())
        .map_err(|e| Error::Generate(e.to_string()))
}

fn openssh_public(k: &PublicKey) -> Result<String, Error> {
    k.to_openssh().map_err(|e| Error::Generate(e.to_string()))
}

fn parse_private(parameter: &str, text: &str) -> Result<PrivateKey, Error> {
    PrivateKey::from_openssh(text.trim()).map_err(|e| Error::BadPrivateKey {
        parameter: parameter.to_string(),
        detail: e.to_string(),
    })
}

/// The public keys of an authorized_keys-style value (blank lines and `#` comments skipped).
pub fn parse_public(parameter: &str, text: &str) -> Result<Vec<PublicKey>, Error> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(
            PublicKey::from_openssh(line).map_err(|e| Error::BadPublicKey {
                parameter: parameter.to_string(),
                line: n + 1,
                detail: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// The value of the public parameter for these keys (one per line, newest last).
pub fn public_value(keys: &[&PublicKey]) -> Result<String, Error> {
    let mut s = String::new();
    for k in keys {
        s.push_str(&openssh_public(k)?);
        s.push('\n');
    }
    Ok(s)
}

fn same(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn comment_now() -> String {
    format!("jenkins-agents-{}", rfc3339(SystemTime::now()))
}

/// The SSM calls `jbake keys` makes.
struct Ssm<'a> {
    aws: &'a Aws,
    kms_key_id: Option<&'a str>,
}

impl Ssm<'_> {
    async fn get(&self, name: &str) -> Result<Option<Param>, Error> {
        match self
            .aws
            .ssm
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
        {
            Ok(out) => Ok(out.parameter().map(|p| Param {
                value: p.value().unwrap_or_default().to_string(),
                version: p.version(),
                modified: p
                    .last_modified_date()
                    .and_then(|d| SystemTime::try_from(*d).ok()),
            })),
            Err(e) => {
                let e = e.into_service_error();
                if e.is_parameter_not_found() {
                    Ok(None)
                } else {
                    Err(aws::Error::new(
                        format!("reading SSM parameter {name}"),
                        &self.aws.region,
                        e,
                    )
                    .action("ssm:GetParameter")
                    .into())
                }
            }
        }
    }

    /// Writes a parameter; `create`: only if it does not exist (fails otherwise).
    async fn put(&self, name: &str, value: &str, secure: bool, create: bool) -> Result<(), Error> {
        use aws_sdk_ssm::types::{ParameterType, Tag};
        let mut req = self
            .aws
            .ssm
            .put_parameter()
            .name(name)
            .value(value)
            .overwrite(!create)
            .r#type(if secure {
                ParameterType::SecureString
            } else {
                ParameterType::String
            })
            .description(if secure {
                "Jenkins controller's SSH private key for its agents (jbake keys)"
            } else {
                "SSH public keys Jenkins agents accept (jbake keys)"
            });
        if secure {
            if let Some(k) = self.kms_key_id {
                req = req.key_id(k);
            }
        }
        if create {
            // Tags only at creation (PutParameter refuses tags with Overwrite).
            req = req.tags(
                Tag::builder()
                    .key("jbake:managed-by")
                    .value("jbake keys")
                    .build()
                    .map_err(|e| Error::Generate(e.to_string()))?,
            );
        }
        req.send().await.map_err(|e| {
            let e = e.into_service_error();
            if e.is_parameter_already_exists() {
                Error::AlreadyInitialised {
                    parameter: name.to_string(),
                }
            } else {
                aws::Error::new(format!("writing SSM parameter {name}"), &self.aws.region, e)
                    .action("ssm:PutParameter")
                    .into()
            }
        })?;
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        match self.aws.ssm.delete_parameter().name(name).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = e.into_service_error();
                if e.is_parameter_not_found() {
                    Ok(())
                } else {
                    Err(aws::Error::new(
                        format!("deleting SSM parameter {name}"),
                        &self.aws.region,
                        e,
                    )
                    .action("ssm:DeleteParameter")
                    .into())
                }
            }
        }
    }
}

/// What SSM holds, parsed.
struct Current {
    private: Option<(Param, PrivateKey)>,
    public: Option<(Param, Vec<PublicKey>)>,
    next: Option<(Param, PrivateKey)>,
}

async fn read(ssm: &Ssm<'_>, names: &Names) -> Result<Current, Error> {
    let private = match ssm.get(&names.private).await? {
        Some(p) => {
            let k = parse_private(&names.private, &p.value)?;
            Some((p, k))
        }
        None => None,
    };
    let public = match ssm.get(&names.public).await? {
        Some(p) => {
            let keys = parse_public(&names.public, &p.value)?;
            Some((p, keys))
        }
        None => None,
    };
    let next = match ssm.get(&names.next).await? {
        Some(p) => {
            let k = parse_private(&names.next, &p.value)?;
            Some((p, k))
        }
        None => None,
    };
    Ok(Current {
        private,
        public,
        next,
    })
}

fn state(names: &Names, c: &Current) -> State {
    let controller = c.private.as_ref().map(|(_, k)| KeyInfo::of(k.public_key()));
    let accepted: Vec<KeyInfo> = c
        .public
        .as_ref()
        .map(|(_, ks)| ks.iter().map(KeyInfo::of).collect())
        .unwrap_or_default();
    let consistent = match (&c.private, &c.public) {
        (Some((_, k)), Some((_, ks))) => ks.iter().any(|p| same(p, k.public_key())),
        _ => false,
    };
    let phase = if c.private.is_none() || c.public.is_none() {
        "not-initialised"
    } else if c.next.is_some() {
        "rotation-pending"
    } else if !consistent {
        "inconsistent"
    } else if accepted.len() > 1 {
        "window-open"
    } else {
        "steady"
    };
    State {
        private_parameter: names.private.clone(),
        public_parameter: names.public.clone(),
        controller,
        controller_version: c.private.as_ref().map(|(p, _)| p.version),
        controller_since: c
            .private
            .as_ref()
            .and_then(|(p, _)| p.modified.map(rfc3339)),
        accepted,
        pending: c.next.as_ref().map(|(_, k)| KeyInfo::of(k.public_key())),
        phase: phase.to_string(),
    }
}

/// Where the command is, for progress lines.
pub trait Report {
    fn step(&self, text: &str);
}

pub async fn show(aws: &Aws, names: &Names) -> Result<State, Error> {
    let ssm = Ssm {
        aws,
        kms_key_id: None,
    };
    Ok(state(names, &read(&ssm, names).await?))
}

/// A new key pair: private → SSM (SecureString), public → SSM. Refuses if either exists.
pub async fn init(
    aws: &Aws,
    names: &Names,
    kms_key_id: Option<&str>,
    report: &dyn Report,
) -> Result<State, Error> {
    let ssm = Ssm { aws, kms_key_id };
    for name in [&names.private, &names.public] {
        if ssm.get(name).await?.is_some() {
            return Err(Error::AlreadyInitialised {
                parameter: name.clone(),
            });
        }
    }
    let key = generate(&comment_now())?;
    report.step(&format!(
        "generated an ed25519 key {}",
        key.public_key().fingerprint(HashAlg::Sha256)
    ));
    ssm.put(&names.private, &openssh_private(&key)?, true, true)
        .await?;
    report.step(&format!(
        "wrote the private key to {} (SecureString)",
        names.private
    ));
    if let Err(e) = ssm
        .put(
            &names.public,
            &public_value(&[key.public_key()])?,
            false,
            true,
        )
        .await
    {
        // Not half set up: the private key nobody can use goes again.
        let _ = ssm.delete(&names.private).await;
        return Err(e);
    }
    report.step(&format!("wrote the public key to {}", names.public));
    show(aws, names).await
}

/// Rotates (or resumes an interrupted rotation), up to the controller's switch to the new key.
pub async fn rotate(
    aws: &Aws,
    names: &Names,
    kms_key_id: Option<&str>,
    agent_sync: Duration,
    report: &dyn Report,
) -> Result<State, Error> {
    let ssm = Ssm { aws, kms_key_id };
    let c = read(&ssm, names).await?;
    let Some((_, old)) = &c.private else {
        return Err(Error::NotInitialised {
            parameter: names.private.clone(),
        });
    };
    let Some((_, accepted)) = &c.public else {
        return Err(Error::NotInitialised {
            parameter: names.public.clone(),
        });
    };
    let old_pub = old.public_key().clone();
    let new = match &c.next {
        Some((_, k)) => {
            report.step(&format!(
                "resuming the rotation to {} ({} exists)",
                k.public_key().fingerprint(HashAlg::Sha256),
                names.next
            ));
            k.clone()
        }
        None => {
            if !accepted.iter().any(|p| same(p, &old_pub)) {
                return Err(Error::Inconsistent {
                    fingerprint: old_pub.fingerprint(HashAlg::Sha256).to_string(),
                    private: names.private.clone(),
                    public: names.public.clone(),
                });
            }
            if accepted.len() > 1 {
                return Err(Error::WindowOpen {
                    public: names.public.clone(),
                    count: accepted.len(),
                });
            }
            let k = generate(&comment_now())?;
            ssm.put(&names.next, &openssh_private(&k)?, true, true)
                .await?;
            report.step(&format!(
                "generated a new ed25519 key {} (kept in {} until the controller gets it)",
                k.public_key().fingerprint(HashAlg::Sha256),
                names.next
            ));
            k
        }
    };
    let new_pub = new.public_key().clone();
    // Agents accept both: the controller's current key and the new one.
    // How long ago agents could first see the new key (0: just now).
    let since = if accepted.iter().any(|p| same(p, &new_pub)) {
        ssm.get(&names.public)
            .await?
            .and_then(|p| p.modified)
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default()
    } else {
        let mut keys: Vec<&PublicKey> = accepted.iter().filter(|p| same(p, &old_pub)).collect();
        keys.push(&new_pub);
        ssm.put(&names.public, &public_value(&keys)?, false, false)
            .await?;
        report.step(&format!(
            "{} now holds the current and the new key: agents accept both from their next key sync",
            names.public
        ));
        Duration::ZERO
    };
    // Every agent's key sync must have run before the controller uses the new key.
    if let Some(left) = agent_sync.checked_sub(since).filter(|d| !d.is_zero()) {
        report.step(&format!(
            "waiting {} for every agent's key sync (--agent-sync {}; interrupting is safe: `jbake keys rotate` resumes)",
            fmt_duration(left),
            fmt_duration(agent_sync)
        ));
        tokio::time::sleep(left).await;
    }
    ssm.put(&names.private, &openssh_private(&new)?, true, false)
        .await?;
    ssm.delete(&names.next).await?;
    report.step(&format!(
        "{} now holds the new key: the controller switches to it at its next key refresh",
        names.private
    ));
    show(aws, names).await
}

/// Ends a rotation's window: agents accept only the controller's key.
pub async fn finish(
    aws: &Aws,
    names: &Names,
    controller_sync: Duration,
    report: &dyn Report,
) -> Result<State, Error> {
    let ssm = Ssm {
        aws,
        kms_key_id: None,
    };
    let c = read(&ssm, names).await?;
    if c.next.is_some() {
        return Err(Error::RotationPending {
            next: names.next.clone(),
        });
    }
    let (Some((private, key)), Some((_, accepted))) = (&c.private, &c.public) else {
        return Err(Error::NotInitialised {
            parameter: names.private.clone(),
        });
    };
    let current = key.public_key();
    if !accepted.iter().any(|p| same(p, current)) {
        return Err(Error::Inconsistent {
            fingerprint: current.fingerprint(HashAlg::Sha256).to_string(),
            private: names.private.clone(),
            public: names.public.clone(),
        });
    }
    if accepted.len() == 1 {
        report.step("no rotation window is open: agents accept only the controller's key");
        return show(aws, names).await;
    }
    let ago = private
        .modified
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    if let Some(wait) = controller_sync.checked_sub(ago).filter(|d| !d.is_zero()) {
        return Err(Error::TooSoon {
            ago: fmt_duration(ago),
            wait: fmt_duration(wait),
        });
    }
    let removed: Vec<String> = accepted
        .iter()
        .filter(|p| !same(p, current))
        .map(|p| p.fingerprint(HashAlg::Sha256).to_string())
        .collect();
    ssm.put(&names.public, &public_value(&[current])?, false, false)
        .await?;
    report.step(&format!(
        "{} holds only the controller's key: agents stop accepting {} at their next key sync",
        names.public,
        removed.join(", ")
    ));
    show(aws, names).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_public_values() {
        let n = Names::new("/devops-tools/jenkins/");
        assert_eq!(n.private, "/devops-tools/jenkins/id_rsa");
        assert_eq!(n.public, "/devops-tools/jenkins/id_rsa.pub");
        assert_eq!(n.next, "/devops-tools/jenkins/id_rsa.next");
        let a = generate("a").unwrap();
        let b = generate("b").unwrap();
        let v = public_value(&[a.public_key(), b.public_key()]).unwrap();
        assert_eq!(v.lines().count(), 2);
        let back = parse_public("p", &format!("# comment\n\n{v}")).unwrap();
        assert!(same(&back[0], a.public_key()) && same(&back[1], b.public_key()));
        assert!(!same(&back[0], b.public_key()));
        let e = parse_public("p", "ssh-ed25519 notbase64").unwrap_err();
        assert!(e.to_string().contains("line 1 of p"), "{e}");
        // The private key round-trips, and its Debug/Display never show it.
        let text = openssh_private(&a).unwrap();
        assert!(text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let again = parse_private("p", &text).unwrap();
        assert!(same(again.public_key(), a.public_key()));
        let shown = format!("{:?}", KeyInfo::of(a.public_key()));
        assert!(!shown.contains("PRIVATE"));
    }
}
