//! One roll per group at a time: a lock AWS holds for jbake, no service of its own.
//!
//! The lock is an SSM parameter `/jbake/locks/roll/<group>` created with `PutParameter`
//! `Overwrite=false`, which is atomic: of two rolls, exactly one creates it, the other gets
//! `ParameterAlreadyExists` and refuses at once, naming the holder (the value says who, where,
//! since when and what). It is deleted on every exit path of the roll (success, failure,
//! Ctrl-C); only a killed roll (SIGKILL, a lost machine) leaves it, and then `--take-over-lock`
//! takes it over explicitly, after saying whose it was. Release deletes the parameter only while
//! it still holds this roll's token.

use std::time::SystemTime;

use aws_sdk_ssm::types::ParameterType;

use crate::aws::{self, Aws};
use crate::progress::Progress;

/// Where the locks live (the IAM policy scopes `ssm:PutParameter`/`DeleteParameter` to it).
pub const PREFIX: &str = "/jbake/locks/roll/";

/// Who holds a lock: the parameter's value (JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    /// `user@host`.
    pub by: String,
    pub pid: u32,
    /// RFC 3339, UTC.
    pub since: String,
    /// What the roll does (`roll group jenkins to ami-…`).
    pub doing: String,
    /// This roll's random token: release deletes only its own lock.
    pub token: String,
    pub jbake: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}, jbake {}) since {}: {}",
            self.by, self.pid, self.jbake, self.since, self.doing
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("group {group} is being rolled by {holder} (lock: SSM parameter {param}); nothing was changed. Wait for that roll to finish; if it was killed and nothing runs it any more, run again with --take-over-lock")]
    Held {
        group: String,
        param: String,
        holder: Box<Holder>,
    },
    #[error("group {group} is locked by SSM parameter {param}, whose value is not jbake's ({value:?}); nothing was changed. If no roll runs, delete the parameter or run again with --take-over-lock")]
    Foreign {
        group: String,
        param: String,
        value: String,
    },
    #[error(transparent)]
    Aws(#[from] aws::Error),
}

/// A lock this roll holds.
#[derive(Debug, Clone)]
pub struct Lock {
    pub param: String,
    pub group: String,
    pub holder: Holder,
}

/// The parameter name for `group` (SSM names allow `a-zA-Z0-9_.-`; other characters of a group
/// name become `_`, with a hash of the name so that two groups never share a lock).
pub fn param_name(group: &str) -> String {
    let clean: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == group {
        format!("{PREFIX}{group}")
    } else {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(group.as_bytes());
        let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("{PREFIX}{clean}-{hex}")
    }
}

fn me(doing: &str) -> Holder {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".to_string());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".to_string());
    let token: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    Holder {
        by: format!("{user}@{host}"),
        pid: std::process::id(),
        since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        doing: doing.to_string(),
        token,
        jbake: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// The current holder of `group`'s lock, if any (`Err(value)`: a value that is not jbake's).
pub async fn holder(aws: &Aws, group: &str) -> Result<Option<Result<Holder, String>>, aws::Error> {
    let param = param_name(group);
    match aws.ssm.get_parameter().name(&param).send().await {
        Ok(out) => {
            let value = out
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .to_string();
            Ok(Some(serde_json::from_str(&value).map_err(|_| value)))
        }
        Err(e) => {
            let e = aws::Error::new(
                format!("GetParameter {param} (the roll lock)"),
                &aws.region,
                e.into_service_error(),
            )
            .action("ssm:GetParameter");
            if e.is_code("ParameterNotFound") {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

async fn put(aws: &Aws, param: &str, group: &str, h: &Holder) -> Result<bool, aws::Error> {
    let value = serde_json::to_string(h).unwrap_or_default();
    match aws
        .ssm
        .put_parameter()
        .name(param)
        .value(value)
        .r#type(ParameterType::String)
        .overwrite(false)
        .description(format!(
            "jbake roll lock of Auto Scaling group {group}: one roll at a time"
        ))
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) => {
            let e = aws::Error::new(
                format!("PutParameter {param} (the roll lock)"),
                &aws.region,
                e.into_service_error(),
            )
            .action("ssm:PutParameter");
            if e.is_code("ParameterAlreadyExists") {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// The refusal for a lock found held (by `holder()`).
pub fn refusal(group: &str, holder: Result<Holder, String>) -> Error {
    let param = param_name(group);
    match holder {
        Ok(h) => Error::Held {
            group: group.to_string(),
            param,
            holder: Box::new(h),
        },
        Err(value) => Error::Foreign {
            group: group.to_string(),
            param,
            value,
        },
    }
}

async fn held(aws: &Aws, group: &str, param: &str) -> Error {
    match holder(aws, group).await {
        Ok(Some(Ok(h))) => Error::Held {
            group: group.to_string(),
            param: param.to_string(),
            holder: Box::new(h),
        },
        Ok(Some(Err(value))) => Error::Foreign {
            group: group.to_string(),
            param: param.to_string(),
            value,
        },
        // Released between our put and our read: say so as a held lock of unknown holder.
        Ok(None) => Error::Foreign {
            group: group.to_string(),
            param: param.to_string(),
            value: "(released meanwhile: try again)".to_string(),
        },
        Err(e) => Error::Aws(e),
    }
}

/// Takes `group`'s lock, or says who holds it. With `take_over`, a held lock is taken over
/// after saying whose it was (for a roll that was killed).
pub async fn acquire(
    aws: &Aws,
    group: &str,
    doing: &str,
    take_over: bool,
    progress: &Progress,
) -> Result<Lock, Error> {
    let param = param_name(group);
    let h = me(doing);
    if put(aws, &param, group, &h).await? {
        return Ok(Lock {
            param,
            group: group.to_string(),
            holder: h,
        });
    }
    if !take_over {
        return Err(held(aws, group, &param).await);
    }
    let was = match holder(aws, group).await? {
        Some(Ok(old)) => old.to_string(),
        Some(Err(value)) => format!("a value that is not jbake's: {value:?}"),
        None => "nobody (released meanwhile)".to_string(),
    };
    progress.warn(&format!(
        "--take-over-lock: taking over the roll lock of group {group} ({param}) held by {was}"
    ));
    if let Err(e) = aws.ssm.delete_parameter().name(&param).send().await {
        let e = aws::Error::new(
            format!("DeleteParameter {param} (taking over the roll lock)"),
            &aws.region,
            e.into_service_error(),
        )
        .action("ssm:DeleteParameter");
        if !e.is_code("ParameterNotFound") {
            return Err(e.into());
        }
    }
    // Another take-over may win between the delete and the put: then it holds the lock.
    if put(aws, &param, group, &h).await? {
        Ok(Lock {
            param,
            group: group.to_string(),
            holder: h,
        })
    } else {
        Err(held(aws, group, &param).await)
    }
}

/// Releases the lock if it is still this roll's. Err: it could not be deleted (the text says
/// how to delete it by hand).
pub async fn release(aws: &Aws, lock: &Lock) -> Result<(), String> {
    let manual = format!(
        "delete it once no roll runs: `aws ssm delete-parameter --region {} --name {}` (or the next roll's --take-over-lock)",
        aws.region, lock.param
    );
    match holder(aws, &lock.group).await {
        Ok(Some(Ok(h))) if h.token == lock.holder.token => {}
        Ok(Some(Ok(h))) => {
            return Err(format!(
                "the roll lock {} was taken over by {h} while this roll ran; it is left to them",
                lock.param
            ))
        }
        Ok(Some(Err(_))) | Ok(None) => return Ok(()),
        Err(e) => {
            return Err(format!(
                "{e}; the roll lock {} may remain: {manual}",
                lock.param
            ))
        }
    }
    match aws.ssm.delete_parameter().name(&lock.param).send().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = aws::Error::new(
                format!("DeleteParameter {} (releasing the roll lock)", lock.param),
                &aws.region,
                e.into_service_error(),
            )
            .action("ssm:DeleteParameter");
            if e.is_code("ParameterNotFound") {
                Ok(())
            } else {
                Err(format!("{e}: {manual}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_valid_ssm_names_and_never_shared() {
        assert_eq!(param_name("jenkins"), "/jbake/locks/roll/jenkins");
        assert_eq!(
            param_name("jenkins-ctl.1"),
            "/jbake/locks/roll/jenkins-ctl.1"
        );
        let a = param_name("jenkins prod");
        let b = param_name("jenkins:prod");
        assert!(a.starts_with("/jbake/locks/roll/jenkins_prod-"), "{a}");
        assert_ne!(a, b);
        assert!(a[1..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c)));
    }

    #[test]
    fn the_holder_round_trips_and_reads_well() {
        let h = me("roll group jenkins to ami-1");
        let json = serde_json::to_string(&h).expect("json");
        let back: Holder = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, h);
        assert_eq!(h.token.len(), 32);
        let text = h.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.ends_with(": roll group jenkins to ami-1"), "{text}");
    }
}
