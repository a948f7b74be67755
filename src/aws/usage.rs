//! What uses an image, for `jbake prune`: every version of every launch template in the region
//! (an `ImageId` of `resolve:ssm:NAME` is resolved through SSM), every instance that is not
//! terminated (stopped ones included: they start again from their volume, but a replacement or
//! a rollback needs the image), and every launch configuration. An image named by any of them
//! is in use and is never pruned.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, InstanceStateName};

use super::Error;

/// Something that launches (or launched) from an image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reference {
    LaunchTemplate {
        id: String,
        name: String,
        version: i64,
        /// The SSM parameter the version names instead of an AMI id.
        via_ssm: Option<String>,
    },
    Instance {
        id: String,
        state: String,
    },
    LaunchConfiguration {
        name: String,
    },
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::LaunchTemplate {
                id,
                name,
                version,
                via_ssm,
            } => {
                write!(f, "launch template {id} ({name}) version {version}")?;
                if let Some(p) = via_ssm {
                    write!(f, " through SSM parameter {p}")?;
                }
                Ok(())
            }
            Reference::Instance { id, state } => write!(f, "instance {id} ({state})"),
            Reference::LaunchConfiguration { name } => write!(f, "launch configuration {name}"),
        }
    }
}

/// AMI id → what uses it. `warnings`: references that could not be resolved (a
/// `resolve:ssm:` parameter that no longer exists), said to the operator.
#[derive(Debug, Default)]
pub struct Usage {
    pub by_image: BTreeMap<String, Vec<Reference>>,
    pub warnings: Vec<String>,
}

#[derive(Clone)]
pub struct ImageUsage {
    ec2: aws_sdk_ec2::Client,
    asg: aws_sdk_autoscaling::Client,
    ssm: aws_sdk_ssm::Client,
    region: String,
}

/// `resolve:ssm:NAME[:VERSION|:LABEL]` → the parameter as GetParameter takes it.
pub fn ssm_alias(image_id: &str) -> Option<&str> {
    image_id.strip_prefix("resolve:ssm:")
}

impl ImageUsage {
    pub fn new(
        ec2: aws_sdk_ec2::Client,
        asg: aws_sdk_autoscaling::Client,
        ssm: aws_sdk_ssm::Client,
        region: &str,
    ) -> ImageUsage {
        ImageUsage {
            ec2,
            asg,
            ssm,
            region: region.to_string(),
        }
    }

    fn err<E>(&self, what: impl Into<String>, service: &str, e: E) -> Error
    where
        E: std::error::Error + aws_smithy_types::error::metadata::ProvideErrorMetadata + 'static,
    {
        Error::new(what, &self.region, e).service(service)
    }

    /// Everything that uses an image in the region.
    pub async fn scan(&self) -> Result<Usage, Error> {
        let mut usage = Usage::default();
        self.launch_templates(&mut usage).await?;
        self.instances(&mut usage).await?;
        self.launch_configurations(&mut usage).await?;
        for refs in usage.by_image.values_mut() {
            refs.sort();
            refs.dedup();
        }
        Ok(usage)
    }

    async fn launch_templates(&self, usage: &mut Usage) -> Result<(), Error> {
        let mut templates = Vec::new();
        let mut pages = self.ec2.describe_launch_templates().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page
                .map_err(|e| self.err("DescribeLaunchTemplates", "ec2", e.into_service_error()))?;
            for t in page.launch_templates() {
                templates.push((
                    t.launch_template_id().unwrap_or_default().to_string(),
                    t.launch_template_name().unwrap_or_default().to_string(),
                ));
            }
        }
        let mut resolved: BTreeMap<String, Option<String>> = BTreeMap::new();
        for (id, name) in templates {
            let mut pages = self
                .ec2
                .describe_launch_template_versions()
                .launch_template_id(&id)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| {
                    self.err(
                        format!("DescribeLaunchTemplateVersions {id}"),
                        "ec2",
                        e.into_service_error(),
                    )
                })?;
                for v in page.launch_template_versions() {
                    let Some(image) = v.launch_template_data().and_then(|d| d.image_id()) else {
                        continue;
                    };
                    let version = v.version_number().unwrap_or_default();
                    let (ami, via_ssm) = match ssm_alias(image) {
                        None => (Some(image.to_string()), None),
                        Some(param) => {
                            if !resolved.contains_key(param) {
                                let value = self.resolve(param).await?;
                                if value.is_none() {
                                    usage.warnings.push(format!(
                                        "launch template {id} ({name}) version {version} names SSM parameter {param}, which does not exist: it cannot launch, and does not keep an image"
                                    ));
                                }
                                resolved.insert(param.to_string(), value);
                            }
                            (
                                resolved.get(param).cloned().flatten(),
                                Some(param.to_string()),
                            )
                        }
                    };
                    if let Some(ami) = ami {
                        usage
                            .by_image
                            .entry(ami)
                            .or_default()
                            .push(Reference::LaunchTemplate {
                                id: id.clone(),
                                name: name.clone(),
                                version,
                                via_ssm,
                            });
                    }
                }
            }
        }
        Ok(())
    }

    /// The AMI id an SSM parameter holds; None if it does not exist.
    async fn resolve(&self, param: &str) -> Result<Option<String>, Error> {
        match self.ssm.get_parameter().name(param).send().await {
            Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
            Err(e) => {
                let e = e.into_service_error();
                if e.is_parameter_not_found() || e.is_parameter_version_not_found() {
                    Ok(None)
                } else {
                    Err(
                        Error::new(format!("reading SSM parameter {param}"), &self.region, e)
                            .action("ssm:GetParameter"),
                    )
                }
            }
        }
    }

    async fn instances(&self, usage: &mut Usage) -> Result<(), Error> {
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("shutting-down")
                    .values("stopping")
                    .values("stopped")
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| self.err("DescribeInstances", "ec2", e.into_service_error()))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                let state = i.state().and_then(|s| s.name());
                if state == Some(&InstanceStateName::Terminated) {
                    continue;
                }
                if let (Some(ami), Some(id)) = (i.image_id(), i.instance_id()) {
                    usage
                        .by_image
                        .entry(ami.to_string())
                        .or_default()
                        .push(Reference::Instance {
                            id: id.to_string(),
                            state: state.map(|s| s.as_str().to_string()).unwrap_or_default(),
                        });
                }
            }
        }
        Ok(())
    }

    async fn launch_configurations(&self, usage: &mut Usage) -> Result<(), Error> {
        let mut pages = self
            .asg
            .describe_launch_configurations()
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                self.err(
                    "DescribeLaunchConfigurations",
                    "autoscaling",
                    e.into_service_error(),
                )
            })?;
            for lc in page.launch_configurations() {
                if let (Some(ami), Some(name)) = (lc.image_id(), lc.launch_configuration_name()) {
                    usage.by_image.entry(ami.to_string()).or_default().push(
                        Reference::LaunchConfiguration {
                            name: name.to_string(),
                        },
                    );
                }
            }
        }
        Ok(())
    }
}
