//! `jbake keys init|rotate|finish|show`: the controller→agents SSH key pair in SSM.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::build::AwsArgs;
use super::{interrupted, Failure};
use crate::aws::Aws;
use crate::keys::{self, Names, State};
use crate::progress::{Output, Progress};
use crate::recipe;

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Args)]
pub struct KeyFlags {
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Where the parameters are: PREFIX/id_rsa (private, SecureString), PREFIX/id_rsa.pub
    /// (the public keys agents accept), PREFIX/id_rsa.next (during a rotation).
    #[arg(long, value_name = "PATH", default_value = keys::DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate the key pair (ed25519, locally) and store it in SSM; refuses if it exists.
    Init {
        #[command(flatten)]
        flags: KeyFlags,
        /// The KMS key for the SecureString [default: the account's alias/aws/ssm].
        #[arg(long, value_name = "KEY")]
        kms_key_id: Option<String>,
    },
    /// Start a rotation: agents accept the old and a new key, then (after --agent-sync) the
    /// controller's parameter holds the new key. Resumes an interrupted rotation.
    Rotate {
        #[command(flatten)]
        flags: KeyFlags,
        /// The KMS key for the new SecureString [default: the account's alias/aws/ssm].
        #[arg(long, value_name = "KEY")]
        kms_key_id: Option<String>,
        /// How long agents need to pick up a new public key (their key sync interval, twice).
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = recipe::parse_duration)]
        agent_sync: Duration,
    },
    /// End a rotation's window: agents accept only the new key. Refuses until the controller
    /// has had --controller-sync to switch to it.
    Finish {
        #[command(flatten)]
        flags: KeyFlags,
        /// How long the controller needs to pick up a new private key (its refresh interval, twice).
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = recipe::parse_duration)]
        controller_sync: Duration,
    },
    /// Show the keys (fingerprints only) and where a rotation is.
    Show {
        #[command(flatten)]
        flags: KeyFlags,
    },
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = s.starts_with('/')
        && s.len() <= 900
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
        && !s.contains("//")
        && !s.to_ascii_lowercase().starts_with("/aws")
        && !s.to_ascii_lowercase().starts_with("/ssm");
    if ok {
        Ok(s.trim_end_matches('/').to_string())
    } else {
        Err(format!(
            "'{s}' is not an SSM parameter path for the keys (like /devops-tools/jenkins: /, letters, digits, _ . -; not under /aws or /ssm)"
        ))
    }
}

struct Lines<'a>(&'a Progress);

impl keys::Report for Lines<'_> {
    fn step(&self, text: &str) {
        self.0.info("keys", text);
    }
}

pub async fn keys_cmd(args: KeysArgs, output: Output, quiet: bool) -> Result<(), Failure> {
    let flags = match &args.command {
        KeysCommand::Init { flags, .. }
        | KeysCommand::Rotate { flags, .. }
        | KeysCommand::Finish { flags, .. }
        | KeysCommand::Show { flags } => flags,
    };
    let names = Names::new(&flags.prefix);
    let aws = Aws::new(&flags.aws.options()).await;
    let progress = Progress::new(output, quiet, Vec::new());
    let lines = Lines(&progress);
    let work = async {
        match &args.command {
            KeysCommand::Init { kms_key_id, .. } => {
                keys::init(&aws, &names, kms_key_id.as_deref(), &lines).await
            }
            KeysCommand::Rotate {
                kms_key_id,
                agent_sync,
                ..
            } => keys::rotate(&aws, &names, kms_key_id.as_deref(), *agent_sync, &lines).await,
            KeysCommand::Finish {
                controller_sync, ..
            } => keys::finish(&aws, &names, *controller_sync, &lines).await,
            KeysCommand::Show { .. } => keys::show(&aws, &names).await,
        }
    };
    let state = tokio::select! {
        r = work => r.map_err(|e| if e.is_refusal() { Failure::Input(e.into()) } else { Failure::Runtime(e.into()) })?,
        what = interrupted() => {
            return Err(Failure::Interrupted(format!(
                "{what}: what was written to SSM stays; `jbake keys show --prefix {}` says where the rotation is, and `jbake keys rotate` resumes it",
                flags.prefix
            )));
        }
    };
    print(&state, output);
    Ok(())
}

fn print(s: &State, output: Output) {
    if output == Output::Json {
        if let Ok(text) = serde_json::to_string(s) {
            println!("{text}");
        }
        return;
    }
    let line = |k: &keys::KeyInfo| format!("{} {} ({})", k.algorithm, k.fingerprint, k.comment);
    println!(
        "keys in {} and {}: {}",
        s.private_parameter, s.public_parameter, s.phase
    );
    match &s.controller {
        Some(k) => println!(
            "  controller uses  {}{}",
            line(k),
            s.controller_since
                .as_ref()
                .map(|t| format!(", since {t}"))
                .unwrap_or_default()
        ),
        None => println!("  controller uses  (no key)"),
    }
    for k in &s.accepted {
        println!("  agents accept    {}", line(k));
    }
    if let Some(k) = &s.pending {
        println!(
            "  pending          {} (`jbake keys rotate` completes the rotation)",
            line(k)
        );
    }
    match s.phase.as_str() {
        "window-open" => println!(
            "  next: `jbake keys finish` once the controller refreshed its key (it refuses before --controller-sync has passed)"
        ),
        "not-initialised" => println!("  next: `jbake keys init`"),
        _ => {}
    }
}
