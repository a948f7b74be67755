//! `jbake status`: the controller's group, its instances (EC2's view of their AMI), the launch
//! template versions with their AMIs and jbake image versions, and target health.

use std::collections::HashMap;

use crate::aws::Aws;

use super::discover;
use super::error::Error;
use super::lock;
use super::plan::ImageSummary;

#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceStatus {
    pub id: String,
    pub lifecycle: String,
    pub health: String,
    pub state: String,
    pub image: Option<ImageSummary>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionStatus {
    pub number: i64,
    pub default: bool,
    /// The group launches from this version.
    pub used_by_group: bool,
    pub description: Option<String>,
    pub image: Option<ImageSummary>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetStatus {
    pub target_group: String,
    pub id: String,
    pub state: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub group: String,
    pub min: i32,
    pub max: i32,
    pub desired: i32,
    pub launch_template: String,
    pub launch_template_name: String,
    pub group_version: String,
    pub resolved_version: i64,
    pub instances: Vec<InstanceStatus>,
    pub versions: Vec<VersionStatus>,
    pub targets: Vec<TargetStatus>,
    pub load_balancers: Vec<(String, String)>,
    /// The group's suspended processes (a roll suspends some while it runs).
    pub suspended: Vec<String>,
    /// Who holds the group's roll lock (a roll runs, or a killed one left it).
    pub roll_lock: Option<String>,
    /// A newer template version than the group's that differs in more than its image (a change
    /// made outside jbake roll, e.g. by Terraform): what the next roll will say about it.
    pub newer_version: Option<String>,
}

/// How many launch template versions `status` shows (newest first).
const VERSIONS_SHOWN: usize = 10;

pub async fn status(aws: &Aws, asg: Option<&str>) -> Result<Status, Error> {
    let d = discover::discover(aws, asg).await?;
    let versions = aws.lt.versions(&d.template.id).await?;
    let mut images: HashMap<String, Option<ImageSummary>> = HashMap::new();
    let mut instances = Vec::new();
    for gi in &d.group.instances {
        let ec2 = d.instances.iter().find(|i| i.id == gi.id);
        instances.push(InstanceStatus {
            id: gi.id.clone(),
            lifecycle: gi.lifecycle.clone(),
            health: gi.health.clone(),
            state: ec2
                .map(|i| i.state.clone())
                .unwrap_or_else(|| "unknown".into()),
            image: match ec2 {
                Some(i) => image(aws, &mut images, &i.image_id).await?,
                None => None,
            },
        });
    }
    let mut vs = Vec::new();
    for v in versions.iter().take(VERSIONS_SHOWN) {
        vs.push(VersionStatus {
            number: v.number,
            default: v.is_default,
            used_by_group: v.number == d.current.number,
            description: v.description.clone(),
            image: image(aws, &mut images, v.image_id.as_deref().unwrap_or_default()).await?,
        });
    }
    let mut targets = Vec::new();
    for tg in &d.target_groups {
        for t in aws.elb.target_health(&tg.arn).await? {
            targets.push(TargetStatus {
                target_group: tg.name.clone(),
                id: t.id,
                state: t.state,
                reason: t.reason,
            });
        }
    }
    let roll_lock = lock::holder(aws, &d.group.name).await?.map(|h| match h {
        Ok(h) => h.to_string(),
        Err(value) => format!("a value that is not jbake's: {value:?}"),
    });
    let newer_version = super::plan::Drift::of(&d).and_then(|x| super::plan::drift_note(&x, false));
    Ok(Status {
        newer_version,
        suspended: d.group.suspended.clone(),
        roll_lock,
        group: d.group.name.clone(),
        min: d.group.min,
        max: d.group.max,
        desired: d.group.desired,
        launch_template: d.template.id.clone(),
        launch_template_name: d.template.name.clone(),
        group_version: d.template.version.clone(),
        resolved_version: d.current.number,
        instances,
        versions: vs,
        targets,
        load_balancers: d
            .load_balancers
            .iter()
            .map(|l| (l.name.clone(), l.url()))
            .collect(),
    })
}

async fn image(
    aws: &Aws,
    cache: &mut HashMap<String, Option<ImageSummary>>,
    id: &str,
) -> Result<Option<ImageSummary>, Error> {
    if id.is_empty() {
        return Ok(None);
    }
    if let Some(i) = cache.get(id) {
        return Ok(i.clone());
    }
    let found = Some(match aws.ec2.image(id).await? {
        Some(i) => ImageSummary::of(&i),
        None => ImageSummary::unknown(id),
    });
    cache.insert(id.to_string(), found.clone());
    Ok(found)
}

fn image_text(i: &Option<ImageSummary>) -> String {
    i.as_ref().map(|i| i.label()).unwrap_or_else(|| "-".into())
}

impl Status {
    pub fn text(&self) -> String {
        let mut s = format!(
            "group {} (min {} max {} desired {})\n  launch template {} ({}) version {}{}\n",
            self.group,
            self.min,
            self.max,
            self.desired,
            self.launch_template,
            self.launch_template_name,
            self.resolved_version,
            if self.group_version == self.resolved_version.to_string() {
                String::new()
            } else {
                format!(" (group says {})", self.group_version)
            }
        );
        if !self.suspended.is_empty() {
            s.push_str(&format!(
                "  suspended processes: {}\n",
                self.suspended.join(", ")
            ));
        }
        if let Some(h) = &self.roll_lock {
            s.push_str(&format!(
                "  roll lock ({}): held by {h}\n",
                lock::param_name(&self.group)
            ));
        }
        if let Some(note) = &self.newer_version {
            s.push_str(&format!("  note: {note}\n"));
        }
        for (name, url) in &self.load_balancers {
            s.push_str(&format!("  load balancer {name}: {url}\n"));
        }
        s.push_str("instances:\n");
        if self.instances.is_empty() {
            s.push_str("  (none)\n");
        }
        for i in &self.instances {
            s.push_str(&format!(
                "  {}  {} {} {}  {}\n",
                i.id,
                i.lifecycle,
                i.health,
                i.state,
                image_text(&i.image)
            ));
        }
        s.push_str("launch template versions (newest first):\n");
        for v in &self.versions {
            let mut marks = Vec::new();
            if v.default {
                marks.push("default");
            }
            if v.used_by_group {
                marks.push("group");
            }
            s.push_str(&format!(
                "  {:>4} {:<15} {}\n",
                v.number,
                if marks.is_empty() {
                    String::new()
                } else {
                    format!("[{}]", marks.join(","))
                },
                image_text(&v.image)
            ));
        }
        s.push_str("target health:\n");
        if self.targets.is_empty() {
            s.push_str("  (no targets)\n");
        }
        for t in &self.targets {
            let stale = if self.instances.iter().any(|i| i.id == t.id) {
                ""
            } else {
                "  [not in the group: a replaced instance's target can linger]"
            };
            s.push_str(&format!(
                "  {} {} {}{}{stale}\n",
                t.target_group,
                t.id,
                t.state,
                t.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
        s
    }
}
