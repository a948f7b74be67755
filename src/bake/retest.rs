//! `jbake test IMAGE`: the boot test of an image that exists (baked before boot tests, with
//! `--skip-test`, or tested before and to be tested again), with the bake's guarantees: its own
//! run id (`YYYYMMDD-HHMMSS-xxxxxx`, on everything it makes as `jbake:build-id`), the ledger, the
//! cleanup on every exit, `jbake gc` for a SIGKILL. The verdict goes on the image
//! (`jbake:tested`, `jbake:tested-at`): an image that passed before and fails now is marked
//! failed, and `jbake roll` refuses it from then on.
//!
//! Which checks: the recipe the image was baked from (`jbake:recipe`: the built-in one by that
//! name, or `--recipe FILE`), with the variables the image's tags give back
//! ([`crate::recipe::tag_variables`]) under `--var-file` and `--var`. The content hash says
//! whether these are the image's own inputs; if not, jbake warns and tests with what it was given.

use std::time::Duration;

use crate::aws::ec2::{self, ImageInfo, Tags};
use crate::aws::Aws;
use crate::progress::Progress;
use crate::recipe::{self, Plan};

use super::boot_checks::BuildIdentity;
use super::cleanup::{self, Leftovers};
use super::interrupt::Interrupt;
use super::ledger::Ledger;
use super::stages::boot_test::{self, Subject, TestSpec, Verdict};
use super::stages::{Bake, Stage, Stop};
use super::{build_id, hash, load_for_hash, public_ip, tags, BakeOptions, Error, OnError, MAX_TTL};

/// Why an image cannot be boot-tested (before anything is made).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("AMI {id} does not exist in {region} (or this account cannot see it): check the id and --region")]
    NoSuchImage { id: String, region: String },
    #[error("{id} ({name}) was not baked by jbake (it has no {tag} tag): jbake tests only its own images")]
    NotJbake {
        id: String,
        name: String,
        tag: &'static str,
    },
    #[error("{id} ({name}) is {state}, not available")]
    NotAvailable {
        id: String,
        name: String,
        state: String,
    },
    #[error("{id} ({name}) is an unfinished build ({tag}=false): `jbake gc` removes it once its build is over")]
    Unfinished {
        id: String,
        name: String,
        tag: &'static str,
    },
    #[error("{id} ({name}) was baked from the {baked} recipe, not {given}: pass the recipe it was baked from")]
    OtherRecipe {
        id: String,
        name: String,
        baked: String,
        given: String,
    },
}

/// Whether `image` can be boot-tested: jbake's (tagged with its recipe and build), finished,
/// available. Pure.
pub fn check_image(image: &ImageInfo) -> Result<&str, Refusal> {
    let recipe = image.tag(tags::RECIPE);
    let (Some(recipe), Some(_)) = (recipe, image.tag(tags::BUILD_ID)) else {
        return Err(Refusal::NotJbake {
            id: image.id.clone(),
            name: image.name.clone(),
            tag: if recipe.is_none() {
                tags::RECIPE
            } else {
                tags::BUILD_ID
            },
        });
    };
    if !ec2::image_available(&image.state) {
        return Err(Refusal::NotAvailable {
            id: image.id.clone(),
            name: image.name.clone(),
            state: image.state.clone(),
        });
    }
    if image.tag(tags::COMPLETE) == Some("false") {
        return Err(Refusal::Unfinished {
            id: image.id.clone(),
            name: image.name.clone(),
            tag: tags::COMPLETE,
        });
    }
    Ok(recipe)
}

/// The recipe's variables the image's tags give back: `(variable, value)`. Pure.
pub fn image_vars(tag_variables: &[(String, String)], image: &ImageInfo) -> Vec<(String, String)> {
    tag_variables
        .iter()
        .filter_map(|(key, var)| image.tag(key).map(|v| (var.clone(), v.to_string())))
        .collect()
}

/// The verdict of a test run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Tested {
    pub ami_id: String,
    pub name: String,
    pub recipe: String,
    pub passed: bool,
    /// When (RFC 3339), as `jbake:tested-at` says.
    pub tested_at: String,
    /// The test run's id (`jbake:build-id` of what it made).
    pub run_id: String,
}

/// How a test run ended.
#[derive(Debug)]
pub enum TestOutcome {
    /// The image passed its boot test.
    Passed(Tested),
    /// Refused before anything was made.
    Rejected(Error),
    /// A failed boot test ([`Error::TestFailed`]), or no verdict (an error).
    Failed(Error),
    Interrupted(String),
    Panicked(String),
}

/// What one test run did.
#[derive(Debug)]
pub struct TestReport {
    pub run_id: String,
    pub outcome: TestOutcome,
    pub left: Leftovers,
}

/// Offline: the recipe with its variables, and the options. The recipe must be the image's.
pub fn preflight(opts: &BakeOptions, image: &ImageInfo) -> Result<Plan, Error> {
    let plan = load_for_hash(opts, None)?;
    if opts.ttl < Duration::from_secs(60) || opts.ttl > MAX_TTL {
        return Err(Error::Option {
            flag: "--ttl",
            value: recipe::format_duration(opts.ttl),
            why: "the test instance's watchdog needs 1m to 7 days (it shuts the instance down after it)",
        });
    }
    let baked = image.tag(tags::RECIPE).unwrap_or_default();
    if plan.name != baked {
        return Err(Error::Retest(Refusal::OtherRecipe {
            id: image.id.clone(),
            name: image.name.clone(),
            baked: baked.to_string(),
            given: plan.name.clone(),
        }));
    }
    if opts.ssh_cidr.is_none() && opts.ssh_interface == super::SshInterface::Public {
        public_ip::url()?;
    }
    Ok(plan)
}

/// The boot test of `image` (checked by [`check_image`]), its cleanup included; the verdict
/// goes on the image. `opts.recipe` is the image's recipe; `opts.load.image_vars` what its tags
/// give back. Safe to run several at once.
pub async fn test_image(
    opts: BakeOptions,
    image: ImageInfo,
    aws: Aws,
    interrupt: Interrupt,
) -> TestReport {
    let run_id = build_id();
    let plan = match preflight(&opts, &image) {
        Ok(p) => p,
        Err(e) => {
            return TestReport {
                run_id,
                outcome: TestOutcome::Rejected(e),
                left: Leftovers::default(),
            }
        }
    };
    let progress = Progress::new(opts.output, opts.quiet, plan.secrets());
    progress.info(
        "test",
        &format!(
            "boot test {run_id} of {} ({}) in {}",
            image.id, image.name, opts.aws.region
        ),
    );
    same_inputs(&opts, &image, &progress);
    let ledger = Ledger::new(&run_id);
    let b = Bake::new(
        opts.clone(),
        aws.clone(),
        ledger.clone(),
        run_id.clone(),
        progress,
        interrupt.clone(),
    );
    let task = tokio::spawn(run(b, plan, image));
    let (progress, outcome) = match task.await {
        Ok((progress, Ok(t))) => (progress, TestOutcome::Passed(t)),
        Ok((progress, Err(Stop::Failed(e)))) => (progress, TestOutcome::Failed(e)),
        Ok((progress, Err(Stop::Interrupted(why)))) => (progress, TestOutcome::Interrupted(why)),
        Err(e) => {
            let progress = Progress::new(opts.output, opts.quiet, Vec::new());
            let what = super::panic_message(e);
            progress.warn(&format!(
                "the test stopped on an internal error ({what}); removing what it made"
            ));
            (progress, TestOutcome::Panicked(what))
        }
    };
    let passed = matches!(outcome, TestOutcome::Passed(_));
    let left = if !passed && opts.on_error == OnError::Abort {
        cleanup::abandon(&ledger, &opts.aws.region, &progress)
    } else {
        let seen = interrupt.count();
        cleanup::run(&aws, &ledger, &progress, interrupt, seen).await
    };
    TestReport {
        run_id,
        outcome,
        left,
    }
}

/// Warns when the recipe and variables given do not hash to the image's content hash.
fn same_inputs(opts: &BakeOptions, image: &ImageInfo, progress: &Progress) {
    let (Some(want), Some(base)) = (image.tag(tags::CONTENT_HASH), image.tag(tags::BASE_AMI))
    else {
        return;
    };
    let got = load_for_hash(opts, Some(base.to_string()))
        .ok()
        .and_then(|p| hash::content_hash(&p, base).ok());
    if got.as_deref() != Some(want) {
        progress.warn(&format!(
            "the recipe and variables given are not the ones {} was baked from (its content hash is {}, theirs {}): the checks run as given; pass the build's --var and --var-file (or its --recipe) to test what it was baked with",
            image.id,
            want.get(..12).unwrap_or(want),
            got.as_deref().and_then(|g| g.get(..12)).unwrap_or("unknown")
        ));
    }
}

async fn run(mut b: Bake, plan: Plan, image: ImageInfo) -> (Progress, Result<Tested, Stop>) {
    let mut interrupt = b.interrupt.clone();
    let seen = interrupt.count();
    let r = tokio::select! {
        r = test(&mut b, &plan, &image) => r.map_err(Stop::Failed),
        why = interrupt.after(seen) => {
            b.progress.abandon_step();
            b.progress.warn(&format!("interrupted {why}: stopping the test and removing what it made"));
            Err(Stop::Interrupted(why))
        }
    };
    (b.progress, r)
}

async fn test(b: &mut Bake, plan: &Plan, image: &ImageInfo) -> Result<Tested, Error> {
    b.entered.push(Stage::Test);
    let expires = b
        .started_at
        .checked_add(b.opts.ttl)
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| b.started.clone());
    let common: Tags = vec![
        (tags::BUILD_ID.into(), b.build_id.clone()),
        (tags::RECIPE.into(), plan.name.clone()),
        (tags::CREATED_AT.into(), b.started.clone()),
        (tags::EXPIRES_AT.into(), expires),
    ];
    let subject = Subject {
        id: image.id.clone(),
        name: image.name.clone(),
        root_device: image.root_device.clone(),
    };
    let verdict = boot_test::boot_test(
        b,
        TestSpec {
            plan,
            image: &subject,
            identity: &BuildIdentity::of_image(image),
            tags: &common,
            network: None,
        },
    )
    .await?;
    boot_test::record(b, &image.id, &verdict, &[]).await?;
    match verdict {
        Verdict::Passed { at } => Ok(Tested {
            ami_id: image.id.clone(),
            name: image.name.clone(),
            recipe: plan.name.clone(),
            passed: true,
            tested_at: at,
            run_id: b.build_id.clone(),
        }),
        Verdict::Failed {
            checks, failures, ..
        } => Err(Error::TestFailed {
            image: image.id.clone(),
            name: image.name.clone(),
            checks,
            failures: failures.iter().map(|f| f.to_string()).collect(),
            kept: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(tags: &[(&str, &str)], state: &str) -> ImageInfo {
        ImageInfo {
            id: "ami-1".into(),
            name: "jenkins-controller-2026.11.30-1".into(),
            state: state.into(),
            creation_date: String::new(),
            root_device: Some("/dev/xvda".into()),
            snapshots: vec![],
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn only_finished_available_jbake_images_are_tested() {
        let own = [
            (tags::RECIPE, "jenkins-controller"),
            (tags::BUILD_ID, "20261130-010203-abcdef"),
            (tags::COMPLETE, "true"),
        ];
        assert_eq!(
            check_image(&image(&own, "available")).ok(),
            Some("jenkins-controller")
        );
        let e = check_image(&image(&own[..1], "available")).expect_err("refused");
        assert!(e.to_string().contains("has no jbake:build-id tag"), "{e}");
        let e = check_image(&image(&[], "available")).expect_err("refused");
        assert!(e.to_string().contains("not baked by jbake"), "{e}");
        let e = check_image(&image(&own, "pending")).expect_err("refused");
        assert!(e.to_string().contains("is pending"), "{e}");
        let half = [own[0], own[1], (tags::COMPLETE, "false")];
        let e = check_image(&image(&half, "available")).expect_err("refused");
        assert!(e.to_string().contains("unfinished build"), "{e}");
    }

    #[test]
    fn the_image_s_tags_give_its_variables_back() {
        let i = image(
            &[("jbake:efs-id", "fs-0123456789abcdef0"), ("Team", "ci")],
            "available",
        );
        let mapping = vec![
            ("jbake:efs-id".to_string(), "efs_id".to_string()),
            ("jbake:efs-path".to_string(), "efs_path".to_string()),
        ];
        assert_eq!(
            image_vars(&mapping, &i),
            vec![("efs_id".to_string(), "fs-0123456789abcdef0".to_string())]
        );
    }
}
