//! Steps 2 and 3: choose the AMI and say what the roll will do.

use crate::aws::ec2::{self, ImageInfo};
use crate::aws::Aws;
use crate::build::tags;

use super::discover::Discovered;
use super::Error;

/// An image as the plan shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSummary {
    pub id: String,
    pub name: String,
    /// The jbake image version (`jbake:version`), if jbake built it.
    pub version: Option<String>,
    pub recipe: Option<String>,
    pub created: String,
}

impl ImageSummary {
    pub fn of(i: &ImageInfo) -> ImageSummary {
        ImageSummary {
            id: i.id.clone(),
            name: i.name.clone(),
            version: i.tag(tags::VERSION).map(str::to_string),
            recipe: i.tag(tags::RECIPE).map(str::to_string),
            created: i.creation_date.clone(),
        }
    }

    /// An AMI EC2 no longer describes (deregistered): only its id is known.
    pub fn unknown(id: &str) -> ImageSummary {
        ImageSummary {
            id: id.to_string(),
            name: "(not found: deregistered?)".to_string(),
            version: None,
            recipe: None,
            created: String::new(),
        }
    }

    pub fn label(&self) -> String {
        let mut s = format!("{} {}", self.id, self.name);
        if let Some(v) = &self.version {
            s.push_str(&format!(" (version {v}"));
            if !self.created.is_empty() {
                s.push_str(&format!(", created {}", self.created));
            }
            s.push(')');
        } else if !self.created.is_empty() {
            s.push_str(&format!(" (created {})", self.created));
        }
        s
    }
}

/// `YYYY.MM.DD-N` → a key that orders versions (N numerically).
fn version_key(v: Option<&str>) -> (String, u64) {
    let v = v.unwrap_or_default();
    match v.rsplit_once('-') {
        Some((date, n)) => (date.to_string(), n.parse().unwrap_or(0)),
        None => (v.to_string(), 0),
    }
}

/// Whether jbake built the image from `recipe`, completely. Err: why not.
pub fn check_controller_image(i: &ImageInfo, recipe: &str) -> Result<(), String> {
    match i.tag(tags::RECIPE) {
        None => return Err(format!(
            "{} ({}) was not built by jbake (it has no {} tag): jbake roll only rolls out images built from the {recipe} recipe",
            i.id, i.name, tags::RECIPE
        )),
        Some(r) if r != recipe => return Err(format!(
            "{} ({}) was built from the {r} recipe, not {recipe}: it is not a controller image",
            i.id, i.name
        )),
        _ => {}
    }
    if !ec2::image_available(&i.state) {
        return Err(format!(
            "{} ({}) is {}, not available",
            i.id, i.name, i.state
        ));
    }
    if i.tag(tags::COMPLETE) == Some("false") {
        return Err(format!(
            "{} ({}) is an unfinished build ({}=false)",
            i.id,
            i.name,
            tags::COMPLETE
        ));
    }
    Ok(())
}

/// The image to roll out: `--ami`, checked, or the newest complete controller image.
pub async fn choose(aws: &Aws, ami: Option<&str>, recipe: &str) -> Result<ImageInfo, Error> {
    if let Some(id) = ami {
        let image = aws.ec2.image(id).await?.ok_or_else(|| {
            Error::Input(format!(
                "AMI {id} does not exist in {} (or this account cannot see it): check --ami and --region",
                aws.region
            ))
        })?;
        check_controller_image(&image, recipe).map_err(Error::Input)?;
        return Ok(image);
    }
    let mut found: Vec<ImageInfo> = aws
        .ec2
        .own_images_tagged(tags::RECIPE, recipe)
        .await?
        .into_iter()
        .filter(|i| check_controller_image(i, recipe).is_ok())
        .collect();
    found.sort_by(|a, b| {
        (&b.creation_date, version_key(b.tag(tags::VERSION)))
            .cmp(&(&a.creation_date, version_key(a.tag(tags::VERSION))))
    });
    found.into_iter().next().ok_or_else(|| {
        Error::Input(format!(
            "no available image built by jbake from the {recipe} recipe in {}: bake one with `jbake controller`, or pass --ami",
            aws.region
        ))
    })
}

/// What a roll will do, shown before it does it (and all `--dry-run` does).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub group: String,
    pub instance_id: String,
    pub template_id: String,
    pub template_name: String,
    /// The group's launch template version as the group names it.
    pub group_version: String,
    /// The version whose data is copied (what the group's reference resolves to).
    pub from_version: i64,
    pub default_version: i64,
    /// The number the new version will get.
    pub new_version: i64,
    pub current: ImageSummary,
    pub new: ImageSummary,
    pub target_groups: Vec<String>,
    pub jenkins_url: String,
    pub steps: Vec<String>,
}

impl Plan {
    pub fn new(
        d: &Discovered,
        instance_id: &str,
        current: ImageSummary,
        new: ImageSummary,
        jenkins_url: &str,
        drain_timeout: Option<&str>,
        health_timeout: &str,
    ) -> Plan {
        let new_version = d.latest_version + 1;
        let steps = vec![
            format!(
                "create launch template {} version {new_version}: all of version {}'s data, ImageId {} → {}",
                d.template.id, d.current.number, current.id, new.id
            ),
            format!("make version {new_version} the template's default and point group {} at version {new_version}", d.group.name),
            match drain_timeout {
                Some(t) => format!("put Jenkins at {jenkins_url} in quiet-down and wait up to {t} until no build runs"),
                None => format!("no drain (--no-drain): Jenkins at {jenkins_url} is not put in quiet-down; builds still running on it are lost"),
            },
            format!("terminate {instance_id} in the group without lowering its capacity: the group launches the new controller"),
            format!("verify within {health_timeout}: the new instance runs {} (EC2), its target is healthy, Jenkins answers /login; report the downtime", new.id),
            format!("on failure: point the group back at version {}, replace again, check that {} serves, exit 1", d.current.number, current.id),
        ];
        Plan {
            group: d.group.name.clone(),
            instance_id: instance_id.to_string(),
            template_id: d.template.id.clone(),
            template_name: d.template.name.clone(),
            group_version: d.template.version.clone(),
            from_version: d.current.number,
            default_version: d.default_version,
            new_version,
            current,
            new,
            target_groups: d.target_groups.iter().map(|t| t.name.clone()).collect(),
            jenkins_url: jenkins_url.to_string(),
            steps,
        }
    }

    pub fn text(&self) -> String {
        let mut s = format!(
            "roll group {} (instance {}, launch template {} {} version {}{})\n  current: {}\n  new:     {}\n",
            self.group,
            self.instance_id,
            self.template_id,
            self.template_name,
            self.from_version,
            if self.group_version == self.from_version.to_string() {
                String::new()
            } else {
                format!(" via {}", self.group_version)
            },
            self.current.label(),
            self.new.label()
        );
        for (n, step) in self.steps.iter().enumerate() {
            s.push_str(&format!("  {}. {step}\n", n + 1));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, recipe: Option<&str>, state: &str) -> ImageInfo {
        let mut tags = vec![(tags::VERSION.to_string(), "2026.11.28-2".to_string())];
        if let Some(r) = recipe {
            tags.push((tags::RECIPE.to_string(), r.to_string()));
        }
        ImageInfo {
            id: id.into(),
            name: format!("{}-x", recipe.unwrap_or("foreign")),
            state: state.into(),
            creation_date: "2026-11-28T10:00:00.000Z".into(),
            root_device: None,
            snapshots: vec![],
            tags,
        }
    }

    #[test]
    fn refuses_agent_foreign_and_unavailable_images() {
        let r = "jenkins-controller";
        assert!(check_controller_image(&image("ami-1", Some(r), "available"), r).is_ok());
        let e = check_controller_image(&image("ami-2", Some("jenkins-agent"), "available"), r)
            .unwrap_err();
        assert!(
            e.contains("jenkins-agent recipe, not jenkins-controller"),
            "{e}"
        );
        let e = check_controller_image(&image("ami-3", None, "available"), r).unwrap_err();
        assert!(e.contains("not built by jbake"), "{e}");
        let e = check_controller_image(&image("ami-4", Some(r), "pending"), r).unwrap_err();
        assert!(e.contains("is pending, not available"), "{e}");
    }

    #[test]
    fn versions_order_numerically() {
        assert!(version_key(Some("2026.11.28-10")) > version_key(Some("2026.11.28-9")));
        assert!(version_key(Some("2026.11.29-1")) > version_key(Some("2026.11.28-9")));
    }
}
