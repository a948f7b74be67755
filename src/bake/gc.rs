//! `jbake gc`: removes what builds left behind — a SIGKILLed jbake, `--on-error abort`, a
//! cleanup that failed — and the sweep that ends every build.
//!
//! It lists what carries a `jbake:build-id` tag (instances, security groups, key pairs, images,
//! snapshots), groups it by build, and removes the parts of builds that are over: expired (the
//! latest `jbake:expires-at` of the build is past), started longer ago than `--older-than`, or
//! the one `--build-id`. A tag is not proof: a part is removed only if it also looks like what
//! jbake makes — the key pair and security group are named `jbake-<build id>`, the instance uses
//! that key pair and is named `jbake build <recipe> <build id>` (the boot test's: key pair and
//! group `jbake-<build id>-test`, instance `jbake test <recipe> <build id>`), a half-made image is
//! named `<recipe>-<version>` after its own tags, a snapshot was made by CreateImage for an image
//! that is gone or is removed with it. What fails a check is left and reported, with why.
//!
//! Never removed: finished images (`jbake:complete` not `false`) and their snapshots; one that
//! failed its boot test is finished too (`jbake:tested=false`: `jbake prune` removes it). Left alone
//! (and reported) by `jbake gc`: a build still making its image — an instance `pending` or
//! `stopping`, or an image `pending` — even when it looks expired: jbake moves `expires-at` on
//! while it waits for an image, but a build killed in that wait leaves an image EC2 is still
//! making; it is removed once it is available.
//!
//! Copies (`--copy-to`, `jbake copy`) are found in their own region like images: a copy carries
//! the `jbake:build-id` of the run that made it, its own `jbake:expires-at`, `jbake:complete`,
//! and its snapshots are described by EC2 as copied for it. A build's image names the regions
//! of its copies in `jbake:copy-regions` ([`copy_regions`]): `jbake gc --region R` also looks
//! there; `--regions` adds others (a `jbake copy` run's).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use regex::Regex;

use crate::aws::ec2::{self, ImageInfo, InstanceInfo, Tagged, Tags};
use crate::aws::{self, Aws};
use crate::progress::Progress;

use super::ledger::{Resource, Undo};
use super::tags;

static BUILD_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{8}-\d{6}-[0-9a-f]{6}$").expect("static regex"));
static VERSION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\d{4}\.\d{2}\.\d{2}-\d+$").expect("static regex"));
static CREATED_BY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Created by CreateImage\((i-[0-9a-f]+)\) for (ami-[0-9a-f]+)")
        .expect("static regex")
});

/// How EC2 describes the snapshot of a copied image: `Copied for DestinationAmi ami-… from
/// SourceAmi ami-… for SourceSnapshot snap-…. Task created on …`.
static COPIED_FOR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^Copied for DestinationAmi (ami-[0-9a-f]+) from SourceAmi ami-[0-9a-f]+")
        .expect("static regex")
});
static REGION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$").expect("static regex"));

/// The image a snapshot of an image was made for: by CreateImage, or copied for a copy.
fn snapshot_of(description: &str) -> Option<&str> {
    if let Some(c) = CREATED_BY.captures(description) {
        return c.get(2).map(|m| m.as_str());
    }
    COPIED_FOR
        .captures(description)
        .and_then(|c| c.get(1))
        .map(|m| m.as_str())
}

/// The regions this region's jbake images were copied to (their `jbake:copy-regions` tags).
pub async fn copy_regions(aws: &Aws) -> Result<Vec<String>, aws::Error> {
    let mut out: Vec<String> = Vec::new();
    for i in aws.ec2.own_images_with_tag_key(tags::COPY_REGIONS).await? {
        if i.tag(tags::BUILD_ID).is_none() {
            continue;
        }
        for r in i.tag(tags::COPY_REGIONS).unwrap_or_default().split(',') {
            let r = r.trim();
            if REGION.is_match(r) && !out.iter().any(|o| o == r) {
                out.push(r.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `id` has the form of a jbake build id (`YYYYMMDD-HHMMSS-xxxxxx`).
pub fn is_build_id(id: &str) -> bool {
    BUILD_ID.is_match(id)
}

/// Which builds are over.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Also builds started longer ago than this.
    pub older_than: Option<Duration>,
    /// Only (and always) this build.
    pub build_id: Option<String>,
}

/// What to do with a build still making its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `jbake gc`: leave it (and say so).
    Spare,
    /// A build's own sweep: it is over, whatever EC2 still does.
    Remove,
}

/// Something gc left, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

/// What gc will remove (in this order), and what it leaves.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// `(resource, its build id)`.
    pub remove: Vec<(Resource, String)>,
    pub skipped: Vec<Skipped>,
}

impl Found {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.skipped.is_empty()
    }
}

/// Everything tagged `jbake:build-id` (with the selected build's id, when one is selected).
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub instances: Vec<InstanceInfo>,
    pub groups: Vec<Tagged>,
    pub key_pairs: Vec<Tagged>,
    pub images: Vec<ImageInfo>,
    pub snapshots: Vec<Tagged>,
}

impl Listing {
    pub async fn read(aws: &Aws, build_id: Option<&str>) -> Result<Listing, aws::Error> {
        let mine = |t: &Tags| match build_id {
            Some(b) => t.iter().any(|(k, v)| k == tags::BUILD_ID && v == b),
            None => true,
        };
        let mut l = Listing {
            instances: aws.ec2.instances_tagged(tags::BUILD_ID, build_id).await?,
            groups: aws.ec2.security_groups_tagged(tags::BUILD_ID).await?,
            key_pairs: aws.ec2.key_pairs_tagged(tags::BUILD_ID, build_id).await?,
            images: aws.ec2.own_images_with_tag_key(tags::BUILD_ID).await?,
            snapshots: aws.ec2.snapshots_tagged(tags::BUILD_ID, build_id).await?,
        };
        l.groups.retain(|g| mine(&g.tags));
        l.images.retain(|i| mine(&i.tags));
        Ok(l)
    }
}

/// Lists and decides (see the module's documentation).
pub async fn find(aws: &Aws, sel: &Selector, busy: Busy) -> Result<Found, aws::Error> {
    let listing = Listing::read(aws, sel.build_id.as_deref()).await?;
    Ok(decide(&listing, sel, busy, SystemTime::now()))
}

fn tag<'a>(t: &'a Tags, key: &str) -> Option<&'a str> {
    t.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// One build's parts.
#[derive(Default)]
struct Build<'a> {
    instances: Vec<&'a InstanceInfo>,
    groups: Vec<&'a Tagged>,
    key_pairs: Vec<&'a Tagged>,
    images: Vec<&'a ImageInfo>,
    snapshots: Vec<&'a Tagged>,
}

impl Build<'_> {
    fn all_tags(&self) -> Vec<&Tags> {
        let mut all: Vec<&Tags> = Vec::new();
        all.extend(self.instances.iter().map(|i| &i.tags));
        all.extend(self.groups.iter().map(|g| &g.tags));
        all.extend(self.key_pairs.iter().map(|k| &k.tags));
        all.extend(self.images.iter().map(|i| &i.tags));
        all.extend(self.snapshots.iter().map(|s| &s.tags));
        all
    }

    /// Whether the build is over for `sel`.
    fn is_due(&self, id: &str, sel: &Selector, now: SystemTime) -> bool {
        if let Some(want) = &sel.build_id {
            return want == id;
        }
        let time =
            |t: &Tags, k: &str| tag(t, k).and_then(|v| humantime::parse_rfc3339_weak(v).ok());
        let all = self.all_tags();
        let expires = all.iter().filter_map(|t| time(t, tags::EXPIRES_AT)).max();
        if expires.is_some_and(|t| t <= now) {
            return true;
        }
        let created = all.iter().filter_map(|t| time(t, tags::CREATED_AT)).min();
        match (sel.older_than, created) {
            (Some(age), Some(created)) => created.checked_add(age).is_some_and(|t| t <= now),
            _ => false,
        }
    }

    /// Why the build is still busy making its image, if it is.
    fn busy(&self) -> Option<String> {
        if let Some(i) = self
            .instances
            .iter()
            .find(|i| i.state == "pending" || i.state == "stopping")
        {
            return Some(format!("its instance {} is {}", i.id, i.state));
        }
        self.images
            .iter()
            .find(|i| i.state == "pending")
            .map(|i| format!("its image {} is still pending", i.id))
    }
}

/// Decides what of `listing` to remove (pure: unit-tested).
pub fn decide(listing: &Listing, sel: &Selector, busy: Busy, now: SystemTime) -> Found {
    let mut builds: BTreeMap<&str, Build> = BTreeMap::new();
    for i in &listing.instances {
        if let Some(b) = tag(&i.tags, tags::BUILD_ID) {
            builds.entry(b).or_default().instances.push(i);
        }
    }
    for g in &listing.groups {
        if let Some(b) = tag(&g.tags, tags::BUILD_ID) {
            builds.entry(b).or_default().groups.push(g);
        }
    }
    for k in &listing.key_pairs {
        if let Some(b) = tag(&k.tags, tags::BUILD_ID) {
            builds.entry(b).or_default().key_pairs.push(k);
        }
    }
    for i in &listing.images {
        if let Some(b) = tag(&i.tags, tags::BUILD_ID) {
            builds.entry(b).or_default().images.push(i);
        }
    }
    for s in &listing.snapshots {
        if let Some(b) = tag(&s.tags, tags::BUILD_ID) {
            builds.entry(b).or_default().snapshots.push(s);
        }
    }
    // Snapshots any registered image uses are never removed; images by id, for snapshots.
    let used: Vec<&str> = listing
        .images
        .iter()
        .filter(|i| !ec2::image_failed(&i.state))
        .flat_map(|i| i.snapshots.iter().map(String::as_str))
        .collect();
    let images: BTreeMap<&str, &ImageInfo> =
        listing.images.iter().map(|i| (i.id.as_str(), i)).collect();

    let mut found = Found::default();
    let mut order: [Vec<(Resource, String)>; 5] = Default::default();
    for (id, b) in &builds {
        if !b.is_due(id, sel, now) {
            continue;
        }
        let skip = |found: &mut Found, what: String, why: String| {
            found.skipped.push(Skipped { what, why })
        };
        if !is_build_id(id) {
            skip(
                &mut found,
                format!("everything tagged jbake:build-id={id}"),
                "that is not a jbake build id (YYYYMMDD-HHMMSS-xxxxxx): not made by jbake".into(),
            );
            continue;
        }
        if busy == Busy::Spare {
            if let Some(why) = b.busy() {
                skip(
                    &mut found,
                    format!("build {id}"),
                    format!(
                        "{why}: the build is still making its image; run gc again once it is done"
                    ),
                );
                continue;
            }
        }
        let key_name = format!("jbake-{id}");
        let test_name = format!("jbake-{id}-test");
        let ours = |name: &str| name == key_name || name == test_name;
        for i in &b.instances {
            if i.state == "terminated" {
                continue;
            }
            let name = i.tag("Name").unwrap_or_default();
            let named =
                |prefix: &str| name.starts_with(prefix) && name.ends_with(&format!(" {id}"));
            let key = i.key_name.as_deref();
            let looks = (key == Some(key_name.as_str()) && named("jbake build "))
                || (key == Some(test_name.as_str()) && named("jbake test "));
            if !looks {
                skip(
                    &mut found,
                    format!("instance {} (tagged jbake:build-id={id})", i.id),
                    format!(
                        "jbake's build instances use key pair {key_name} and are named 'jbake build <recipe> {id}' (its test instances {test_name} and 'jbake test <recipe> {id}'); this one uses {} and is named '{name}'",
                        key.unwrap_or("no key pair")
                    ),
                );
                continue;
            }
            order[0].push((
                Resource::Instance {
                    id: Some(i.id.clone()),
                },
                id.to_string(),
            ));
        }
        let mut removed_images: Vec<&str> = Vec::new();
        for i in &b.images {
            if i.tag(tags::COMPLETE) != Some("false") {
                continue; // a finished image: the build's result
            }
            let recipe = i.tag(tags::RECIPE).unwrap_or_default();
            let version = i.tag(tags::VERSION).unwrap_or_default();
            if !VERSION.is_match(version) || i.name != format!("{recipe}-{version}") {
                skip(
                    &mut found,
                    format!("image {} ({}, tagged jbake:build-id={id})", i.id, i.name),
                    format!(
                        "jbake names a build's image <recipe>-<version> after its tags ({recipe}-{version})"
                    ),
                );
                continue;
            }
            removed_images.push(&i.id);
            order[1].push((
                Resource::Image {
                    name: i.name.clone(),
                    id: Some(i.id.clone()),
                },
                id.to_string(),
            ));
        }
        for s in &b.snapshots {
            if used.contains(&s.id.as_str()) {
                continue; // an image uses it
            }
            let Some(ami) = snapshot_of(&s.name) else {
                skip(
                    &mut found,
                    format!("snapshot {} (tagged jbake:build-id={id})", s.id),
                    format!(
                        "jbake's snapshots are made by CreateImage or CopyImage; its description is '{}'",
                        s.name
                    ),
                );
                continue;
            };
            match images.get(ami) {
                Some(_) if removed_images.contains(&ami) => {} // removed with its image
                Some(image) if image.tag(tags::BUILD_ID) != Some(id) => skip(
                    &mut found,
                    format!("snapshot {} (tagged jbake:build-id={id})", s.id),
                    format!("it was made for image {ami}, which is not of this build"),
                ),
                Some(_) => {} // its image stays (finished, or left for a reason given above)
                None => order[2].push((Resource::Snapshot { id: s.id.clone() }, id.to_string())),
            }
        }
        for g in &b.groups {
            if !ours(&g.name) {
                skip(
                    &mut found,
                    format!(
                        "security group {} ({}, tagged jbake:build-id={id})",
                        g.id, g.name
                    ),
                    format!("jbake names a build's security group {key_name} (or {test_name})"),
                );
                continue;
            }
            order[3].push((
                Resource::SecurityGroup {
                    name: g.name.clone(),
                    vpc: String::new(),
                    id: Some(g.id.clone()),
                },
                id.to_string(),
            ));
        }
        for k in &b.key_pairs {
            if !ours(&k.name) {
                skip(
                    &mut found,
                    format!("key pair {} (tagged jbake:build-id={id})", k.name),
                    format!("jbake names a build's key pair {key_name} (or {test_name})"),
                );
                continue;
            }
            order[4].push((
                Resource::KeyPair {
                    name: k.name.clone(),
                },
                id.to_string(),
            ));
        }
    }
    found.remove = order.into_iter().flatten().collect();
    found
}

/// Removes what [`find`] chose, in its order. Returns what could not be removed.
pub async fn remove(aws: &Aws, found: &Found, progress: &Progress) -> Vec<(Resource, aws::Error)> {
    let mut failed = Vec::new();
    for (r, build_id) in &found.remove {
        progress.info("gc", &format!("removing {r}"));
        if let Err(e) = Undo::found(build_id).undo(aws, r, progress).await {
            progress.warn(&format!("could not remove {r}: {e}"));
            failed.push((r.clone(), e));
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    const B1: &str = "20261128-113000-a1b2c3";
    const B2: &str = "20261128-100000-d4e5f6";

    fn t(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn build_tags(id: &str, created: &str, expires: &str) -> Tags {
        t(&[
            (tags::BUILD_ID, id),
            (tags::RECIPE, "r"),
            (tags::CREATED_AT, created),
            (tags::EXPIRES_AT, expires),
        ])
    }

    fn instance(id: &str, build: &str, state: &str, tags: &Tags) -> InstanceInfo {
        let mut tags = tags.clone();
        tags.push(("Name".into(), format!("jbake build r {build}")));
        InstanceInfo {
            id: id.into(),
            state: state.into(),
            public_ip: None,
            private_ip: None,
            vpc_id: None,
            key_name: Some(format!("jbake-{build}")),
            security_groups: vec![],
            tags,
        }
    }

    fn tagged(id: &str, name: &str, tags: &Tags) -> Tagged {
        Tagged {
            id: id.into(),
            name: name.into(),
            tags: tags.clone(),
            state: String::new(),
        }
    }

    fn image(
        id: &str,
        name: &str,
        state: &str,
        complete: &str,
        snaps: &[&str],
        tags: &Tags,
    ) -> ImageInfo {
        let mut tags = tags.clone();
        tags.push((tags::COMPLETE.into(), complete.into()));
        tags.push((tags::VERSION.into(), "2026.11.28-1".into()));
        ImageInfo {
            id: id.into(),
            name: name.into(),
            state: state.into(),
            creation_date: String::new(),
            root_device: None,
            snapshots: snaps.iter().map(|s| s.to_string()).collect(),
            tags,
        }
    }

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-11-28T12:00:00Z").unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn names(found: &Found) -> Vec<String> {
        found.remove.iter().map(|(r, _)| r.to_string()).collect()
    }

    #[test]
    fn due_rules() {
        let running = build_tags(B1, "2026-11-28T11:30:00Z", "2026-11-28T13:30:00Z");
        let expired = build_tags(B2, "2026-11-28T10:00:00Z", "2026-11-28T11:59:00Z");
        let l = Listing {
            key_pairs: vec![
                tagged(&format!("jbake-{B1}"), &format!("jbake-{B1}"), &running),
                tagged(&format!("jbake-{B2}"), &format!("jbake-{B2}"), &expired),
            ],
            ..Listing::default()
        };
        let all = decide(&l, &Selector::default(), Busy::Spare, now());
        assert_eq!(
            names(&all),
            [format!("key pair jbake-{B2}")],
            "a build in progress is left alone"
        );
        let older = Selector {
            older_than: Some(Duration::from_secs(600)),
            build_id: None,
        };
        assert_eq!(decide(&l, &older, Busy::Spare, now()).remove.len(), 2);
        let huge = Selector {
            older_than: Some(Duration::from_secs(u64::MAX)),
            build_id: None,
        };
        assert_eq!(
            decide(&l, &huge, Busy::Spare, now()).remove.len(),
            1,
            "no overflow"
        );
        let one = Selector {
            older_than: None,
            build_id: Some(B1.into()),
        };
        assert_eq!(
            names(&decide(&l, &one, Busy::Spare, now())),
            [format!("key pair jbake-{B1}")]
        );
    }

    #[test]
    fn a_build_still_making_its_image_is_spared_by_gc_not_by_its_own_sweep() {
        // Expired by its first expires-at, but the image wait moved it on: not due.
        let moved = build_tags(B1, "2026-11-28T09:00:00Z", "2026-11-28T11:00:00Z");
        let mut later = moved.clone();
        later.retain(|(k, _)| k != tags::EXPIRES_AT);
        later.push((tags::EXPIRES_AT.into(), "2026-11-28T13:00:00Z".into()));
        let mut l = Listing {
            instances: vec![instance("i-1", B1, "stopped", &moved)],
            images: vec![image(
                "ami-1",
                "r-2026.11.28-1",
                "pending",
                "false",
                &[],
                &later,
            )],
            ..Listing::default()
        };
        assert!(decide(&l, &Selector::default(), Busy::Spare, now()).is_empty());
        // Killed during the wait and long expired: gc still leaves it while EC2 makes the image.
        l.images[0].tags = moved.clone();
        l.images[0]
            .tags
            .push((tags::COMPLETE.into(), "false".into()));
        l.images[0]
            .tags
            .push((tags::VERSION.into(), "2026.11.28-1".into()));
        let found = decide(&l, &Selector::default(), Busy::Spare, now());
        assert!(found.remove.is_empty(), "{:?}", found.remove);
        assert!(
            found.skipped[0]
                .why
                .contains("image ami-1 is still pending"),
            "{:?}",
            found.skipped
        );
        l.instances[0].state = "stopping".into();
        assert!(
            decide(&l, &Selector::default(), Busy::Spare, now()).skipped[0]
                .why
                .contains("i-1 is stopping")
        );
        // The build's own sweep removes it.
        let own = Selector {
            older_than: None,
            build_id: Some(B1.into()),
        };
        assert_eq!(
            names(&decide(&l, &own, Busy::Remove, now())),
            ["instance i-1", "image ami-1 (r-2026.11.28-1)"]
        );
        // Once available (and still incomplete), gc removes it with its orphan snapshots.
        l.instances[0].state = "stopped".into();
        l.images[0].state = "available".into();
        assert_eq!(
            decide(&l, &Selector::default(), Busy::Spare, now())
                .remove
                .len(),
            2
        );
    }

    #[test]
    fn a_half_made_copy_is_found_in_its_region_with_its_snapshots() {
        let mut tags = build_tags(B2, "2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z");
        tags.push((tags::COPY_OF.into(), "ami-0a".into()));
        tags.push((tags::SOURCE_REGION.into(), "us-east-1".into()));
        let l = Listing {
            images: vec![
                image("ami-1", "r-2026.11.28-1", "available", "false", &["snap-1"], &tags),
                image("ami-2", "r-2026.11.28-1", "available", "true", &["snap-2"], &tags),
            ],
            snapshots: vec![
                tagged(
                    "snap-1",
                    "Copied for DestinationAmi ami-1 from SourceAmi ami-0a for SourceSnapshot snap-0a. Task created on 1,764,000,000,000.",
                    &tags,
                ),
                tagged(
                    "snap-2",
                    "Copied for DestinationAmi ami-2 from SourceAmi ami-0a for SourceSnapshot snap-0a. Task created on 1,764,000,000,000.",
                    &tags,
                ),
                tagged(
                    "snap-3",
                    "Copied for DestinationAmi ami-9 from SourceAmi ami-0a for SourceSnapshot snap-0a. Task created on 1,764,000,000,000.",
                    &tags,
                ),
            ],
            ..Listing::default()
        };
        let found = decide(&l, &Selector::default(), Busy::Spare, now());
        assert_eq!(
            names(&found),
            ["image ami-1 (r-2026.11.28-1)", "snapshot snap-3"],
            "the half-made copy (its snapshot goes with it) and a snapshot whose copy is gone; the finished copy stays"
        );
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
        assert_eq!(
            snapshot_of("Created by CreateImage(i-1) for ami-2 from vol-3"),
            Some("ami-2")
        );
        assert_eq!(snapshot_of("my backup"), None);
    }

    #[test]
    fn the_boot_test_s_instance_group_and_key_pair_are_the_build_s() {
        let tags = build_tags(B2, "2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z");
        let mut test = instance("i-2", B2, "running", &tags);
        test.key_name = Some(format!("jbake-{B2}-test"));
        test.tags.retain(|(k, _)| k != "Name");
        test.tags
            .push(("Name".into(), format!("jbake test r {B2}")));
        // A test instance's name with the build's key pair is not jbake's.
        let mut odd = test.clone();
        odd.id = "i-3".into();
        odd.key_name = Some(format!("jbake-{B2}"));
        let l = Listing {
            instances: vec![instance("i-1", B2, "stopped", &tags), test, odd],
            groups: vec![
                tagged("sg-1", &format!("jbake-{B2}"), &tags),
                tagged("sg-2", &format!("jbake-{B2}-test"), &tags),
            ],
            key_pairs: vec![
                tagged(&format!("jbake-{B2}"), &format!("jbake-{B2}"), &tags),
                tagged(
                    &format!("jbake-{B2}-test"),
                    &format!("jbake-{B2}-test"),
                    &tags,
                ),
            ],
            // An image that failed its boot test is finished: kept.
            images: vec![image(
                "ami-1",
                "r-2026.11.28-1",
                "available",
                "true",
                &["snap-1"],
                &tags,
            )],
            snapshots: vec![tagged(
                "snap-1",
                "Created by CreateImage(i-1) for ami-1",
                &tags,
            )],
        };
        let found = decide(&l, &Selector::default(), Busy::Spare, now());
        assert_eq!(
            names(&found),
            [
                "instance i-1".to_string(),
                "instance i-2".to_string(),
                "security group sg-1".to_string(),
                "security group sg-2".to_string(),
                format!("key pair jbake-{B2}"),
                format!("key pair jbake-{B2}-test"),
            ]
        );
        assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
        assert!(found.skipped[0].what.starts_with("instance i-3"));
    }

    #[test]
    fn only_what_looks_like_jbakes_is_removed() {
        let tags = build_tags(B2, "2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z");
        let mut foreign = instance("i-2", B2, "running", &tags);
        foreign.key_name = Some("prod".into());
        let l = Listing {
            instances: vec![instance("i-1", B2, "running", &tags), foreign],
            groups: vec![
                tagged("sg-1", &format!("jbake-{B2}"), &tags),
                tagged("sg-2", "web", &tags),
            ],
            key_pairs: vec![tagged("prod", "prod", &tags)],
            images: vec![
                image(
                    "ami-1",
                    "r-2026.11.28-1",
                    "available",
                    "false",
                    &["snap-1"],
                    &tags,
                ),
                image("ami-2", "golden", "available", "false", &[], &tags),
                image(
                    "ami-3",
                    "r-2026.11.28-1",
                    "available",
                    "true",
                    &["snap-3"],
                    &tags,
                ),
            ],
            snapshots: vec![
                tagged("snap-1", "Created by CreateImage(i-1) for ami-1", &tags),
                tagged("snap-3", "Created by CreateImage(i-1) for ami-3", &tags),
                tagged("snap-4", "Created by CreateImage(i-1) for ami-9", &tags),
                tagged("snap-5", "my backup", &tags),
            ],
        };
        let found = decide(&l, &Selector::default(), Busy::Spare, now());
        assert_eq!(
            names(&found),
            [
                "instance i-1",
                "image ami-1 (r-2026.11.28-1)",
                "snapshot snap-4",
                "security group sg-1"
            ]
        );
        let skipped: Vec<&str> = found.skipped.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(skipped.len(), 5, "{skipped:?}");
        for what in [
            "instance i-2",
            "image ami-2",
            "snapshot snap-5",
            "security group sg-2",
            "key pair prod",
        ] {
            assert!(
                skipped.iter().any(|s| s.starts_with(what)),
                "{what} in {skipped:?}"
            );
        }
        // Not a build id at all.
        let odd = build_tags("prod", "2026-11-28T10:00:00Z", "2026-11-28T11:00:00Z");
        let l = Listing {
            key_pairs: vec![tagged("jbake-prod", "jbake-prod", &odd)],
            ..Listing::default()
        };
        let found = decide(&l, &Selector::default(), Busy::Spare, now());
        assert!(
            found.remove.is_empty() && found.skipped.len() == 1,
            "{found:?}"
        );
    }
}
