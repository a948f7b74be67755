//! Stage test: the boot test. An instance is launched from the new image, as production would
//! launch it, and checked over SSH: jbake's own checks ([`boot_checks`]: a machine id and host
//! keys of its own, no build key authorized), then the recipe's `test:` checks, all of them
//! (a failing check does not hide the next ones).
//!
//! The test instance gets what the build instance gets, made and undone the same way (recorded
//! in the ledger before each call, adopted after a lost answer, removed on every exit): its own
//! one-time key pair and host key (pinned: the first connection verifies it), its own security
//! group, the build's tags, a client token, a TTL watchdog. It differs in what it may reach:
//! its security group lets SSH in and **nothing out** (no EFS to mount, no SSM, no Jenkins
//! agents: a fresh controller must wait for its EFS, not find a production one), and it has no
//! instance profile. It is named `jbake test <recipe> <build id>`; its key pair and group
//! `jbake-<build id>-test`.
//!
//! Verdicts: every check ran and passed, or some failed (their errors). An instance that cannot
//! be reached is no verdict: jbake cannot tell an image that never starts sshd from a network
//! that does not let it in, so the build fails and the image goes with the rest.
//!
//! The test instance is removed as soon as the checks are done (later stages, a copy to other
//! regions, take long): with `--on-error abort`, a failed test leaves it for debugging.

use std::time::{Instant, SystemTime};

use crate::aws::ec2::{Launch, Tags};
use crate::exec::{self, Executor};
use crate::recipe::Plan;
use crate::util::fmt_duration;

use super::super::boot_checks::{self, BuildIdentity};
use super::super::{cloud_init, tags, Error, OnError};
use super::access::{self, GroupSpec};
use super::image::Imaged;
use super::machine;
use super::Bake;

/// The image under test.
#[derive(Debug, Clone)]
pub struct Subject {
    pub id: String,
    pub name: String,
    /// Its root device name (where the test instance's volume goes).
    pub root_device: Option<String>,
}

impl Subject {
    pub fn of(imaged: &Imaged, root_device: Option<String>) -> Subject {
        Subject {
            id: imaged.id.clone(),
            name: imaged.name.clone(),
            root_device,
        }
    }
}

/// What the boot test needs besides the bake's state.
pub struct TestSpec<'a> {
    /// The recipe: the login user, the instance's type and volume, the `test:` checks.
    pub plan: &'a Plan,
    pub image: &'a Subject,
    pub identity: &'a BuildIdentity,
    /// The tags of everything the test makes (`Name` is added).
    pub tags: &'a Tags,
    /// The VPC and where SSH may come from (the build's group's), or `None`: found as a build
    /// finds them.
    pub network: Option<(String, String)>,
}

/// The boot test's verdict.
#[derive(Debug)]
pub enum Verdict {
    Passed {
        /// When (RFC 3339).
        at: String,
    },
    Failed {
        at: String,
        /// How many checks ran.
        checks: usize,
        failures: Vec<exec::Error>,
    },
}

impl Verdict {
    pub fn passed(&self) -> bool {
        matches!(self, Verdict::Passed { .. })
    }

    fn at(&self) -> &str {
        match self {
            Verdict::Passed { at } | Verdict::Failed { at, .. } => at,
        }
    }
}

/// The name of the test's key pair and security group.
pub fn test_access_name(build_id: &str) -> String {
    format!("jbake-{build_id}-test")
}

fn named(tags: &Tags, name: String) -> Tags {
    let mut t = tags.clone();
    t.push(("Name".to_string(), name));
    t
}

/// Launches the test instance, runs the checks on it, removes it. `Err`: no verdict (an AWS
/// error, an instance that could not be reached).
pub async fn boot_test(b: &mut Bake, spec: TestSpec<'_>) -> Result<Verdict, Error> {
    let t0 = Instant::now();
    let TestSpec {
        plan,
        image,
        identity,
        tags,
        network,
    } = spec;
    b.progress.info(
        "stage",
        &format!("boot test of {} ({})", image.id, image.name),
    );
    let name = test_access_name(&b.build_id);
    let keys = access::import_key_pair(
        b,
        name.clone(),
        &format!("jbake-host-{}-test", b.build_id),
        &named(tags, name.clone()),
    )
    .await?;
    let (vpc, cidr) = match network {
        Some(n) => n,
        None => access::vpc_and_cidr(b).await?,
    };
    b.progress.info(
        "stage",
        &format!(
            "creating temporary security group {name} (SSH from {cidr} only, nothing out: the test instance reaches no EFS, SSM or agent)"
        ),
    );
    let group = access::create_group(
        b,
        GroupSpec {
            name: name.clone(),
            description:
                "jbake boot test: SSH from the builder only, no outbound traffic (temporary)",
            vpc,
            cidr,
            tags: named(tags, name.clone()),
        },
    )
    .await?;
    access::no_way_out(b, &group).await?;
    let instance_type = b
        .opts
        .instance_type
        .clone()
        .unwrap_or_else(|| plan.instance.instance_type.clone());
    let ttl_minutes = b.opts.ttl.as_secs().div_ceil(60).max(1);
    b.progress.info(
        "stage",
        &format!(
            "launching a {instance_type} from {} (no instance profile)",
            image.id
        ),
    );
    let launch = Launch {
        image_id: image.id.clone(),
        instance_type,
        key_name: keys.name.clone(),
        security_group_id: group.id.clone(),
        subnet_id: b.opts.subnet_id.clone(),
        iam_instance_profile: None,
        root_device: image
            .root_device
            .clone()
            .unwrap_or_else(|| "/dev/xvda".to_string()),
        volume_gb: i32::try_from(plan.instance.volume_gb).unwrap_or(i32::MAX),
        user_data: cloud_init::user_data(&keys.host, ttl_minutes).map_err(Error::Key)?,
        tags: named(tags, format!("jbake test {} {}", plan.name, b.build_id)),
        client_token: format!("jbake-{}-test", b.build_id),
        // The volume is the image's snapshot: encrypted with the image's key already.
        kms_key_id: None,
    };
    let launched = machine::run_instance(b, &launch).await?;
    // The instance's own address: `--ssh-host` is the build instance's.
    let connect = machine::connect_options(b, &plan.base.ssh_user, &keys, &launched, None)?;
    let mut checks = boot_checks::checks(identity);
    let own = checks.len();
    checks.extend(plan.test.iter().cloned().map(|mut s| {
        s.number = s.number.saturating_add(own);
        s
    }));
    let instance = launched.id.clone();
    let broker = b.broker_pid.clone();
    let mut ex = Executor::connect(
        connect,
        instance.clone(),
        plan.secrets(),
        &mut b.progress,
        broker,
    )
    .await
    .map_err(|e| Error::TestUnreachable {
        image: image.id.clone(),
        instance: instance.clone(),
        source: Box::new(e),
    })?;
    let ran = ex.run_checks(&checks).await;
    ex.close().await;
    let (report, failures) = ran?;
    let at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let verdict = if failures.is_empty() {
        Verdict::Passed { at }
    } else {
        Verdict::Failed {
            at,
            checks: checks.len(),
            failures,
        }
    };
    b.progress
        .test_summary(&image.id, &report.rows, report.elapsed, verdict.passed());
    if verdict.passed() || b.opts.on_error == OnError::Cleanup {
        b.ledger
            .undo_now(
                &b.aws,
                &b.progress,
                &[launched.entry, group.entry, keys.entry],
            )
            .await;
    }
    b.progress.info(
        "tested",
        &format!(
            "boot test of {} {} in {}",
            image.id,
            if verdict.passed() { "passed" } else { "FAILED" },
            fmt_duration(t0.elapsed())
        ),
    );
    Ok(verdict)
}

/// Writes the verdict on the image: [`tags::TESTED`] and [`tags::TESTED_AT`], and `extra`.
pub async fn record(
    b: &Bake,
    image: &str,
    verdict: &Verdict,
    extra: &[(&str, &str)],
) -> Result<(), Error> {
    let mut t: Tags = vec![
        (tags::TESTED.to_string(), verdict.passed().to_string()),
        (tags::TESTED_AT.to_string(), verdict.at().to_string()),
    ];
    t.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    b.aws
        .ec2
        .create_tags(&[image.to_string()], &t)
        .await
        .map_err(Error::from)
}

/// The bake's test stage: the verdict on the new image, written on it. A failed image is kept,
/// complete and tagged `jbake:tested=false` (never rolled; `jbake prune` removes it), and the
/// build fails. Returns whether the image passed (always `true` when it returns).
pub async fn in_bake(
    b: &mut Bake,
    plan: &Plan,
    common: &Tags,
    imaged: &Imaged,
    identity: &BuildIdentity,
    network: (String, String),
) -> Result<bool, Error> {
    let root_device = b
        .aws
        .ec2
        .image(&imaged.id)
        .await?
        .and_then(|i| i.root_device);
    let subject = Subject::of(imaged, root_device);
    let verdict = boot_test(
        b,
        TestSpec {
            plan,
            image: &subject,
            identity,
            tags: common,
            network: Some(network),
        },
    )
    .await?;
    if verdict.passed() {
        record(b, &imaged.id, &verdict, &[]).await?;
        return Ok(true);
    }
    let kept = record(b, &imaged.id, &verdict, &[(tags::COMPLETE, "true")]).await;
    match verdict {
        Verdict::Passed { .. } => Ok(true),
        Verdict::Failed {
            checks, failures, ..
        } => {
            let kept = match kept {
                Ok(()) => {
                    b.ledger.keep(imaged.entry);
                    true
                }
                Err(e) => {
                    b.progress.warn(&format!(
                        "could not mark {} as failed ({e}): it is removed with the rest",
                        imaged.id
                    ));
                    false
                }
            };
            Err(Error::TestFailed {
                image: imaged.id.clone(),
                name: imaged.name.clone(),
                checks,
                failures: failures.iter().map(|f| f.to_string()).collect(),
                kept,
            })
        }
    }
}
