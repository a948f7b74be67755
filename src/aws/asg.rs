//! The Auto Scaling calls `jbake roll` and `jbake status` make.

use aws_sdk_autoscaling::types::{AutoScalingGroup, LaunchTemplateSpecification};

use super::Error;

/// The launch template a group launches from: id, name and the version as the group says it
/// (`"3"`, `"$Latest"` or `"$Default"`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TemplateRef {
    pub id: String,
    pub name: String,
    pub version: String,
}

/// One instance of a group, as the group sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupInstance {
    pub id: String,
    /// `Pending`, `InService`, `Terminating`, …
    pub lifecycle: String,
    /// `Healthy` / `Unhealthy`.
    pub health: String,
    /// Scale-in protection: the group never picks it when its desired capacity goes down.
    pub protected: bool,
}

/// A group's minimum, maximum and desired capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Sizes {
    pub min: i32,
    pub max: i32,
    pub desired: i32,
}

impl std::fmt::Display for Sizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min {} max {} desired {}",
            self.min, self.max, self.desired
        )
    }
}

/// An Auto Scaling group, as jbake needs it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    pub template: Option<TemplateRef>,
    /// Why `template` is None: the group uses a launch configuration or a mixed instances policy.
    pub other_launch_source: Option<String>,
    pub instances: Vec<GroupInstance>,
    pub target_group_arns: Vec<String>,
    pub tags: Vec<(String, String)>,
    /// The processes suspended now (`ReplaceUnhealthy`, `AZRebalance`, …), sorted.
    pub suspended: Vec<String>,
    /// `EC2` or `ELB` (the group replaces instances whose target is unhealthy).
    pub health_check_type: String,
}

impl GroupInfo {
    fn from(g: &AutoScalingGroup) -> GroupInfo {
        let template = g.launch_template().map(|t| TemplateRef {
            id: t.launch_template_id().unwrap_or_default().to_string(),
            name: t.launch_template_name().unwrap_or_default().to_string(),
            version: t.version().unwrap_or("$Default").to_string(),
        });
        let other_launch_source = if template.is_some() {
            None
        } else if let Some(lc) = g.launch_configuration_name() {
            Some(format!("launch configuration {lc}"))
        } else if g.mixed_instances_policy().is_some() {
            Some("a mixed instances policy".to_string())
        } else {
            Some("no launch template".to_string())
        };
        GroupInfo {
            name: g.auto_scaling_group_name().unwrap_or_default().to_string(),
            min: g.min_size().unwrap_or(0),
            max: g.max_size().unwrap_or(0),
            desired: g.desired_capacity().unwrap_or(0),
            template,
            other_launch_source,
            instances: g
                .instances()
                .iter()
                .map(|i| GroupInstance {
                    id: i.instance_id().unwrap_or_default().to_string(),
                    lifecycle: i
                        .lifecycle_state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    health: i.health_status().unwrap_or_default().to_string(),
                    protected: i.protected_from_scale_in().unwrap_or(false),
                })
                .collect(),
            target_group_arns: g.target_group_arns().to_vec(),
            tags: g
                .tags()
                .iter()
                .map(|t| {
                    (
                        t.key().unwrap_or_default().to_string(),
                        t.value().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
            suspended: {
                let mut s: Vec<String> = g
                    .suspended_processes()
                    .iter()
                    .filter_map(|p| p.process_name().map(str::to_string))
                    .collect();
                s.sort();
                s
            },
            health_check_type: g.health_check_type().unwrap_or("EC2").to_string(),
        }
    }

    /// The group's sizes.
    pub fn sizes(&self) -> Sizes {
        Sizes {
            min: self.min,
            max: self.max,
            desired: self.desired,
        }
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
pub struct Asg {
    client: aws_sdk_autoscaling::Client,
    region: String,
}

impl Asg {
    pub fn new(client: aws_sdk_autoscaling::Client, region: &str) -> Asg {
        Asg {
            client,
            region: region.to_string(),
        }
    }

    fn err<E>(&self, what: impl Into<String>, e: E) -> Error
    where
        E: std::error::Error + aws_smithy_types::error::metadata::ProvideErrorMetadata + 'static,
    {
        Error::new(what, &self.region, e).service("autoscaling")
    }

    /// The group named `name`, or None.
    pub async fn group(&self, name: &str) -> Result<Option<GroupInfo>, Error> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeAutoScalingGroups {name}"),
                    e.into_service_error(),
                )
            })?;
        Ok(out
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .map(GroupInfo::from))
    }

    /// Every group in the region (all pages, with the SDK's paginator).
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, Error> {
        let mut items = self
            .client
            .describe_auto_scaling_groups()
            .into_paginator()
            .items()
            .send();
        let mut all = Vec::new();
        while let Some(g) = items.next().await {
            let g = g.map_err(|e| self.err("DescribeAutoScalingGroups", e.into_service_error()))?;
            all.push(GroupInfo::from(&g));
        }
        Ok(all)
    }

    /// Points the group at launch template `id` version `version` (an explicit number, or
    /// `$Latest`/`$Default` when restoring what the group had).
    pub async fn set_template_version(
        &self,
        group: &str,
        template_id: &str,
        version: &str,
    ) -> Result<(), Error> {
        self.client
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_id(template_id)
                    .version(version)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("UpdateAutoScalingGroup {group} (launch template {template_id} version {version})"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Sets the group's maximum and desired capacity (the minimum is never changed).
    pub async fn set_capacity(&self, group: &str, max: i32, desired: i32) -> Result<(), Error> {
        self.client
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .max_size(max)
            .desired_capacity(desired)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("UpdateAutoScalingGroup {group} (max {max}, desired {desired})"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Sets only the group's maximum capacity.
    pub async fn set_max(&self, group: &str, max: i32) -> Result<(), Error> {
        self.client
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .max_size(max)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("UpdateAutoScalingGroup {group} (max {max})"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Suspends `processes` of the group (those already suspended stay so).
    pub async fn suspend(&self, group: &str, processes: &[String]) -> Result<(), Error> {
        if processes.is_empty() {
            return Ok(());
        }
        self.client
            .suspend_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.to_vec()))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("SuspendProcesses {group} ({})", processes.join(", ")),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Resumes `processes` of the group.
    pub async fn resume(&self, group: &str, processes: &[String]) -> Result<(), Error> {
        if processes.is_empty() {
            return Ok(());
        }
        self.client
            .resume_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.to_vec()))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("ResumeProcesses {group} ({})", processes.join(", ")),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Sets the scale-in protection of one instance of the group.
    pub async fn protect(&self, group: &str, instance_id: &str, on: bool) -> Result<(), Error> {
        self.client
            .set_instance_protection()
            .auto_scaling_group_name(group)
            .instance_ids(instance_id)
            .protected_from_scale_in(on)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!(
                        "SetInstanceProtection {group} {instance_id} ({})",
                        if on { "protected" } else { "unprotected" }
                    ),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Terminates exactly this instance of the group and lowers the desired capacity by one:
    /// no replacement is launched.
    pub async fn terminate_decrementing(&self, instance_id: &str) -> Result<(), Error> {
        self.client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(true)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("TerminateInstanceInAutoScalingGroup {instance_id} (lowering the desired capacity)"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Terminates a group's instance without lowering the desired capacity: the group launches
    /// a replacement from its launch template.
    pub async fn terminate_keeping_capacity(&self, instance_id: &str) -> Result<(), Error> {
        self.client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("TerminateInstanceInAutoScalingGroup {instance_id}"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }
}
