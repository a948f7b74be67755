//! Steps 2 and 3: choose the AMI and say what the roll will do.

use crate::aws::ec2::{self, ImageInfo};
use crate::aws::Aws;
use crate::bake::tags;

use crate::aws::asg::Sizes;
use crate::aws::elb::TargetGroupInfo;

use super::checks::{self, TestState};
use super::discover::Discovered;
use super::error::{Error, ImageProblem, Refusal};
use super::Strategy;

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
pub fn check_controller_image(i: &ImageInfo, recipe: &str) -> Result<(), ImageProblem> {
    match i.tag(tags::RECIPE) {
        None => {
            return Err(ImageProblem::NotJbake {
                id: i.id.clone(),
                name: i.name.clone(),
                tag: tags::RECIPE,
                recipe: recipe.to_string(),
            })
        }
        Some(r) if r != recipe => {
            return Err(ImageProblem::OtherRecipe {
                id: i.id.clone(),
                name: i.name.clone(),
                found: r.to_string(),
                recipe: recipe.to_string(),
            })
        }
        _ => {}
    }
    if !ec2::image_available(&i.state) {
        return Err(ImageProblem::NotAvailable {
            id: i.id.clone(),
            name: i.name.clone(),
            state: i.state.clone(),
        });
    }
    if i.tag(tags::COMPLETE) == Some("false") {
        return Err(ImageProblem::Unfinished {
            id: i.id.clone(),
            name: i.name.clone(),
            tag: tags::COMPLETE,
        });
    }
    Ok(())
}

/// The image to roll out: `--ami`, checked, or the newest complete controller image that passed
/// its boot test (with `allow_untested`, the newest not known to have failed it). The boot test's
/// refusal for `--ami` is [`checks::tested`](super::checks::tested)'s.
pub async fn choose(
    aws: &Aws,
    ami: Option<&str>,
    recipe: &str,
    allow_untested: bool,
) -> Result<ImageInfo, Error> {
    if let Some(id) = ami {
        let image = aws.ec2.image(id).await?.ok_or_else(|| Refusal::NoSuchAmi {
            id: id.to_string(),
            region: aws.region.clone(),
        })?;
        check_controller_image(&image, recipe).map_err(Refusal::from)?;
        return Ok(image);
    }
    let mut found: Vec<ImageInfo> = aws
        .ec2
        .own_images_tagged(tags::RECIPE, recipe)
        .await?
        .into_iter()
        .filter(|i| check_controller_image(i, recipe).is_ok())
        .collect();
    let any_image = !found.is_empty();
    found.sort_by(|a, b| {
        (&b.creation_date, version_key(b.tag(tags::VERSION)))
            .cmp(&(&a.creation_date, version_key(a.tag(tags::VERSION))))
    });
    newest_rollable(found, allow_untested).map_err(|untested| {
        if untested.is_none() && !any_image {
            Refusal::NoImage {
                recipe: recipe.to_string(),
                region: aws.region.clone(),
            }
        } else {
            Refusal::NoTestedImage {
                recipe: recipe.to_string(),
                region: aws.region.clone(),
                untested,
            }
        }
        .into()
    })
}

/// The first of `newest_first` that passed its boot test (or, with `allow_untested`, was never
/// tested). Err: the newest untested one (`id (name)`), if any. Pure.
pub fn newest_rollable(
    newest_first: Vec<ImageInfo>,
    allow_untested: bool,
) -> Result<ImageInfo, Option<String>> {
    let mut untested = None;
    for i in newest_first {
        match checks::test_state(&i) {
            TestState::Passed => return Ok(i),
            TestState::Untested if allow_untested => return Ok(i),
            TestState::Untested if untested.is_none() => {
                untested = Some(format!("{} ({})", i.id, i.name))
            }
            _ => {}
        }
    }
    Err(untested)
}

/// What a roll will do, shown before it does it (and all `--dry-run` does).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub group: String,
    pub strategy: Strategy,
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
    /// The group's sizes now.
    pub sizes: Sizes,
    /// The processes the roll suspends (those not suspended already), resumed at the end.
    pub suspend: Vec<String>,
    /// What the target groups' health checks add to the switch-over, in words.
    pub load_balancer_delay: Option<String>,
    pub steps: Vec<String>,
}

/// What [`Plan::new`] needs besides the discovery.
pub struct PlanInput<'a> {
    pub strategy: Strategy,
    pub instance_id: &'a str,
    pub current: ImageSummary,
    pub new: ImageSummary,
    pub jenkins_url: &'a str,
    /// None: `--no-drain`.
    pub drain_timeout: Option<&'a str>,
    pub health_timeout: &'a str,
    pub jenkins_version: Option<&'a str>,
}

/// What the health checks of `tgs` add to a switch-over (the slowest target group).
pub fn load_balancer_delay(tgs: &[TargetGroupInfo]) -> Option<String> {
    let slowest = tgs
        .iter()
        .filter_map(|t| t.health_check.delays().map(|d| (t, d)))
        .max_by_key(|(_, (up, down))| (*up).max(*down))?;
    let (t, (up, down)) = slowest;
    let hc = &t.health_check;
    Some(format!(
        "target group {}: a target is healthy after {} good checks every {}s (up to {up}s after Jenkins answers) and unhealthy after {} failed ones ({down}s)",
        t.name,
        hc.healthy_threshold.unwrap_or_default(),
        hc.interval_secs.unwrap_or_default(),
        hc.unhealthy_threshold.unwrap_or_default(),
    ))
}

impl Plan {
    pub fn new(d: &Discovered, i: PlanInput<'_>) -> Plan {
        let new_version = d.latest_version + 1;
        let group = &d.group.name;
        let old = i.instance_id;
        let sizes = d.group.sizes();
        let suspend: Vec<String> = super::SUSPENDED
            .iter()
            .filter(|p| !d.group.suspended.iter().any(|s| s == *p))
            .map(|p| p.to_string())
            .collect();
        let version = i
            .jenkins_version
            .map(|v| format!(" and version {v}"))
            .unwrap_or_default();
        let mut steps = vec![
            format!(
                "create launch template {} version {new_version} from version {} (EC2 copies it: SourceVersion) with ImageId {} → {}; read it back: only the ImageId may differ",
                d.template.id, d.source.number, i.current.id, i.new.id
            ),
            format!("make version {new_version} the template's default and point group {group} at version {new_version}"),
        ];
        let drain = match i.drain_timeout {
            Some(t) => format!("put Jenkins at {} in quiet-down and wait up to {t} until no build runs", i.jenkins_url),
            None => format!("no drain (--no-drain): Jenkins at {} is not put in quiet-down; builds still running on it are lost", i.jenkins_url),
        };
        let suspend_text = if suspend.is_empty() {
            "suspend nothing (the group's processes that could interfere are suspended already)"
                .to_string()
        } else {
            format!("suspend the group's {} processes", suspend.join(", "))
        };
        match i.strategy {
            Strategy::Handover => {
                let max = sizes.max.max(2);
                steps.push(format!("{suspend_text}; protect {old} from scale-in"));
                steps.push(format!(
                    "raise group {group} to max {max} desired 2: it launches the new controller, whose Jenkins waits for the JENKINS_HOME lease (target unhealthy: {}) while {old} serves; wait up to {}",
                    super::verify::WAITING_REASON, i.health_timeout
                ));
                steps.push(drain);
                steps.push("stop the old Jenkins (POST /safeExit): it releases the lease, the new controller takes it and starts Jenkins".to_string());
                steps.push(format!(
                    "verify within {}: the new instance runs {} (EC2), its target is healthy and {old}'s is not, /login through the load balancer answers with the same X-Instance-Identity (the same JENKINS_HOME){version}; report the downtime",
                    i.health_timeout, i.new.id
                ));
                steps.push(format!(
                    "terminate {old} lowering the desired capacity (back to {}), max back to {}, resume the processes",
                    sizes.desired, sizes.max
                ));
                steps.push("on failure before the stop: remove the new instance and put everything back; after it: stop the new Jenkins, the old one takes the lease back, remove the new instance, put everything back (exit 1)".to_string());
            }
            Strategy::Replace => {
                steps.push(suspend_text);
                steps.push(drain);
                steps.push("stop the old Jenkins (POST /safeExit) and wait until it no longer serves (the JENKINS_HOME lease is free)".to_string());
                steps.push(format!(
                    "terminate {old} in the group without lowering its capacity: the group launches the new controller"
                ));
                steps.push(format!(
                    "verify within {}: the new instance runs {} (EC2), its target is healthy, /login through the load balancer answers with the same X-Instance-Identity{version}; resume the processes; report the downtime",
                    i.health_timeout, i.new.id
                ));
                steps.push(format!(
                    "on failure: point the group back at version {}, replace again, check that {} serves, exit 1",
                    d.current.number, i.current.id
                ));
            }
        }
        Plan {
            group: group.clone(),
            strategy: i.strategy,
            instance_id: old.to_string(),
            template_id: d.template.id.clone(),
            template_name: d.template.name.clone(),
            group_version: d.template.version.clone(),
            from_version: d.current.number,
            default_version: d.default_version,
            new_version,
            current: i.current,
            new: i.new,
            target_groups: d.target_groups.iter().map(|t| t.name.clone()).collect(),
            jenkins_url: i.jenkins_url.to_string(),
            sizes,
            suspend,
            load_balancer_delay: load_balancer_delay(&d.target_groups),
            steps,
        }
    }

    pub fn text(&self) -> String {
        let mut s = format!(
            "roll group {} ({}, instance {}, launch template {} {} version {}{})\n  current: {}\n  new:     {}\n",
            self.group,
            self.strategy,
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
        if let Some(d) = &self.load_balancer_delay {
            s.push_str(&format!("  load balancer: {d}\n"));
        }
        s
    }
}

/// The template has a version newer than the group's: made outside the roll (Terraform writes
/// one when its launch template changes, and leaves the group's version alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub group_version: i64,
    pub newer_version: i64,
    /// The fields (API names) in which the newer version differs, ImageId aside.
    pub fields: Vec<String>,
}

impl Drift {
    /// The template's newer version than the group's, if any, and how it differs.
    pub fn of(d: &super::discover::Discovered) -> Option<Drift> {
        d.newer.as_ref().map(|n| Drift {
            group_version: d.current.number,
            newer_version: n.number,
            fields: crate::aws::launch_template::differences(&d.current.data, &n.data),
        })
    }
}

/// What to tell the operator about a newer version: nothing when it only differs in its image
/// (an earlier roll that was rolled back); otherwise which version the roll copies and how to
/// take the other.
pub fn drift_note(d: &Drift, from_latest: bool) -> Option<String> {
    if d.fields.is_empty() {
        return None;
    }
    let fields = d.fields.join(", ");
    Some(if from_latest {
        format!(
            "launch template version {} differs from the group's version {} in {fields}: --from-latest makes the new version from version {} (its {fields} go live with this roll)",
            d.newer_version, d.group_version, d.newer_version
        )
    } else {
        format!(
            "launch template version {} is newer than the group's version {} and differs from it in {fields} (a change made outside jbake roll, e.g. by Terraform): this roll copies version {}, so that change does not go live; pass --from-latest to make the new version from version {}",
            d.newer_version, d.group_version, d.group_version, d.newer_version
        )
    })
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
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("jenkins-agent recipe, not jenkins-controller"),
            "{e}"
        );
        let e = check_controller_image(&image("ami-3", None, "available"), r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not built by jbake"), "{e}");
        let e = check_controller_image(&image("ami-4", Some(r), "pending"), r)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is pending, not available"), "{e}");
    }

    #[test]
    fn the_newest_tested_image_rolls_by_default() {
        let img = |id: &str, tested: Option<&str>| {
            let mut i = ImageInfo {
                id: id.into(),
                name: format!("jenkins-controller-{id}"),
                state: "available".into(),
                creation_date: String::new(),
                root_device: None,
                snapshots: vec![],
                tags: vec![],
            };
            if let Some(t) = tested {
                i.tags.push((tags::TESTED.into(), t.into()));
            }
            i
        };
        let newest_first = || {
            vec![
                img("ami-failed", Some("false")),
                img("ami-untested", None),
                img("ami-passed", Some("true")),
                img("ami-older", Some("true")),
            ]
        };
        assert_eq!(
            newest_rollable(newest_first(), false).map(|i| i.id),
            Ok("ami-passed".to_string())
        );
        assert_eq!(
            newest_rollable(newest_first(), true).map(|i| i.id),
            Ok("ami-untested".to_string())
        );
        assert_eq!(
            newest_rollable(
                vec![img("ami-failed", Some("false")), img("ami-u", None)],
                false
            )
            .map(|i| i.id),
            Err(Some("ami-u (jenkins-controller-ami-u)".to_string()))
        );
        assert_eq!(
            newest_rollable(vec![img("ami-failed", Some("false"))], true).map(|i| i.id),
            Err(None)
        );
    }

    #[test]
    fn versions_order_numerically() {
        assert!(version_key(Some("2026.11.28-10")) > version_key(Some("2026.11.28-9")));
        assert!(version_key(Some("2026.11.29-1")) > version_key(Some("2026.11.28-9")));
    }

    #[test]
    fn a_newer_template_version_is_said_only_when_it_differs_in_more_than_its_image() {
        let d = Drift {
            group_version: 4,
            newer_version: 6,
            fields: vec!["InstanceType".into(), "UserData".into()],
        };
        let note = drift_note(&d, false).unwrap();
        assert!(
            note.contains("version 6 is newer than the group's version 4"),
            "{note}"
        );
        assert!(note.contains("in InstanceType, UserData"), "{note}");
        assert!(note.contains("this roll copies version 4"), "{note}");
        assert!(note.contains("--from-latest"), "{note}");
        let taken = drift_note(&d, true).unwrap();
        assert!(
            taken.contains("makes the new version from version 6"),
            "{taken}"
        );
        let image_only = Drift {
            fields: Vec::new(),
            ..d
        };
        assert_eq!(drift_note(&image_only, false), None);
        assert_eq!(drift_note(&image_only, true), None);
    }
}
