//! Step 1: find the controller's Auto Scaling group, its launch template version, the running
//! instance (EC2's view of its AMI), the target groups and the load balancer.

use crate::aws::asg::{GroupInfo, TemplateRef};
use crate::aws::elb::{LoadBalancerInfo, TargetGroupInfo};
use crate::aws::instances::InstanceImage;
use crate::aws::launch_template::TemplateVersion;
use crate::aws::Aws;

use super::error::{Error, Refusal};

/// The tag that marks the controller's group when `--asg` is not given.
pub const ROLE_TAG: &str = "jbake:role";
pub const ROLE_CONTROLLER: &str = "controller";

#[derive(Debug, Clone)]
pub struct Discovered {
    pub group: GroupInfo,
    /// The launch template as the group names it (its version may be `$Latest`/`$Default`).
    pub template: TemplateRef,
    /// The version the group's reference resolves to now.
    pub current: TemplateVersion,
    /// The template's newest version when it is newer than `current` (made outside the roll,
    /// e.g. by Terraform, or by a roll that was rolled back).
    pub newer: Option<TemplateVersion>,
    /// The version the roll's new version is made from: `current`, or `newer` with
    /// `--from-latest`.
    pub source: TemplateVersion,
    /// The template's default version number now.
    pub default_version: i64,
    /// The highest version number of the template.
    pub latest_version: i64,
    /// The group's instances as EC2 sees them (in service or not).
    pub instances: Vec<InstanceImage>,
    pub target_groups: Vec<TargetGroupInfo>,
    pub load_balancers: Vec<LoadBalancerInfo>,
}

impl Discovered {
    /// The one running controller instance.
    pub fn running(&self) -> Option<&InstanceImage> {
        self.instances.iter().find(|i| {
            i.state == "running"
                && self
                    .group
                    .instances
                    .iter()
                    .any(|g| g.id == i.id && g.lifecycle == "InService")
        })
    }
}

/// The group by name, or the only one tagged `jbake:role=controller`.
pub async fn find_group(aws: &Aws, name: Option<&str>) -> Result<GroupInfo, Error> {
    if let Some(name) = name {
        return aws.asg.group(name).await?.ok_or_else(|| {
            Refusal::NoGroup {
                name: name.to_string(),
                region: aws.region.clone(),
            }
            .into()
        });
    }
    let mut tagged: Vec<GroupInfo> = aws
        .asg
        .groups()
        .await?
        .into_iter()
        .filter(|g| g.tag(ROLE_TAG) == Some(ROLE_CONTROLLER))
        .collect();
    match tagged.len() {
        0 => Err(Refusal::NoTaggedGroup {
            region: aws.region.clone(),
            tag: ROLE_TAG,
            value: ROLE_CONTROLLER,
        }
        .into()),
        1 => Ok(tagged.remove(0)),
        _ => Err(Refusal::ManyTaggedGroups {
            region: aws.region.clone(),
            tag: ROLE_TAG,
            value: ROLE_CONTROLLER,
            names: tagged.into_iter().map(|g| g.name).collect(),
        }
        .into()),
    }
}

pub async fn discover(aws: &Aws, name: Option<&str>) -> Result<Discovered, Error> {
    let group = find_group(aws, name).await?;
    let template = group
        .template
        .clone()
        .ok_or_else(|| Refusal::NotLaunchTemplate {
            group: group.name.clone(),
            launches_from: group
                .other_launch_source
                .clone()
                .unwrap_or_else(|| "something else".to_string()),
        })?;
    let missing = |v: &str| -> Error {
        Refusal::NoVersion {
            template_id: template.id.clone(),
            template_name: template.name.clone(),
            group: group.name.clone(),
            version: v.to_string(),
        }
        .into()
    };
    let current = aws
        .lt
        .version(&template.id, &template.version)
        .await?
        .ok_or_else(|| missing(&template.version))?;
    let default_version = if current.is_default {
        current.number
    } else {
        aws.lt
            .version(&template.id, "$Default")
            .await?
            .ok_or_else(|| missing("$Default"))?
            .number
    };
    let latest = aws.lt.version(&template.id, "$Latest").await?;
    let latest_version = latest.as_ref().map_or(current.number, |v| v.number);
    let newer = latest.filter(|v| v.number > current.number);
    let ids: Vec<String> = group.instances.iter().map(|i| i.id.clone()).collect();
    let instances = aws.instances.describe(&ids).await?;
    let target_groups = aws.elb.target_groups(&group.target_group_arns).await?;
    let mut lb_arns: Vec<String> = target_groups
        .iter()
        .flat_map(|t| t.load_balancer_arns.iter().cloned())
        .collect();
    lb_arns.sort();
    lb_arns.dedup();
    let load_balancers = aws.elb.load_balancers(&lb_arns).await?;
    Ok(Discovered {
        group,
        template,
        source: current.clone(),
        current,
        newer,
        default_version,
        latest_version,
        instances,
        target_groups,
        load_balancers,
    })
}
