//! AWS: thin clients built from the standard configuration chain (environment, profiles, SSO,
//! instance role), with the endpoint override every AWS tool honours (`--endpoint-url`,
//! `AWS_ENDPOINT_URL`), so the same code talks to AWS, LocalStack, a VPC endpoint or moto.

pub mod asg;
pub mod ec2;
pub mod elb;
pub mod instances;
pub mod launch_template;
pub mod wait;

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_smithy_types::error::display::DisplayErrorContext;

pub use asg::Asg;
pub use ec2::Ec2;
pub use elb::Elb;
pub use instances::Instances;
pub use launch_template::LaunchTemplates;

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
    pub region: String,
}

impl Aws {
    /// Loads the configuration. Throttling and transient errors are retried by the SDK's standard
    /// retry mode (exponential backoff with jitter), up to 8 attempts per call.
    pub async fn new(opts: &AwsOptions) -> Aws {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(opts.region.clone()))
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(8)
                    .with_initial_backoff(Duration::from_millis(200)),
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
            region: opts.region.clone(),
        }
    }
}

/// An AWS call that failed, with what was being done and the SDK's full error context.
#[derive(Debug, thiserror::Error)]
#[error("{what} in {region} failed: {detail}")]
pub struct Error {
    pub what: String,
    pub region: String,
    pub detail: String,
    /// The service's error code (`InvalidAMIID.NotFound`, `UnauthorizedOperation`, …) if any.
    pub code: Option<String>,
}

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
        let hint = match code.as_deref() {
            Some("UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException") => {
                " (the credentials lack this permission: see iam/jbake-build-policy.json and iam/jbake-roll-policy.json)"
            }
            Some("AuthFailure" | "InvalidClientTokenId" | "UnrecognizedClientException") => {
                " (check the AWS credentials: AWS_PROFILE, --profile, or the environment)"
            }
            _ => "",
        };
        Error {
            what: what.into(),
            region: region.to_string(),
            detail: format!("{detail}{hint}"),
            code,
        }
    }

    /// An error of jbake's own about AWS state (not from the SDK).
    pub fn other(what: impl Into<String>, region: &str, detail: impl Into<String>) -> Error {
        Error {
            what: what.into(),
            region: region.to_string(),
            detail: detail.into(),
            code: None,
        }
    }

    pub fn is_code(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}
