//! AWS: thin clients built from the standard configuration chain (environment, profiles, SSO,
//! instance role), with the endpoint override every AWS tool honours (`--endpoint-url`,
//! `AWS_ENDPOINT_URL`), so the same code talks to AWS, LocalStack, a VPC endpoint or moto.

pub mod asg;
pub mod ec2;
pub mod elb;
pub mod instances;
pub mod kms;
pub mod launch_template;
pub mod params;
pub mod usage;
pub mod wait;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_smithy_types::error::display::DisplayErrorContext;

pub use asg::Asg;
pub use ec2::Ec2;
pub use elb::Elb;
pub use instances::Instances;
pub use kms::Kms;
pub use launch_template::LaunchTemplates;
pub use params::Params;

/// Where and as whom to call AWS.
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    pub region: String,
    pub profile: Option<String>,
    pub endpoint_url: Option<String>,
}

/// The clients one command uses, built once and passed down.
#[derive(Clone)]
pub struct Aws {
    pub ec2: Ec2,
    pub ssm: aws_sdk_ssm::Client,
    pub asg: Asg,
    pub elb: Elb,
    pub lt: LaunchTemplates,
    pub instances: Instances,
    /// What uses an image (`jbake prune`).
    pub usage: usage::ImageUsage,
    /// KMS keys (which key encrypts a region's copies, whether it can be shared).
    pub kms: Kms,
    /// SSM parameters that publish an image id (`--publish-ssm`).
    pub params: Params,
    pub region: String,
    /// What these clients were made from (for [`in_region`](Self::in_region)).
    pub options: AwsOptions,
}

/// How long one attempt of an AWS call may take: a minute (an answer that never comes is then
/// retried like a lost one). Debug builds read `JBAKE_TEST_ATTEMPT_TIMEOUT_MS`, so that the
/// tests can play such an answer without waiting a minute; release builds ignore it.
fn attempt_timeout() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("JBAKE_TEST_ATTEMPT_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_millis(ms);
    }
    Duration::from_secs(60)
}

impl Aws {
    /// Loads the configuration. Throttling (`RequestLimitExceeded`, HTTP 503) and transient errors
    /// (5xx, a dropped connection, an attempt past its minute) are retried by the SDK's standard
    /// retry mode (exponential backoff with jitter), up to 8 attempts per call.
    pub async fn new(opts: &AwsOptions) -> Aws {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(opts.region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(8)
                    .with_initial_backoff(Duration::from_millis(200)),
            )
            // An answer that never comes must not hang a cron job: each attempt gets a minute
            // (then the SDK retries it like any transient failure).
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(attempt_timeout())
                    .build(),
            );
        if let Some(p) = &opts.profile {
            loader = loader.profile_name(p);
        }
        if let Some(url) = &opts.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let conf = loader.load().await;
        Aws {
            ec2: Ec2::new(aws_sdk_ec2::Client::new(&conf), &opts.region),
            ssm: aws_sdk_ssm::Client::new(&conf),
            asg: Asg::new(aws_sdk_autoscaling::Client::new(&conf), &opts.region),
            elb: Elb::new(
                aws_sdk_elasticloadbalancingv2::Client::new(&conf),
                &opts.region,
            ),
            lt: LaunchTemplates::new(aws_sdk_ec2::Client::new(&conf), &opts.region),
            instances: Instances::new(aws_sdk_ec2::Client::new(&conf), &opts.region),
            usage: usage::ImageUsage::new(
                aws_sdk_ec2::Client::new(&conf),
                aws_sdk_autoscaling::Client::new(&conf),
                aws_sdk_ssm::Client::new(&conf),
                &opts.region,
            ),
            kms: Kms::new(aws_sdk_kms::Client::new(&conf), &opts.region),
            params: Params::new(aws_sdk_ssm::Client::new(&conf), &opts.region),
            region: opts.region.clone(),
            options: opts.clone(),
        }
    }

    /// The same clients (profile, endpoint, retries) for another region: the copies of an
    /// image live there.
    pub async fn in_region(&self, region: &str) -> Aws {
        Aws::new(&AwsOptions {
            region: region.to_string(),
            ..self.options.clone()
        })
        .await
    }
}

/// An AWS call that failed, with what was being done and the SDK's full error context.
#[derive(Debug)]
pub struct Error {
    pub what: String,
    pub region: String,
    /// The service's answer (`code: message`), or the SDK's error context.
    pub detail: String,
    /// The service's error code (`InvalidAMIID.NotFound`, `UnauthorizedOperation`, …) if any.
    pub code: Option<String>,
    /// The IAM action of the call (`ec2:RunInstances`), when known.
    pub action: Option<String>,
}

/// The policies jbake ships, by file name: an authorization failure says which of them allow
/// the refused action.
const POLICIES: [(&str, &str); 4] = [
    (
        "iam/jbake-build-policy.json",
        include_str!("../../iam/jbake-build-policy.json"),
    ),
    (
        "iam/jbake-keys-policy.json",
        include_str!("../../iam/jbake-keys-policy.json"),
    ),
    (
        "iam/jbake-prune-policy.json",
        include_str!("../../iam/jbake-prune-policy.json"),
    ),
    (
        "iam/jbake-roll-policy.json",
        include_str!("../../iam/jbake-roll-policy.json"),
    ),
];

/// The shipped policies whose statements list `action`.
fn policies_allowing(action: &str) -> Vec<&'static str> {
    POLICIES
        .iter()
        .filter(|(_, text)| {
            let doc: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            doc["Statement"].as_array().into_iter().flatten().any(|st| {
                st["Effect"] == "Allow"
                    && match &st["Action"] {
                        serde_json::Value::String(a) => a == action,
                        serde_json::Value::Array(a) => a.iter().any(|a| a == action),
                        _ => false,
                    }
            })
        })
        .map(|(name, _)| *name)
        .collect()
}

fn is_access_denied(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException")
    )
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} in {} failed: ", self.what, self.region)?;
        if !is_access_denied(self.code.as_deref()) {
            write!(f, "{}", self.detail)?;
            if matches!(
                self.code.as_deref(),
                Some("AuthFailure" | "InvalidClientTokenId" | "UnrecognizedClientException")
            ) {
                write!(
                    f,
                    " (check the AWS credentials: AWS_PROFILE, --profile, or the environment)"
                )?;
            }
            return Ok(());
        }
        // Say what is missing and where jbake's policies are, then what AWS said.
        match &self.action {
            Some(action) => {
                write!(
                    f,
                    "not authorized to perform {action}: check the IAM policy of these credentials"
                )?;
                match policies_allowing(action).as_slice() {
                    [] => write!(f, " (jbake's policies in iam/ do not list it)")?,
                    [one] => write!(f, " ({one} allows it)")?,
                    found => write!(f, " ({} allow it)", found.join(" and "))?,
                }
            }
            None => write!(
                f,
                "not authorized: check the IAM policy of these credentials \
                 (iam/jbake-build-policy.json for build and gc, iam/jbake-roll-policy.json for \
                 roll and status)"
            )?,
        }
        write!(f, "; AWS said: {}", self.detail)?;
        if self
            .detail
            .contains("Encoded authorization failure message")
        {
            write!(
                f,
                " (`aws sts decode-authorization-message --encoded-message …` shows which \
                 resource or condition refused it)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn new<E>(what: impl Into<String>, region: &str, err: E) -> Error
    where
        E: std::error::Error + aws_smithy_types::error::metadata::ProvideErrorMetadata + 'static,
    {
        let code = err.code().map(str::to_string);
        let detail = match (err.code(), err.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_string(),
            _ => DisplayErrorContext(&err).to_string(),
        };
        Error {
            what: what.into(),
            region: region.to_string(),
            detail,
            code,
            action: None,
        }
    }

    /// An error of jbake's own about AWS state (not from the SDK).
    pub fn other(what: impl Into<String>, region: &str, detail: impl Into<String>) -> Error {
        Error {
            what: what.into(),
            region: region.to_string(),
            detail: detail.into(),
            code: None,
            action: None,
        }
    }

    /// The IAM action of the call, e.g. `ssm:GetParameter`.
    pub fn action(mut self, action: impl Into<String>) -> Error {
        self.action = Some(action.into());
        self
    }

    /// The IAM action `service:Operation`, the operation being the first word of `what`
    /// (`RunInstances from ami-…`); nothing when `what` does not start with one.
    pub fn service(self, service: &str) -> Error {
        let op = self.what.split_whitespace().next().unwrap_or_default();
        let is_operation = op.starts_with(|c: char| c.is_ascii_uppercase())
            && op.chars().all(|c| c.is_ascii_alphanumeric());
        if is_operation {
            let action = format!("{service}:{op}");
            self.action(action)
        } else {
            self
        }
    }

    pub fn is_code(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// EC2 says the resource does not exist (`InvalidInstanceID.NotFound`,
    /// `InvalidGroup.NotFound`, `InvalidAMIID.NotFound`, `InvalidSnapshot.NotFound`, ...).
    pub fn is_not_found(&self) -> bool {
        self.code
            .as_deref()
            .is_some_and(|c| c.ends_with(".NotFound") || c == "InvalidAMIID.Unavailable")
    }

    /// The service refused the call: nothing was made or changed. `false` when the answer was
    /// lost, timed out or was a server error, after which the call may have taken effect.
    pub fn refused(&self) -> bool {
        match self.code.as_deref() {
            None => false,
            Some(c) => !matches!(
                c,
                "InternalError"
                    | "InternalFailure"
                    | "ServiceUnavailable"
                    | "Unavailable"
                    | "RequestLimitExceeded"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestTimeout"
                    | "RequestTimeoutException"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(what: &str, service: &str, detail: &str) -> Error {
        Error {
            what: what.to_string(),
            region: "us-east-1".to_string(),
            detail: detail.to_string(),
            code: Some("UnauthorizedOperation".to_string()),
            action: None,
        }
        .service(service)
    }

    #[test]
    fn an_authorization_failure_names_the_action_and_the_policy() {
        let e = denied(
            "RunInstances from ami-1",
            "ec2",
            "UnauthorizedOperation: You are not authorized to perform this operation.",
        );
        assert_eq!(e.action.as_deref(), Some("ec2:RunInstances"));
        assert_eq!(
            e.to_string(),
            "RunInstances from ami-1 in us-east-1 failed: not authorized to perform \
             ec2:RunInstances: check the IAM policy of these credentials \
             (iam/jbake-build-policy.json and iam/jbake-roll-policy.json allow it); AWS said: \
             UnauthorizedOperation: You are not authorized to perform this operation."
        );
        let e = denied("ImportKeyPair jbake-1", "ec2", "x");
        assert!(
            e.to_string()
                .contains("ec2:ImportKeyPair: check the IAM policy of these credentials (iam/jbake-build-policy.json allows it)"),
            "{e}"
        );
        let e = denied("UpdateAutoScalingGroup jenkins", "autoscaling", "x");
        assert!(
            e.to_string()
                .contains("(iam/jbake-roll-policy.json allows it)"),
            "{e}"
        );
        let e = denied("DeleteVolume vol-1", "ec2", "x");
        assert!(
            e.to_string()
                .contains("jbake's policies in iam/ do not list it"),
            "{e}"
        );
        // No operation name: the policies are still named.
        let e = denied("finding the default VPC", "ec2", "x");
        assert_eq!(e.action, None);
        assert!(
            e.to_string()
                .contains("iam/jbake-build-policy.json for build"),
            "{e}"
        );
        let e = denied("reading SSM parameter /p", "ssm", "x").action("ssm:GetParameter");
        assert!(e.to_string().contains("perform ssm:GetParameter"), "{e}");
        // AWS's encoded message can be decoded.
        let e = denied("RunInstances", "ec2", "UnauthorizedOperation: You are not authorized to perform this operation. Encoded authorization failure message: AbC");
        assert!(
            e.to_string()
                .contains("aws sts decode-authorization-message"),
            "{e}"
        );
    }

    #[test]
    fn other_errors_are_unchanged() {
        let mut e = denied(
            "DescribeImages ami-1",
            "ec2",
            "AuthFailure: AWS was not able to validate the provided access credentials",
        );
        e.code = Some("AuthFailure".to_string());
        assert_eq!(
            e.to_string(),
            "DescribeImages ami-1 in us-east-1 failed: AuthFailure: AWS was not able to validate \
             the provided access credentials (check the AWS credentials: AWS_PROFILE, --profile, \
             or the environment)"
        );
        let e = Error::other("CreateImage", "eu-west-1", "no image id in the answer");
        assert_eq!(
            e.to_string(),
            "CreateImage in eu-west-1 failed: no image id in the answer"
        );
    }
}
