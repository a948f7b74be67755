//! `jbake gc`: removes what builds left behind — a SIGKILLed jbake, `--on-error abort`, a
//! cleanup that failed. It finds resources by their `jbake:build-id` tag and removes those whose
//! build is over: expired (`jbake:expires-at` in the past), older than `--older-than`, or of the
//! named `--build-id`. Finished images (`jbake:complete=true`) are never touched.

use std::time::{Duration, SystemTime};

use crate::aws::{self, Aws};
use crate::build::tags;
use crate::build::undo::{undo_one, Resource};
use crate::progress::Progress;

/// Which builds are over.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Also builds started longer ago than this.
    pub older_than: Option<Duration>,
    /// Only (and always) this build.
    pub build_id: Option<String>,
}

impl Selector {
    /// Whether a resource with these tags belongs to a build that is over.
    pub fn is_due(&self, tags: &[(String, String)], now: SystemTime) -> bool {
        let get = |k: &str| {
            tags.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let Some(id) = get(tags::BUILD_ID) else {
            return false;
        };
        if let Some(want) = &self.build_id {
            return want == id;
        }
        let time = |k: &str| get(k).and_then(|v| humantime::parse_rfc3339_weak(v).ok());
        if time(tags::EXPIRES_AT).is_some_and(|t| t <= now) {
            return true;
        }
        match (self.older_than, time(tags::CREATED_AT)) {
            (Some(age), Some(created)) => created + age <= now,
            _ => false,
        }
    }
}

/// Everything of finished builds that is still there, in the order it must be removed.
pub async fn find(aws: &Aws, sel: &Selector) -> Result<Vec<Resource>, aws::Error> {
    let now = SystemTime::now();
    let mut found = Vec::new();
    for i in aws.ec2.instances_tagged(tags::BUILD_ID, None).await? {
        if sel.is_due(&i.tags, now) {
            found.push(Resource::Instance { id: i.id });
        }
    }
    for (id, t) in aws.ec2.security_groups_tagged(tags::BUILD_ID).await? {
        if sel.is_due(&t, now) {
            found.push(Resource::SecurityGroup { id });
        }
    }
    for (name, t) in aws.ec2.key_pairs_tagged(tags::BUILD_ID).await? {
        if sel.is_due(&t, now) {
            found.push(Resource::KeyPair { name });
        }
    }
    for img in aws.ec2.own_images_with_tag_key(tags::BUILD_ID).await? {
        // Only a half-made image (the build stopped between CreateImage and its end); a
        // finished image is the build's result and never garbage.
        if img.tag(tags::COMPLETE) == Some("false") && sel.is_due(&img.tags, now) {
            found.push(Resource::Image {
                id: img.id,
                snapshots: img.snapshots,
            });
        }
    }
    Ok(found)
}

/// Removes `found` (instances first). Returns what could not be removed.
pub async fn remove(
    aws: &Aws,
    found: &[Resource],
    progress: &Progress,
) -> Vec<(Resource, aws::Error)> {
    let mut failed = Vec::new();
    for r in found {
        progress.info("gc", &format!("removing {r}"));
        if let Err(e) = undo_one(aws, r, progress).await {
            progress.warn(&format!("could not remove {r}: {e}"));
            failed.push((r.clone(), e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn due_rules() {
        let now =
            humantime::parse_rfc3339("2026-11-28T12:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH);
        let running = t(&[
            (tags::BUILD_ID, "b1"),
            (tags::CREATED_AT, "2026-11-28T11:30:00Z"),
            (tags::EXPIRES_AT, "2026-11-28T13:30:00Z"),
        ]);
        let expired = t(&[
            (tags::BUILD_ID, "b2"),
            (tags::EXPIRES_AT, "2026-11-28T11:59:00Z"),
        ]);
        let untagged = t(&[("Name", "x")]);
        let all = Selector::default();
        assert!(
            !all.is_due(&running, now),
            "a build in progress is left alone"
        );
        assert!(all.is_due(&expired, now));
        assert!(
            !all.is_due(&untagged, now),
            "never anything jbake did not make"
        );
        let older = Selector {
            older_than: Some(Duration::from_secs(600)),
            build_id: None,
        };
        assert!(older.is_due(&running, now));
        let one = Selector {
            older_than: None,
            build_id: Some("b1".into()),
        };
        assert!(one.is_due(&running, now));
        assert!(!one.is_due(&expired, now));
    }
}
