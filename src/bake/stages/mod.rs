//! The bake's stages, in order ([`Stage::ALL`]), over a typed build state: [`Bake`] holds what
//! every stage shares (options, clients, ledger, progress); each stage returns what the next
//! ones need ([`base::Resolved`], [`access::Keys`], [`access::Group`], [`machine::Launched`],
//! [`image::Imaged`]), so a stage cannot run without what it depends on.
//!
//! Adding a stage: a variant of [`Stage`] (in [`Stage::ALL`] at its place), a function in the
//! file of its concern, one line in [`until_tagged`]. A stage that checks or copies the image
//! (the boot test, CopyImage to other regions) goes between [`Stage::Image`] and [`Stage::Tag`]:
//! the image is still `jbake:complete=false` there and undone with the rest if the stage fails;
//! what it makes goes into the ledger like everything else.
//!
//! Interruption: everything up to [`Stage::Tag`] runs under the caller's [`Interrupt`] (the
//! stage running is dropped, the cleanup follows); [`Stage::Record`] (a local file) runs to its
//! end, so an interruption after the image is complete does not lose its record.

pub mod access;
pub mod base;
pub mod boot_test;
pub mod copy;
pub mod image;
pub mod machine;
pub mod publish;
pub mod record;
pub mod share;

use std::future::Future;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::aws::{self, ec2, wait, Aws};
use crate::progress::Progress;
use crate::util::fmt_duration;

use super::boot_checks::{fingerprint, machine_id_hash, BuildIdentity};
use super::distribute::{self, Ctx, RegionKey, Source};
use super::interrupt::Interrupt;
use super::ledger::{Entry, Ledger};
use super::{BakeOptions, Built, Error};

/// The named stages of a bake, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The base image, the content hash (an image of the same inputs: nothing to do), the
    /// version to build.
    ResolveBase,
    /// A one-time ed25519 key pair; only the public half is imported.
    KeyPair,
    /// A security group: SSH from the builder only.
    SecurityGroup,
    /// The instance (IMDSv2 only, encrypted root volume, TTL watchdog), until it runs.
    Launch,
    /// SSH, verifying the one-time host key jbake gave the instance.
    Connect,
    /// The recipe's steps and checks.
    Provision,
    /// Scrubbing what the build leaves on the machine (keys, identity, logs, leases, seed).
    Hygiene,
    /// Stopping the instance, until it is stopped.
    Stop,
    /// CreateImage (image and snapshots tagged at creation, its number confirmed), until it is
    /// available; then IMDSv2 only.
    Image,
    /// The boot test: an instance of the image, checked over SSH (jbake's checks and the
    /// recipe's `test:`); `jbake:tested` on the image. Not with `--skip-test`.
    Test,
    /// CopyImage to every `--copy-to` region, at once, until the copies are available.
    Copy,
    /// Launch permissions for the `--share-with` accounts, on the image and its copies.
    Share,
    /// The image id (each region's) in the `--publish-ssm` parameter: only a tested image.
    Publish,
    /// `jbake:complete=true` (on the copies, then the image): the build's result.
    Tag,
    /// The manifest record.
    Record,
}

impl Stage {
    pub const ALL: [Stage; 15] = [
        Stage::ResolveBase,
        Stage::KeyPair,
        Stage::SecurityGroup,
        Stage::Launch,
        Stage::Connect,
        Stage::Provision,
        Stage::Hygiene,
        Stage::Stop,
        Stage::Image,
        Stage::Test,
        Stage::Copy,
        Stage::Share,
        Stage::Publish,
        Stage::Tag,
        Stage::Record,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::ResolveBase => "resolve-base",
            Stage::KeyPair => "key-pair",
            Stage::SecurityGroup => "security-group",
            Stage::Launch => "launch",
            Stage::Connect => "connect",
            Stage::Provision => "provision",
            Stage::Hygiene => "hygiene",
            Stage::Stop => "stop",
            Stage::Image => "image",
            Stage::Test => "test",
            Stage::Copy => "copy",
            Stage::Share => "share",
            Stage::Publish => "publish",
            Stage::Tag => "tag",
            Stage::Record => "record",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the stages stopped short of a result.
#[derive(Debug)]
pub enum Stop {
    Failed(Error),
    Interrupted(String),
}

/// What the boot test said about the image: the hook between the boot-test stage (which sets
/// it) and publish (which reads it, with [`distribute::may_publish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootTest {
    /// Not (yet) tested by this build (`--skip-test`, an unchanged image, `jbake copy`): the
    /// image's own `jbake:tested` tag decides.
    Pending,
    /// The test stage passed it (a failed image ends the build before publish).
    Passed,
}

/// What every stage shares: the build state that is not any one stage's output.
pub struct Bake {
    pub opts: BakeOptions,
    pub aws: Aws,
    pub ledger: Ledger,
    pub build_id: String,
    /// When the build started (RFC 3339), for tags and the manifest.
    pub started: String,
    pub started_at: SystemTime,
    pub t0: Instant,
    pub progress: Progress,
    pub interrupt: Interrupt,
    /// The root shell's pid on the machine (for stopping a step after an interrupt).
    pub broker_pid: Arc<AtomicU32>,
    /// The stages entered so far, in order.
    pub entered: Vec<Stage>,
    /// The image's boot test (set by its stage; publish reads it).
    pub boot_test: BootTest,
    /// Each region's KMS key, checked before the bake ([`distribute::check_keys`]).
    pub keys: Vec<RegionKey>,
    /// The recipe's `facts:` as read on the machine (provision), for the image's tags.
    pub facts: Vec<(String, String)>,
}

impl Bake {
    pub fn new(
        opts: BakeOptions,
        aws: Aws,
        ledger: Ledger,
        build_id: String,
        progress: Progress,
        interrupt: Interrupt,
    ) -> Bake {
        let started_at = SystemTime::now();
        Bake {
            opts,
            aws,
            ledger,
            build_id,
            started: humantime::format_rfc3339_seconds(started_at).to_string(),
            started_at,
            t0: Instant::now(),
            progress,
            interrupt,
            broker_pid: Arc::new(AtomicU32::new(0)),
            entered: Vec::new(),
            facts: Vec::new(),
            boot_test: BootTest::Pending,
            keys: Vec::new(),
        }
    }

    /// What the distribution stages need of the build.
    pub fn ctx(&self) -> Ctx<'_> {
        Ctx {
            aws: &self.aws,
            ledger: &self.ledger,
            progress: &self.progress,
            run_id: &self.build_id,
            started: &self.started,
            dist: &self.opts.distribution,
        }
    }

    /// Marks the start of a stage.
    fn enter(&mut self, stage: Stage) {
        self.entered.push(stage);
        failpoint(stage);
    }
}

/// Debug builds only (the tests): `JBAKE_FAILPOINT=panic:<stage>` panics as that stage
/// starts, to prove that a panicking build still cleans up. Release builds ignore it.
fn failpoint(stage: Stage) {
    #[cfg(debug_assertions)]
    if std::env::var("JBAKE_FAILPOINT").ok().as_deref() == Some(&format!("panic:{stage}")) {
        panic!("JBAKE_FAILPOINT: a panic in stage {stage}");
    }
    #[cfg(not(debug_assertions))]
    let _ = stage;
}

/// What the interruptible stages made.
enum Made {
    /// An image of the same inputs exists: nothing was made.
    Unchanged(Built),
    /// The new image, complete.
    Image(Built),
}

/// Runs the stages; returns the progress (for the cleanup's lines) and the result.
pub async fn run(mut b: Bake) -> (Progress, Result<Built, Stop>) {
    let mut interrupt = b.interrupt.clone();
    let seen = interrupt.count();
    let made = tokio::select! {
        r = until_tagged(&mut b) => r.map_err(Stop::Failed),
        why = interrupt.after(seen) => {
            b.progress.abandon_step();
            b.progress.warn(&format!("interrupted {why}: stopping the build and removing what it made"));
            Err(Stop::Interrupted(why))
        }
    };
    let result = match made {
        Ok(Made::Unchanged(built)) | Ok(Made::Image(built)) => {
            b.enter(Stage::Record);
            record::record(&b, &built)
                .map(|()| built)
                .map_err(Stop::Failed)
        }
        Err(e) => Err(e),
    };
    (b.progress, result)
}

/// The stages up to [`Stage::Tag`].
async fn until_tagged(b: &mut Bake) -> Result<Made, Error> {
    b.enter(Stage::ResolveBase);
    let resolved = match base::resolve(b).await? {
        base::Resolution::Unchanged(mut built) => {
            // The same image again: it still gets what it lacks (a copy in a region added to
            // --copy-to since, the parameter).
            let pending = distribute_image(b, &built.ami_id).await?;
            b.enter(Stage::Tag);
            copy::complete(&b.ctx(), &pending.copies, &Vec::new()).await?;
            built.distributed = finish(b, pending);
            return Ok(Made::Unchanged(*built));
        }
        base::Resolution::Build(r) => r,
    };
    b.enter(Stage::KeyPair);
    let keys = access::key_pair(b, &resolved).await?;
    b.enter(Stage::SecurityGroup);
    let group = access::security_group(b, &resolved).await?;
    b.enter(Stage::Launch);
    let launched = machine::launch(b, &resolved, &keys, &group).await?;
    b.enter(Stage::Connect);
    let target = machine::target(b, &resolved, &keys, &launched)?;
    let mut ex = crate::exec::Executor::connect(
        target,
        launched.id.clone(),
        resolved.plan.secrets(),
        &mut b.progress,
        b.broker_pid.clone(),
    )
    .await?;
    b.entered.push(Stage::Provision);
    failpoint(Stage::Provision);
    let steps = machine::provision(&mut ex, &resolved.plan).await;
    let steps = match steps {
        Ok((rows, facts)) => {
            b.facts = facts;
            rows
        }
        Err((e, report)) => {
            ex.close().await;
            b.progress.summary(&report.rows, report.elapsed, false);
            return Err(e.into());
        }
    };
    // What the boot test compares instances of the image with: the build's one-time keys and
    // its machine id (read now: the hygiene empties it).
    let machine_id = match machine::machine_id(&mut ex).await {
        Ok(id) => id,
        Err(e) => {
            ex.close().await;
            return Err(e.into());
        }
    };
    let identity = BuildIdentity {
        build_id: b.build_id.clone(),
        host_key: Some(fingerprint(keys.host.public_key())),
        login_key: Some(fingerprint(keys.client.public_key())),
        machine_id: machine_id.as_deref().map(machine_id_hash),
    };
    b.entered.push(Stage::Hygiene);
    failpoint(Stage::Hygiene);
    let hygiene = machine::hygiene(&mut ex, &resolved.plan, &keys).await;
    ex.close().await;
    let mut rows = steps;
    match hygiene {
        Ok(more) => rows.extend(more),
        Err((e, report)) => {
            rows.extend(report.rows);
            b.progress.summary(&rows, b.t0.elapsed(), false);
            return Err(e.into());
        }
    }
    b.progress.summary(&rows, b.t0.elapsed(), true);
    b.enter(Stage::Stop);
    machine::stop(b, &launched).await?;
    b.enter(Stage::Image);
    let imaged = image::image(b, &resolved, &launched, &identity.tags()).await?;
    let tested = if b.opts.skip_test {
        None
    } else {
        b.enter(Stage::Test);
        let network = (group.vpc.clone(), group.cidr.clone());
        let passed = boot_test::in_bake(
            b,
            &resolved.plan,
            &resolved.common,
            &imaged,
            &identity,
            network,
        )
        .await?;
        b.boot_test = BootTest::Passed;
        Some(passed)
    };
    // Copied, shared and published only once it passed its boot test.
    let pending = distribute_image(b, &imaged.id).await?;
    b.enter(Stage::Tag);
    // The copies first, then the image: a copy never outlives a build that failed.
    copy::complete(&b.ctx(), &pending.copies, &Vec::new()).await?;
    let mut built = image::tag(b, &resolved, &imaged, tested).await?;
    built.distributed = finish(b, pending);
    Ok(Made::Image(built))
}

/// What the distribution stages made, until the tag stage keeps it.
struct Pending {
    copies: Vec<copy::Copied>,
    published: Vec<publish::Publishing>,
    regions: std::collections::BTreeMap<String, String>,
}

/// Stages copy, share and publish for the image `ami` of the build's region (a new one, or an
/// unchanged one).
async fn distribute_image(b: &mut Bake, ami: &str) -> Result<Pending, Error> {
    let mut pending = Pending {
        copies: Vec::new(),
        published: Vec::new(),
        regions: [(b.aws.region.clone(), ami.to_string())].into(),
    };
    if b.opts.distribution.is_empty() {
        return Ok(pending);
    }
    let image = b.aws.ec2.image(ami).await?.ok_or_else(|| {
        crate::aws::Error::other(
            format!("DescribeImages {ami}"),
            &b.aws.region,
            "the image is gone (deregistered by someone else?)",
        )
    })?;
    let source = Source {
        region: b.aws.region.clone(),
        image,
    };
    b.enter(Stage::Copy);
    pending.copies = copy::copy(&b.ctx(), &source).await?;
    b.enter(Stage::Share);
    share::share(&b.ctx(), &source, &pending.copies, &b.keys).await?;
    b.enter(Stage::Publish);
    pending.published = publish::publish(&b.ctx(), &source, &pending.copies, b.boot_test).await?;
    Ok(pending)
}

/// The end of the tag stage: what the distribution made is kept; where the image is now.
fn finish(b: &Bake, pending: Pending) -> distribute::Distributed {
    copy::keep(&b.ctx(), &pending.copies);
    publish::keep(&b.ctx(), &pending.published);
    let mut regions = pending.regions;
    regions.extend(
        pending
            .copies
            .iter()
            .map(|c| (c.region.clone(), c.id.clone())),
    );
    distribute::Distributed {
        regions,
        shared_with: b.opts.distribution.share_with.clone(),
        published: pending.published.into_iter().map(|p| p.published).collect(),
    }
}

/// Waits until image `id` (in `aws`'s region; made at `created`, recorded as `entry`) is
/// available, then makes it IMDSv2-only (instances launched from it get no IMDSv1).
/// `Ok(Err(state))`: EC2 says it failed, or it is gone once it had been visible. A NotFound
/// right after the create is "not yet" (eventual consistency).
#[allow(clippy::too_many_arguments)] // one call per kind of image: the image and its copies
pub(crate) async fn image_ready(
    aws: &Aws,
    progress: &Progress,
    ledger: &Ledger,
    entry: Entry,
    id: &str,
    created: Instant,
    what: &str,
    deadline: Duration,
) -> Result<Result<(), String>, Error> {
    let available = wait_for(
        progress,
        &format!("{what} to be available"),
        deadline,
        || async {
            let img = match aws.ec2.image(id).await? {
                Some(img) => img,
                None if wait::not_yet_visible(created) => {
                    return Ok(wait::Poll::Pending("not visible yet".to_string()))
                }
                None => return Ok(wait::Poll::Ready(Err("gone".to_string()))),
            };
            ledger.seen(entry);
            Ok::<_, aws::Error>(if ec2::image_available(&img.state) {
                wait::Poll::Ready(Ok(()))
            } else if ec2::image_failed(&img.state) {
                wait::Poll::Ready(Err(img.state))
            } else {
                wait::Poll::Pending(img.state)
            })
        },
    )
    .await?;
    if available.is_err() {
        return Ok(available);
    }
    settle(progress, &format!("{what} to take IMDSv2 only"), || async {
        match aws.ec2.require_imds_v2(id).await {
            Ok(()) => Ok(wait::Poll::Ready(())),
            Err(e) if e.is_not_found() && wait::not_yet_visible(created) => {
                Ok(wait::Poll::Pending("not visible yet".into()))
            }
            Err(e) => Err(e),
        }
    })
    .await?;
    Ok(Ok(()))
}

/// Waits until `check` is ready, with progress lines and an error naming the last state.
pub(crate) async fn wait_for<T, F, Fut>(
    progress: &Progress,
    what: &str,
    deadline: Duration,
    check: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<wait::Poll<T>, aws::Error>>,
{
    let t = Instant::now();
    let r = wait::until(
        deadline,
        Duration::from_secs(10),
        |s| progress.info("waiting", &format!("waiting for {what}: {s}")),
        check,
    )
    .await;
    match r {
        Ok(Ok(v)) => {
            progress.info(
                "waited",
                &format!("{what}: done in {}", fmt_duration(t.elapsed())),
            );
            Ok(v)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(state) => Err(Error::Timeout {
            what: format!("waiting for {what}"),
            state,
            waited: deadline,
        }),
    }
}

/// Retries `check` while it is pending — a resource EC2 does not show yet — for up to
/// [`PROPAGATION`](wait::PROPAGATION), saying so only when it had to wait.
pub(crate) async fn settle<T, F, Fut>(progress: &Progress, what: &str, check: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<wait::Poll<T>, aws::Error>>,
{
    let t = Instant::now();
    let mut waited = false;
    let r = wait::until(
        wait::PROPAGATION,
        Duration::from_secs(10),
        |s| {
            waited = true;
            progress.info("waiting", &format!("waiting for {what}: {s}"))
        },
        check,
    )
    .await;
    match r {
        Ok(Ok(v)) => {
            if waited {
                progress.info(
                    "waited",
                    &format!("{what}: done in {}", fmt_duration(t.elapsed())),
                );
            }
            Ok(v)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(state) => Err(Error::Timeout {
            what: format!("waiting for {what}"),
            state,
            waited: wait::PROPAGATION,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_have_distinct_names_in_order() {
        let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "resolve-base",
                "key-pair",
                "security-group",
                "launch",
                "connect",
                "provision",
                "hygiene",
                "stop",
                "image",
                "test",
                "copy",
                "share",
                "publish",
                "tag",
                "record"
            ]
        );
    }
}
