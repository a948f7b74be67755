//! What can stop a bake, with what the user needs to act on it.

use std::path::PathBuf;
use std::time::Duration;

use crate::aws;
use crate::exec;
use crate::manifest;
use crate::recipe;
use crate::util::fmt_duration;

pub use super::public_ip::PublicIpError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Recipe(#[from] recipe::Error),
    #[error(transparent)]
    Aws(#[from] aws::Error),
    #[error(transparent)]
    Exec(Box<exec::Error>),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error(transparent)]
    PublicIp(#[from] PublicIpError),
    /// Options this build cannot honour (checked before anything is made).
    #[error(transparent)]
    Refused(#[from] super::distribute::Refusal),
    #[error(transparent)]
    Distribute(#[from] super::distribute::Error),
    /// `jbake test`: the image cannot be tested.
    #[error(transparent)]
    Retest(#[from] super::retest::Refusal),
    /// A flag's value cannot work (checked before any AWS call).
    #[error("{flag} {value}: {why}")]
    Option {
        flag: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("cannot read {} for the content hash: {source}", path.display())]
    HashInput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the build's one-time SSH key: {0}")]
    Key(russh::keys::ssh_key::Error),
    #[error("VPC {vpc} has no IPv4 CIDR block: pass --ssh-cidr")]
    NoVpcCidr { vpc: String },
    #[error("{instance} has no {interface} IP address: {hint}")]
    NoAddress {
        instance: String,
        interface: &'static str,
        hint: &'static str,
    },
    #[error(
        "instance {id} is {state} before the build could use it (its console output may say \
         why: aws ec2 get-console-output --instance-id {id})"
    )]
    InstanceGone { id: String, state: String },
    #[error("{}", test_failed(.image, .name, *.checks, .failures, *.kept))]
    TestFailed {
        image: String,
        name: String,
        /// How many checks ran.
        checks: usize,
        /// Each failed check, with what it printed last.
        failures: Vec<String>,
        /// The image is kept (tagged `jbake:tested=false`).
        kept: bool,
    },
    #[error(
        "boot test of {image}: its test instance {instance} could not be reached ({source}). \
         Either the image does not boot to sshd, or jbake cannot reach the instance \
         (--ssh-interface, --subnet-id, --bastion); its console output may say which: aws ec2 \
         get-console-output --instance-id {instance} (--on-error abort keeps it)"
    )]
    TestUnreachable {
        image: String,
        instance: String,
        #[source]
        source: Box<exec::Error>,
    },
    #[error("image {id} is {state}: EC2 could not make it")]
    ImageFailed { id: String, state: String },
    #[error(
        "no free image name {recipe}-{day}-N after {attempts} tries: other builds of the recipe \
         keep taking the numbers"
    )]
    NoFreeName {
        recipe: String,
        day: String,
        attempts: u32,
    },
    #[error("{what} timed out after {}: it is still {state}", fmt_duration(*waited))]
    Timeout {
        what: String,
        state: String,
        waited: Duration,
    },
}

fn test_failed(image: &str, name: &str, checks: usize, failures: &[String], kept: bool) -> String {
    let mut s = format!(
        "image {image} ({name}) failed its boot test: {} of {checks} checks failed",
        failures.len()
    );
    for f in failures {
        s.push('\n');
        s.push_str(f);
    }
    s.push('\n');
    s.push_str(if kept {
        "the image is kept for debugging, tagged jbake:tested=false: `jbake roll` never rolls it \
         out and `jbake prune` removes it (launch an instance of it to look; --on-error abort \
         also keeps the test instance)"
    } else {
        "the image was removed with the rest"
    });
    s
}

impl From<exec::Error> for Error {
    fn from(e: exec::Error) -> Error {
        Error::Exec(Box::new(e))
    }
}

/// The base image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("SSM parameter {0} has no value")]
    EmptyParameter(String),
    #[error("no available image is named {name} (owners {owners})")]
    NoMatch { name: String, owners: String },
    #[error(
        "{count} images match name {name}: {list}; narrow the filter or set most_recent: true"
    )]
    Ambiguous {
        count: usize,
        name: String,
        list: String,
    },
    #[error("base image {id} does not exist in {region}")]
    Missing { id: String, region: String },
    #[error("base image {id} is {state}, not available")]
    NotAvailable { id: String, state: String },
}
