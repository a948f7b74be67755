//! `jbake prune`: removes old images jbake made, and their snapshots, per recipe — never one that
//! is in use, never the newest N, never an image jbake did not make.
//!
//! The decision ([`decide`]) is pure: the images jbake made (complete, available, named like
//! its builds), what uses each ([`crate::aws::usage`]), and how many to keep per recipe. Its
//! reasons are printed for every image, kept or not, so `--dry-run` says why each one stays.
//!
//! Per region: the copies of an image in other regions (`--copy-to`, `jbake copy`) are images
//! of their region like any other, named and tagged like it; `jbake prune --regions` plans and
//! prunes each region on its own (the newest N of a recipe *there*, never one used *there*),
//! each image with its snapshots (those of its block device mappings: a copy's are its own).
//! An image that failed its boot test (`jbake:tested=false`) is never rolled out: it does not
//! count among the newest N, and goes unless something uses it (an instance launched from it
//! to debug it keeps it).

use std::collections::BTreeMap;

use crate::aws::ec2::{self, ImageInfo};
use crate::aws::usage::Reference;
use crate::bake::tags;

/// An image jbake made, as prune sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    pub recipe: String,
    pub version: String,
    pub created: String,
    pub snapshots: Vec<String>,
    /// It failed its boot test (`jbake:tested=false`).
    pub failed_test: bool,
}

/// Why an image stays.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Keep {
    /// One of the newest `keep` of its recipe (1 = the newest).
    Newest { rank: usize, keep: usize },
    /// Something launches from it.
    InUse { by: Vec<Reference> },
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::Newest { rank: 1, .. } => write!(f, "the newest of its recipe"),
            Keep::Newest { rank, keep } => {
                write!(f, "number {rank} of the newest {keep} of its recipe")
            }
            Keep::InUse { by } => {
                let list: Vec<String> = by.iter().map(|r| r.to_string()).collect();
                write!(f, "in use by {}", list.join(", "))
            }
        }
    }
}

/// What prune does with one image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub image: Candidate,
    /// Empty: the image is pruned.
    pub keep: Vec<Keep>,
}

impl Decision {
    pub fn prune(&self) -> bool {
        self.keep.is_empty()
    }
}

/// An image jbake skipped because it is not (or not yet) one of its finished builds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub id: String,
    pub name: String,
    pub why: String,
}

/// Sorts this account's images into jbake's finished builds (candidates) and the rest, with
/// why each of the rest is not considered. `recipe`: only that recipe's images.
pub fn candidates(images: &[ImageInfo], recipe: Option<&str>) -> (Vec<Candidate>, Vec<Skipped>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for i in images {
        let skip = |why: String| Skipped {
            id: i.id.clone(),
            name: i.name.clone(),
            why,
        };
        let (Some(r), Some(_build)) = (i.tag(tags::RECIPE), i.tag(tags::BUILD_ID)) else {
            // Not jbake's: not even listed as skipped (prune never looks at them).
            continue;
        };
        if recipe.is_some_and(|want| want != r) {
            continue;
        }
        let version = i.tag(tags::VERSION).unwrap_or_default();
        if i.tag(tags::COMPLETE) != Some("true") {
            skipped.push(skip(format!(
                "an unfinished build ({} is not true): `jbake gc` removes those once their build is over",
                tags::COMPLETE
            )));
            continue;
        }
        if !ec2::image_available(&i.state) {
            skipped.push(skip(format!("it is {}, not available", i.state)));
            continue;
        }
        // Tags can be written by anyone who may tag: the name must also be a jbake build's.
        if version.is_empty() || i.name != format!("{r}-{version}") {
            skipped.push(skip(format!(
                "its name is not {r}-<{}> as jbake names its images",
                tags::VERSION
            )));
            continue;
        }
        out.push(Candidate {
            id: i.id.clone(),
            name: i.name.clone(),
            recipe: r.to_string(),
            version: version.to_string(),
            created: i.creation_date.clone(),
            snapshots: i.snapshots.clone(),
            failed_test: i.tag(tags::TESTED) == Some("false"),
        });
    }
    (out, skipped)
}

/// `YYYY.MM.DD-N` → a key that orders versions (N numerically).
fn version_key(v: &str) -> (String, u64) {
    match v.rsplit_once('-') {
        Some((date, n)) => (date.to_string(), n.parse().unwrap_or(0)),
        None => (v.to_string(), 0),
    }
}

/// What happens to each candidate: per recipe, newest first (by creation date, then version),
/// the first `keep` that did not fail their boot test stay, and any image something uses stays.
pub fn decide(
    images: Vec<Candidate>,
    used: &BTreeMap<String, Vec<Reference>>,
    keep: usize,
) -> Vec<Decision> {
    let mut by_recipe: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    for i in images {
        by_recipe.entry(i.recipe.clone()).or_default().push(i);
    }
    let mut out = Vec::new();
    for (_, mut list) in by_recipe {
        list.sort_by(|a, b| {
            (&b.created, version_key(&b.version)).cmp(&(&a.created, version_key(&a.version)))
        });
        let mut n = 0;
        for image in list {
            let mut reasons = Vec::new();
            if !image.failed_test {
                if n < keep {
                    reasons.push(Keep::Newest { rank: n + 1, keep });
                }
                n += 1;
            }
            if let Some(by) = used.get(&image.id).filter(|b| !b.is_empty()) {
                reasons.push(Keep::InUse { by: by.clone() });
            }
            out.push(Decision {
                image,
                keep: reasons,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, recipe: &str, version: &str, created: &str) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            name: format!("{recipe}-{version}"),
            state: "available".into(),
            creation_date: created.into(),
            root_device: None,
            snapshots: vec![format!("snap-{id}")],
            tags: vec![
                (tags::RECIPE.into(), recipe.into()),
                (tags::BUILD_ID.into(), format!("b-{id}")),
                (tags::VERSION.into(), version.into()),
                (tags::COMPLETE.into(), "true".into()),
            ],
        }
    }

    #[test]
    fn only_finished_builds_named_like_jbake_s_are_candidates() {
        let mut foreign = image("ami-f", "x", "2026.11.01-1", "2026-11-01");
        foreign.tags.clear();
        let mut half = image("ami-h", "r", "2026.11.02-1", "2026-11-02");
        half.tags.retain(|(k, _)| k != tags::COMPLETE);
        half.tags.push((tags::COMPLETE.into(), "false".into()));
        let mut renamed = image("ami-n", "r", "2026.11.03-1", "2026-11-03");
        renamed.name = "production-golden".into();
        let mut pending = image("ami-p", "r", "2026.11.04-1", "2026-11-04");
        pending.state = "pending".into();
        let ok = image("ami-o", "r", "2026.11.05-1", "2026-11-05");
        let other = image("ami-a", "agent", "2026.11.05-1", "2026-11-05");
        let all = [foreign, half, renamed, pending, ok, other];
        let (c, skipped) = candidates(&all, None);
        let ids: Vec<&str> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["ami-o", "ami-a"]);
        let why: Vec<(&str, &str)> = skipped
            .iter()
            .map(|s| (s.id.as_str(), s.why.as_str()))
            .collect();
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].1.contains("unfinished"), "{why:?}");
        assert!(why[1].1.contains("name is not r-<"), "{why:?}");
        assert!(why[2].1.contains("pending"), "{why:?}");
        let (only_agent, _) = candidates(&all, Some("agent"));
        assert_eq!(only_agent.len(), 1);
    }

    #[test]
    fn keeps_the_newest_n_per_recipe_and_whatever_is_used() {
        let imgs = [
            image("ami-1", "c", "2026.11.01-1", "2026-11-01T00:00:00Z"),
            image("ami-2", "c", "2026.11.02-1", "2026-11-02T00:00:00Z"),
            image("ami-3", "c", "2026.11.02-2", "2026-11-02T00:00:00Z"),
            image("ami-4", "c", "2026.11.02-10", "2026-11-02T00:00:00Z"),
            image("ami-9", "a", "2026.11.01-1", "2026-11-01T00:00:00Z"),
        ];
        let (c, _) = candidates(&imgs, None);
        let mut used = BTreeMap::new();
        used.insert(
            "ami-1".to_string(),
            vec![Reference::Instance {
                id: "i-1".into(),
                state: "stopped".into(),
            }],
        );
        let d = decide(c, &used, 2);
        let verdict: Vec<(&str, bool)> =
            d.iter().map(|d| (d.image.id.as_str(), d.prune())).collect();
        // Recipe a: one image, the newest. Recipe c: -10 and -2 are the newest two (N is
        // compared as a number), -1 of the 2nd goes, ami-1 is used by a stopped instance.
        assert_eq!(
            verdict,
            [
                ("ami-9", false),
                ("ami-4", false),
                ("ami-3", false),
                ("ami-2", true),
                ("ami-1", false)
            ]
        );
        assert_eq!(d[4].keep[0].to_string(), "in use by instance i-1 (stopped)");
        assert_eq!(d[1].keep[0].to_string(), "the newest of its recipe");
        // keep 0: only use protects.
        let (c, _) = candidates(&imgs, None);
        assert_eq!(decide(c, &used, 0).iter().filter(|d| !d.prune()).count(), 1);
    }

    #[test]
    fn an_image_that_failed_its_boot_test_is_not_among_the_newest_and_goes() {
        let mut failed = image("ami-3", "c", "2026.11.03-1", "2026-11-03T00:00:00Z");
        failed.tags.push((tags::TESTED.into(), "false".into()));
        let mut debugged = image("ami-4", "c", "2026.11.04-1", "2026-11-04T00:00:00Z");
        debugged.tags.push((tags::TESTED.into(), "false".into()));
        let imgs = [
            image("ami-1", "c", "2026.11.01-1", "2026-11-01T00:00:00Z"),
            image("ami-2", "c", "2026.11.02-1", "2026-11-02T00:00:00Z"),
            failed,
            debugged,
        ];
        let (c, _) = candidates(&imgs, None);
        assert!(c[2].failed_test && c[3].failed_test && !c[0].failed_test);
        let mut used = BTreeMap::new();
        used.insert(
            "ami-4".to_string(),
            vec![Reference::Instance {
                id: "i-debug".into(),
                state: "running".into(),
            }],
        );
        let d = decide(c, &used, 2);
        let verdict: Vec<(&str, bool)> =
            d.iter().map(|d| (d.image.id.as_str(), d.prune())).collect();
        // The two newest that passed stay; the failed one goes; the failed one in use stays,
        // only because it is used.
        assert_eq!(
            verdict,
            [
                ("ami-4", false),
                ("ami-3", true),
                ("ami-2", false),
                ("ami-1", false)
            ]
        );
        assert_eq!(d[0].keep.len(), 1);
        assert_eq!(d[2].keep[0].to_string(), "the newest of its recipe");
    }
}

/// Why prune could not look or could not remove.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Aws(#[from] crate::aws::Error),
    #[error("{failed} of {total} image(s) could not be pruned completely: {}", .details.join("; "))]
    Incomplete {
        failed: usize,
        total: usize,
        details: Vec<String>,
    },
}

/// What prune found and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub region: String,
    pub dry_run: bool,
    pub keep: usize,
    pub decisions: Vec<Decision>,
    pub skipped: Vec<Skipped>,
    /// References that could not be resolved (said, not fatal).
    pub warnings: Vec<String>,
    /// Images deregistered, and snapshots deleted.
    pub pruned: Vec<String>,
    pub snapshots_deleted: Vec<String>,
}

/// Looks at the region and decides; nothing is changed.
pub async fn plan(
    aws: &crate::aws::Aws,
    recipe: Option<&str>,
    keep: usize,
    dry_run: bool,
) -> Result<Report, Error> {
    let images = aws.ec2.own_images_with_tag_key(tags::RECIPE).await?;
    let (found, skipped) = candidates(&images, recipe);
    let usage = aws.usage.scan().await?;
    Ok(Report {
        region: aws.region.clone(),
        dry_run,
        keep,
        decisions: decide(found, &usage.by_image, keep),
        skipped,
        warnings: usage.warnings,
        pruned: Vec::new(),
        snapshots_deleted: Vec::new(),
    })
}

/// Prunes what `report` decided. Usage is read once more first: an image something started
/// to use since the plan (a rollback to an old image) stays. `on_step` is told each action.
pub async fn execute(
    aws: &crate::aws::Aws,
    report: &mut Report,
    mut on_step: impl FnMut(&str),
) -> Result<(), Error> {
    let again = aws.usage.scan().await?;
    for d in report.decisions.iter_mut().filter(|d| d.prune()) {
        if let Some(by) = again.by_image.get(&d.image.id).filter(|b| !b.is_empty()) {
            d.keep.push(Keep::InUse { by: by.clone() });
        }
    }
    let mut details = Vec::new();
    let total = report.decisions.iter().filter(|d| d.prune()).count();
    for d in report.decisions.iter().filter(|d| d.prune()) {
        let i = &d.image;
        on_step(&format!("deregistering {} ({})", i.id, i.name));
        if let Err(e) = aws.ec2.deregister_image(&i.id).await {
            details.push(format!("{} ({}): {e}", i.id, i.name));
            continue;
        }
        report.pruned.push(i.id.clone());
        let mut failed = Vec::new();
        for s in &i.snapshots {
            on_step(&format!("deleting snapshot {s} of {}", i.id));
            match aws.ec2.delete_snapshot(s).await {
                Ok(()) => report.snapshots_deleted.push(s.clone()),
                Err(e) if e.is_code("InvalidSnapshot.NotFound") => {}
                Err(e) => failed.push(format!("{s}: {e}")),
            }
        }
        if !failed.is_empty() {
            details.push(format!(
                "{} ({}) was deregistered, but not all of its snapshots were deleted: {}",
                i.id,
                i.name,
                failed.join(", ")
            ));
        }
    }
    if details.is_empty() {
        Ok(())
    } else {
        Err(Error::Incomplete {
            failed: details.len(),
            total,
            details,
        })
    }
}
