//! What a build made, undone in reverse order on any exit (Packer's multistep Run/Cleanup,
//! with Rust ownership): the [`Ledger`] belongs to the bake's entry point, not to the task that
//! runs the stages, so it outlives that task however it ends (done, failed, cancelled by an
//! interrupt, or panicked) and is undone after it.
//!
//! A stage records a resource *before* the call that makes it, by what it already knows (the key
//! pair's and security group's name, the image's name, the build's tag for its instance), and
//! adds the id the answer brings. So a resource whose answer was lost, or whose call was cut off
//! by an interrupt, is still undone: found by that name or tag. A `NotFound` while undoing
//! something EC2 never showed, and that is younger than [`PROPAGATION`], means "not visible
//! yet": the undo tries again. On success the image is kept (it leaves the ledger); everything
//! else is undone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::aws::wait::{self, not_yet_visible, LOST_ANSWER, PROPAGATION};
use crate::aws::{self, Aws};
use crate::progress::Progress;

use super::tags;

/// A resource of a build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    KeyPair {
        name: String,
    },
    SecurityGroup {
        name: String,
        vpc: String,
        id: Option<String>,
    },
    /// `id` is `None` until RunInstances answered; until then the build's instance is found by
    /// its `jbake:build-id` tag.
    Instance {
        id: Option<String>,
    },
    /// Undoing an image also deletes its snapshots, found by the build's tag.
    Image {
        name: String,
        id: Option<String>,
    },
    /// A snapshot whose image is gone (only `gc` finds these).
    Snapshot {
        id: String,
    },
    /// A copy of the image in another region (CopyImage): undone like an image, there. `id` is
    /// `None` until CopyImage answered; until then it is found by its name and the build's tag.
    Copy {
        region: String,
        name: String,
        id: Option<String>,
    },
    /// An SSM parameter that now names the image (or its copy in `region`): undone by putting
    /// `previous` back (deleting it when it held nothing), if it still names `value`.
    Parameter {
        region: String,
        name: String,
        previous: Option<String>,
        value: String,
    },
}

impl Resource {
    /// The region of a resource that is not in the build's own region.
    pub fn region(&self) -> Option<&str> {
        match self {
            Resource::Copy { region, .. } | Resource::Parameter { region, .. } => Some(region),
            _ => None,
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::KeyPair { name } => write!(f, "key pair {name}"),
            Resource::SecurityGroup { id: Some(id), .. } => write!(f, "security group {id}"),
            Resource::SecurityGroup { name, vpc, .. } => {
                write!(f, "security group {name} (in {vpc})")
            }
            Resource::Instance { id: Some(id) } => write!(f, "instance {id}"),
            Resource::Instance { id: None } => write!(f, "the build's instance (id not known)"),
            Resource::Image { id: Some(id), name } => write!(f, "image {id} ({name})"),
            Resource::Image { name, .. } => write!(f, "image {name}"),
            Resource::Snapshot { id } => write!(f, "snapshot {id}"),
            Resource::Copy {
                region,
                name,
                id: Some(id),
            } => write!(f, "copy {id} ({name}) in {region}"),
            Resource::Copy { region, name, .. } => write!(f, "copy {name} in {region}"),
            Resource::Parameter {
                region,
                name,
                value,
                ..
            } => write!(f, "SSM parameter {name} in {region} ({value})"),
        }
    }
}

/// A handle on a recorded resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry(usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To undo.
    Live,
    /// The build's result (the image): never undone.
    Kept,
    /// Undone, or known never to have been made.
    Gone,
}

#[derive(Debug, Clone)]
struct Record {
    resource: Resource,
    /// When it was recorded (just before the call that makes it).
    created: Instant,
    /// EC2 has shown it: from now on a NotFound means it is gone.
    seen: bool,
    state: State,
}

/// The resources of one build, shared by the stages and the cleanup.
#[derive(Debug, Clone)]
pub struct Ledger {
    build_id: String,
    records: Arc<Mutex<Vec<Record>>>,
}

impl Ledger {
    pub fn new(build_id: &str) -> Ledger {
        Ledger {
            build_id: build_id.to_string(),
            records: Arc::default(),
        }
    }

    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a resource about to be made (or just made).
    pub fn record(&self, resource: Resource) -> Entry {
        let mut records = self.lock();
        records.push(Record {
            resource,
            created: Instant::now(),
            seen: false,
            state: State::Live,
        });
        Entry(records.len() - 1)
    }

    /// Changes what is known about a recorded resource (its id, once the answer came).
    pub fn update(&self, e: Entry, f: impl FnOnce(&mut Resource)) {
        if let Some(r) = self.lock().get_mut(e.0) {
            f(&mut r.resource);
        }
    }

    /// EC2 has shown the resource: a later NotFound means it is gone.
    pub fn seen(&self, e: Entry) {
        if let Some(r) = self.lock().get_mut(e.0) {
            r.seen = true;
        }
    }

    /// The call that was to make it was refused: there is nothing to undo.
    pub fn never_made(&self, e: Entry) {
        if let Some(r) = self.lock().get_mut(e.0) {
            r.state = State::Gone;
        }
    }

    /// The build's result: never undone.
    pub fn keep(&self, e: Entry) {
        if let Some(r) = self.lock().get_mut(e.0) {
            r.state = State::Kept;
        }
    }

    /// The recorded resource.
    pub fn get(&self, e: Entry) -> Option<Resource> {
        self.lock().get(e.0).map(|r| r.resource.clone())
    }

    /// The other regions the build made something in (its copies'), in the order recorded.
    pub fn regions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in self.lock().iter() {
            if let Some(region) = r.resource.region() {
                if !out.iter().any(|o| o == region) {
                    out.push(region.to_string());
                }
            }
        }
        out
    }

    /// What is still to undo, newest first.
    pub fn remaining(&self) -> Vec<Resource> {
        self.lock()
            .iter()
            .rev()
            .filter(|r| r.state == State::Live)
            .map(|r| r.resource.clone())
            .collect()
    }

    /// Undoes the live ones of `entries` now, newest first (the boot test's instance, group and
    /// key pair, once the test is over: not left running while later stages work). What cannot
    /// be removed stays live, for the cleanup to try again and report; returns how many.
    pub async fn undo_now(&self, aws: &Aws, progress: &Progress, entries: &[Entry]) -> usize {
        let mut order: Vec<Entry> = entries.to_vec();
        order.sort_by_key(|e| std::cmp::Reverse(e.0));
        let mut failed = 0;
        for e in order {
            let Some(record) = self
                .lock()
                .get(e.0)
                .filter(|r| r.state == State::Live)
                .cloned()
            else {
                continue;
            };
            progress.info("cleanup", &format!("removing {}", record.resource));
            let how = Undo {
                build_id: &self.build_id,
                created: record.created,
                seen: record.seen,
            };
            match how.undo(aws, &record.resource, progress).await {
                Ok(()) => {
                    if let Some(r) = self.lock().get_mut(e.0) {
                        r.state = State::Gone;
                    }
                }
                Err(err) => {
                    failed += 1;
                    progress.warn(&format!(
                        "could not remove {} yet ({err}); the cleanup tries again",
                        record.resource
                    ));
                }
            }
        }
        failed
    }

    /// Undoes everything live, newest first. Failures are reported and the rest still runs;
    /// what could not be removed is returned (it is tagged, so `jbake gc` finds it).
    pub async fn undo(&self, aws: &Aws, progress: &Progress) -> Vec<(Resource, aws::Error)> {
        let mut failed = Vec::new();
        loop {
            let next = {
                let records = self.lock();
                records
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, r)| r.state == State::Live)
                    .map(|(i, r)| (i, r.clone()))
            };
            let Some((i, record)) = next else { break };
            progress.info("cleanup", &format!("removing {}", record.resource));
            let how = Undo {
                build_id: &self.build_id,
                created: record.created,
                seen: record.seen,
            };
            if let Err(e) = how.undo(aws, &record.resource, progress).await {
                progress.warn(&format!("could not remove {}: {e}", record.resource));
                failed.push((record.resource.clone(), e));
            }
            if let Some(r) = self.lock().get_mut(i) {
                r.state = State::Gone;
            }
        }
        failed
    }
}

/// How to undo one resource: of which build, made when, and whether EC2 showed it.
pub struct Undo<'a> {
    pub build_id: &'a str,
    pub created: Instant,
    pub seen: bool,
}

impl Undo<'_> {
    /// A resource `gc` found in a list: EC2 showed it, it is not new.
    pub fn found(build_id: &str) -> Undo<'_> {
        Undo {
            build_id,
            created: Instant::now()
                .checked_sub(PROPAGATION)
                .unwrap_or_else(Instant::now),
            seen: true,
        }
    }

    /// Whether a NotFound about it means "not visible yet" (EC2 gave its id).
    fn not_yet(&self) -> bool {
        !self.seen && not_yet_visible(self.created)
    }

    /// Whether a resource whose answer was lost may still show up in a list.
    fn may_show(&self) -> bool {
        !self.seen && self.created.elapsed() < LOST_ANSWER
    }

    /// Removes one resource, waiting where the next one depends on it (a security group cannot
    /// be deleted while a terminating instance still uses it).
    pub async fn undo(
        &self,
        aws: &Aws,
        r: &Resource,
        progress: &Progress,
    ) -> Result<(), aws::Error> {
        match r {
            Resource::KeyPair { name } => match aws.ec2.delete_key_pair(name).await {
                Err(e) if !e.is_not_found() => Err(e),
                _ => Ok(()),
            },
            Resource::Instance { id: Some(id) } => self.instance(aws, id, progress).await,
            Resource::Instance { id: None } => {
                // RunInstances' answer never came: the instance, if any, carries the build's tag.
                let ids = self
                    .poll(aws, "finding the build's instance", || async {
                        let found = aws
                            .ec2
                            .instances_tagged(tags::BUILD_ID, Some(self.build_id))
                            .await?;
                        let live: Vec<String> = found
                            .into_iter()
                            .filter(|i| i.state != "terminated")
                            .map(|i| i.id)
                            .collect();
                        Ok(if live.is_empty() && self.may_show() {
                            wait::Poll::Pending("not visible yet".into())
                        } else {
                            wait::Poll::Ready(live)
                        })
                    })
                    .await?;
                for id in ids {
                    progress.info("cleanup", &format!("removing instance {id}"));
                    Undo {
                        seen: true,
                        ..*self
                    }
                    .instance(aws, &id, progress)
                    .await?;
                }
                Ok(())
            }
            Resource::SecurityGroup { id: Some(id), .. } => self.security_group(aws, id).await,
            Resource::SecurityGroup {
                name,
                vpc,
                id: None,
            } => {
                let found = self
                    .poll(aws, &format!("finding security group {name}"), || async {
                        Ok(match aws.ec2.security_group_named(name, vpc).await? {
                            Some(g) => wait::Poll::Ready(Some(g.id)),
                            None if self.may_show() => {
                                wait::Poll::Pending("not visible yet".into())
                            }
                            None => wait::Poll::Ready(None),
                        })
                    })
                    .await?;
                match found {
                    Some(id) => {
                        Undo {
                            seen: true,
                            ..*self
                        }
                        .security_group(aws, &id)
                        .await
                    }
                    None => Ok(()),
                }
            }
            Resource::Image { name, id } => self.image_named(aws, name, id.as_deref()).await,
            Resource::Snapshot { id } => self.snapshot(aws, id).await,
            Resource::Copy { region, name, id } => {
                let there = aws.in_region(region).await;
                self.image_named(&there, name, id.as_deref()).await
            }
            Resource::Parameter {
                region,
                name,
                previous,
                value,
            } => {
                let there = aws.in_region(region).await;
                self.parameter(&there, name, previous.as_deref(), value)
                    .await
            }
        }
    }

    /// An image (or a copy) known by its id, or by its name and the build's tag.
    async fn image_named(&self, aws: &Aws, name: &str, id: Option<&str>) -> Result<(), aws::Error> {
        if id.is_some() {
            return self.image(aws, id).await;
        }
        let found = self
            .poll(aws, &format!("finding image {name}"), || async {
                let own: Vec<String> = aws
                    .ec2
                    .images_named(name, &[])
                    .await?
                    .into_iter()
                    .filter(|i| i.tag(tags::BUILD_ID) == Some(self.build_id))
                    .map(|i| i.id)
                    .collect();
                Ok(match own.into_iter().next() {
                    Some(id) => wait::Poll::Ready(Some(id)),
                    None if self.may_show() => wait::Poll::Pending("not visible yet".into()),
                    None => wait::Poll::Ready(None),
                })
            })
            .await?;
        let seen = Undo {
            seen: true,
            ..*self
        };
        seen.image(aws, found.as_deref()).await
    }

    /// Puts back what the parameter held before the build published (or deletes it), unless
    /// something else was published in it since.
    async fn parameter(
        &self,
        aws: &Aws,
        name: &str,
        previous: Option<&str>,
        value: &str,
    ) -> Result<(), aws::Error> {
        match aws.params.get(name).await? {
            Some(p) if p.value == value => match previous {
                Some(prev) => {
                    aws.params
                        .put_image(
                            name,
                            prev,
                            &format!("restored by jbake: build {} did not finish", self.build_id),
                        )
                        .await?;
                    Ok(())
                }
                None => aws.params.delete(name).await,
            },
            _ => Ok(()),
        }
    }

    /// Polls `check` until it is ready, an error, or [`PROPAGATION`] passed.
    async fn poll<T, F, Fut>(&self, aws: &Aws, what: &str, check: F) -> Result<T, aws::Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<wait::Poll<T>, aws::Error>>,
    {
        match wait::until(PROPAGATION, Duration::from_secs(10), |_| {}, check).await {
            Ok(r) => r,
            Err(state) => Err(aws::Error::other(
                what,
                aws.ec2.region(),
                format!("still {state} after {}s", PROPAGATION.as_secs()),
            )),
        }
    }

    async fn instance(&self, aws: &Aws, id: &str, progress: &Progress) -> Result<(), aws::Error> {
        let gone = self
            .poll(aws, &format!("terminating {id}"), || async {
                match aws.ec2.terminate_instance(id).await {
                    Ok(()) => Ok(wait::Poll::Ready(false)),
                    Err(e) if e.is_not_found() && self.not_yet() => {
                        Ok(wait::Poll::Pending("not visible yet".into()))
                    }
                    Err(e) if e.is_not_found() => Ok(wait::Poll::Ready(true)),
                    Err(e) => Err(e),
                }
            })
            .await?;
        if gone {
            return Ok(());
        }
        let waited = wait::until(
            Duration::from_secs(600),
            Duration::from_secs(5),
            |s| progress.info("waiting", &format!("instance {id} is {s}")),
            || async {
                match aws.ec2.instance(id).await {
                    Ok(None) => Ok(wait::Poll::Ready(())),
                    Ok(Some(i)) if i.state == "terminated" => Ok(wait::Poll::Ready(())),
                    Ok(Some(i)) => Ok(wait::Poll::Pending(i.state)),
                    Err(e) if e.is_not_found() => Ok(wait::Poll::Ready(())),
                    Err(e) => Err(e),
                }
            },
        )
        .await;
        match waited {
            Ok(r) => r,
            Err(state) => Err(aws::Error::other(
                format!("terminating {id}"),
                aws.ec2.region(),
                format!("still {state} after 10 minutes"),
            )),
        }
    }

    async fn security_group(&self, aws: &Aws, id: &str) -> Result<(), aws::Error> {
        let waited = wait::until(
            PROPAGATION,
            Duration::from_secs(5),
            |_| {},
            || async {
                match aws.ec2.delete_security_group(id).await {
                    Ok(()) => Ok(wait::Poll::Ready(())),
                    Err(e) if e.is_not_found() && self.not_yet() => {
                        Ok(wait::Poll::Pending("not visible yet".into()))
                    }
                    Err(e) if e.is_not_found() => Ok(wait::Poll::Ready(())),
                    // A terminating instance still uses it.
                    Err(e) if e.is_code("DependencyViolation") => {
                        Ok(wait::Poll::Pending("in use".to_string()))
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await;
        match waited {
            Ok(r) => r,
            Err(state) => Err(aws::Error::other(
                format!("deleting {id}"),
                aws.ec2.region(),
                format!("still {state} after {} minutes", PROPAGATION.as_secs() / 60),
            )),
        }
    }

    /// Deregisters the image (if known) and deletes the build's snapshots that no registered
    /// image of the build uses: DeregisterImage alone leaves them, billed.
    async fn image(&self, aws: &Aws, id: Option<&str>) -> Result<(), aws::Error> {
        if let Some(id) = id {
            self.poll(aws, &format!("deregistering {id}"), || async {
                match aws.ec2.deregister_image(id).await {
                    Ok(()) => Ok(wait::Poll::Ready(())),
                    Err(e) if e.is_not_found() && self.not_yet() => {
                        Ok(wait::Poll::Pending("not visible yet".into()))
                    }
                    Err(e) if e.is_not_found() => Ok(wait::Poll::Ready(())),
                    Err(e) => Err(e),
                }
            })
            .await?;
        }
        let kept: Vec<String> = aws
            .ec2
            .own_images_tagged(tags::BUILD_ID, self.build_id)
            .await?
            .into_iter()
            .filter(|i| Some(i.id.as_str()) != id)
            .flat_map(|i| i.snapshots)
            .collect();
        let snapshots = aws
            .ec2
            .snapshots_tagged(tags::BUILD_ID, Some(self.build_id))
            .await?;
        for s in snapshots {
            let of_this = id.is_some_and(|id| s.name.contains(id));
            if kept.contains(&s.id) && !of_this {
                continue;
            }
            self.snapshot(aws, &s.id).await?;
        }
        Ok(())
    }

    async fn snapshot(&self, aws: &Aws, id: &str) -> Result<(), aws::Error> {
        self.poll(aws, &format!("deleting {id}"), || async {
            match aws.ec2.delete_snapshot(id).await {
                Ok(()) => Ok(wait::Poll::Ready(())),
                Err(e) if e.is_not_found() => Ok(wait::Poll::Ready(())),
                // Its image was just deregistered: EC2 may still see it in use for a moment.
                Err(e) if e.is_code("InvalidSnapshot.InUse") || e.is_code("IncorrectState") => {
                    Ok(wait::Poll::Pending("in use".into()))
                }
                Err(e) => Err(e),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_and_parameters_say_where_they_are() {
        let l = Ledger::new("b1");
        l.record(Resource::KeyPair {
            name: "jbake-b1".into(),
        });
        let c = l.record(Resource::Copy {
            region: "us-west-2".into(),
            name: "r-1".into(),
            id: None,
        });
        assert_eq!(
            l.get(c).map(|r| r.to_string()).as_deref(),
            Some("copy r-1 in us-west-2")
        );
        l.update(c, |r| {
            *r = Resource::Copy {
                region: "us-west-2".into(),
                name: "r-1".into(),
                id: Some("ami-2".into()),
            }
        });
        l.record(Resource::Parameter {
            region: "eu-west-1".into(),
            name: "/jbake/r/latest".into(),
            previous: None,
            value: "ami-3".into(),
        });
        l.record(Resource::Copy {
            region: "us-west-2".into(),
            name: "r-1".into(),
            id: None,
        });
        assert_eq!(l.regions(), ["us-west-2", "eu-west-1"]);
        assert_eq!(
            l.remaining()
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>(),
            [
                "copy r-1 in us-west-2",
                "SSM parameter /jbake/r/latest in eu-west-1 (ami-3)",
                "copy ami-2 (r-1) in us-west-2",
                "key pair jbake-b1"
            ]
        );
    }

    #[test]
    fn undone_newest_first_and_the_kept_image_stays() {
        let l = Ledger::new("b1");
        let k = l.record(Resource::KeyPair {
            name: "jbake-b1".into(),
        });
        let i = l.record(Resource::Instance { id: None });
        l.update(i, |r| {
            *r = Resource::Instance {
                id: Some("i-1".into()),
            }
        });
        let img = l.record(Resource::Image {
            name: "r-1".into(),
            id: Some("ami-1".into()),
        });
        let refused = l.record(Resource::Image {
            name: "r-2".into(),
            id: None,
        });
        l.never_made(refused);
        l.keep(img);
        assert_eq!(
            l.remaining(),
            vec![
                Resource::Instance {
                    id: Some("i-1".into())
                },
                Resource::KeyPair {
                    name: "jbake-b1".into()
                }
            ]
        );
        assert_eq!(
            l.get(k),
            Some(Resource::KeyPair {
                name: "jbake-b1".into()
            })
        );
        assert_eq!(
            Resource::Image {
                name: "r-1".into(),
                id: Some("ami-1".into())
            }
            .to_string(),
            "image ami-1 (r-1)"
        );
    }
}
