//! The refusals that need no AWS call once the images are known (pure, unit-tested): a boot test
//! passed, the same EFS proven by the images' tags, the JENKINS_HOME lease on both sides of a
//! handover, no first-installation image on a roll.

use crate::aws::ec2::ImageInfo;
use crate::bake::tags;

use super::error::{EfsRef, Refusal};
use super::Strategy;

/// The EFS file system an image was baked for.
pub const EFS_ID_TAG: &str = "jbake:efs-id";
/// The EFS folder mounted as JENKINS_HOME.
pub const EFS_PATH_TAG: &str = "jbake:efs-path";
/// `1`: the image's controller starts Jenkins only while it holds the JENKINS_HOME lease.
pub const LEASE_TAG: &str = "jbake:home-lease";
/// `true`: the image initialises an empty JENKINS_HOME (a first installation).
pub const HOME_INIT_TAG: &str = "jbake:home-init";

fn efs_of(i: &ImageInfo, which: &'static str) -> Result<EfsRef, Refusal> {
    let missing = |tag| Refusal::EfsUnknown {
        ami: i.id.clone(),
        which,
        missing: tag,
    };
    Ok(EfsRef {
        id: i
            .tag(EFS_ID_TAG)
            .ok_or_else(|| missing(EFS_ID_TAG))?
            .to_string(),
        path: i
            .tag(EFS_PATH_TAG)
            .ok_or_else(|| missing(EFS_PATH_TAG))?
            .to_string(),
    })
}

/// What the boot test said about an image (`jbake:tested`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestState {
    Passed,
    Failed,
    /// No verdict (`--skip-test`, or baked before boot tests).
    Untested,
}

pub fn test_state(i: &ImageInfo) -> TestState {
    match i.tag(tags::TESTED) {
        Some("true") => TestState::Passed,
        Some("false") => TestState::Failed,
        _ => TestState::Untested,
    }
}

/// Whether `new` may be rolled out as far as its boot test goes: it passed; or it was never
/// tested and `allow_untested`. An image that failed its test never is.
pub fn tested(new: &ImageInfo, allow_untested: bool, region: &str) -> Result<(), Refusal> {
    match test_state(new) {
        TestState::Passed => Ok(()),
        TestState::Failed => Err(Refusal::FailedTest {
            ami: new.id.clone(),
            name: new.name.clone(),
            tag: tags::TESTED,
            at: new.tag(tags::TESTED_AT).map(str::to_string),
        }),
        TestState::Untested if allow_untested => Ok(()),
        TestState::Untested => Err(Refusal::Untested {
            ami: new.id.clone(),
            name: new.name.clone(),
            tag: tags::TESTED,
            region: region.to_string(),
        }),
    }
}

/// Whether rolling from `running` (None: EC2 no longer describes it, `running_ami` its id) to
/// `new` can be made safe; the first reason it cannot.
pub fn images(
    strategy: Strategy,
    allow_efs_change: bool,
    running: Option<&ImageInfo>,
    running_ami: &str,
    new: &ImageInfo,
) -> Result<(), Refusal> {
    if new.tag(HOME_INIT_TAG) == Some("true") {
        return Err(Refusal::HomeInit {
            ami: new.id.clone(),
            name: new.name.clone(),
            tag: HOME_INIT_TAG,
        });
    }
    if !allow_efs_change {
        let Some(running) = running else {
            return Err(Refusal::EfsUnknown {
                ami: running_ami.to_string(),
                which: "the running controller's image, which EC2 no longer describes",
                missing: EFS_ID_TAG,
            });
        };
        let was = efs_of(running, "the running controller's image")?;
        let will = efs_of(new, "the new image")?;
        if was != will {
            return Err(Refusal::EfsDiffers {
                running_ami: running.id.clone(),
                running: Box::new(was),
                new_ami: new.id.clone(),
                new: Box::new(will),
            });
        }
    }
    if strategy == Strategy::Handover {
        let lease = |i: &ImageInfo| i.tag(LEASE_TAG) == Some("1");
        if !lease(new) {
            return Err(Refusal::NoLease {
                ami: new.id.clone(),
                name: new.name.clone(),
                which: "new",
                tag: LEASE_TAG,
            });
        }
        match running {
            Some(r) if lease(r) => {}
            Some(r) => {
                return Err(Refusal::NoLease {
                    ami: r.id.clone(),
                    name: r.name.clone(),
                    which: "running",
                    tag: LEASE_TAG,
                })
            }
            None => {
                return Err(Refusal::NoLease {
                    ami: running_ami.to_string(),
                    name: "(not found: deregistered?)".to_string(),
                    which: "running",
                    tag: LEASE_TAG,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, tags: &[(&str, &str)]) -> ImageInfo {
        ImageInfo {
            id: id.into(),
            name: format!("jenkins-controller-{id}"),
            state: "available".into(),
            creation_date: String::new(),
            root_device: None,
            snapshots: vec![],
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const GOOD: &[(&str, &str)] = &[
        (EFS_ID_TAG, "fs-1"),
        (EFS_PATH_TAG, "/"),
        (LEASE_TAG, "1"),
        (HOME_INIT_TAG, "false"),
    ];

    #[test]
    fn same_efs_with_the_lease_rolls_either_way() {
        let (a, b) = (image("ami-a", GOOD), image("ami-b", GOOD));
        assert!(images(Strategy::Handover, false, Some(&a), "ami-a", &b).is_ok());
        assert!(images(Strategy::Replace, false, Some(&a), "ami-a", &b).is_ok());
    }

    #[test]
    fn another_efs_is_refused_naming_both_unless_allowed() {
        let a = image("ami-a", GOOD);
        let b = image(
            "ami-b",
            &[(EFS_ID_TAG, "fs-2"), (EFS_PATH_TAG, "/"), (LEASE_TAG, "1")],
        );
        let e = images(Strategy::Handover, false, Some(&a), "ami-a", &b)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("ami-b was baked for EFS fs-2:/"), "{e}");
        assert!(e.contains("ami-a for EFS fs-1:/"), "{e}");
        assert!(e.contains("--allow-efs-change"), "{e}");
        assert!(images(Strategy::Handover, true, Some(&a), "ami-a", &b).is_ok());
        // The path counts too.
        let c = image(
            "ami-c",
            &[
                (EFS_ID_TAG, "fs-1"),
                (EFS_PATH_TAG, "/jenkins"),
                (LEASE_TAG, "1"),
            ],
        );
        assert!(images(Strategy::Handover, false, Some(&a), "ami-a", &c).is_err());
    }

    #[test]
    fn an_image_without_efs_tags_cannot_prove_it() {
        let old = image("ami-old", &[(LEASE_TAG, "1")]);
        let b = image("ami-b", GOOD);
        let e = images(Strategy::Replace, false, Some(&old), "ami-old", &b)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("cannot prove that ami-old"), "{e}");
        assert!(e.contains("jbake:efs-id"), "{e}");
        let e = images(Strategy::Replace, false, None, "ami-gone", &b)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("ami-gone"), "{e}");
    }

    #[test]
    fn a_handover_needs_the_lease_on_both_sides() {
        let with = image("ami-a", GOOD);
        let without = image("ami-b", &[(EFS_ID_TAG, "fs-1"), (EFS_PATH_TAG, "/")]);
        let e = images(Strategy::Handover, false, Some(&with), "ami-a", &without)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("ami-b"), "{e}");
        assert!(e.contains("the new controller's image"), "{e}");
        assert!(e.contains("--strategy replace"), "{e}");
        let e = images(Strategy::Handover, false, Some(&without), "ami-b", &with)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("the running controller's image"), "{e}");
        // The first roll to a lease image: replace.
        assert!(images(Strategy::Replace, false, Some(&without), "ami-b", &with).is_ok());
    }

    #[test]
    fn only_a_tested_image_rolls_and_never_a_failed_one() {
        let mut passed = image("ami-p", GOOD);
        passed.tags.push((tags::TESTED.into(), "true".into()));
        assert!(tested(&passed, false, "eu-west-1").is_ok());
        let untested = image("ami-u", GOOD);
        let e = tested(&untested, false, "eu-west-1")
            .expect_err("refused")
            .to_string();
        assert!(e.contains("ami-u"), "{e}");
        assert!(e.contains("jbake test ami-u --region eu-west-1"), "{e}");
        assert!(e.contains("--allow-untested"), "{e}");
        assert!(tested(&untested, true, "eu-west-1").is_ok());
        let mut failed = image("ami-f", GOOD);
        failed.tags.push((tags::TESTED.into(), "false".into()));
        failed
            .tags
            .push((tags::TESTED_AT.into(), "2026-11-30T03:00:00Z".into()));
        for allow in [false, true] {
            let e = tested(&failed, allow, "eu-west-1")
                .expect_err("refused")
                .to_string();
            assert!(e.contains("failed its boot test"), "{e}");
            assert!(e.contains("at 2026-11-30T03:00:00Z"), "{e}");
        }
        // A value jbake never writes is no verdict.
        let mut odd = image("ami-o", GOOD);
        odd.tags.push((tags::TESTED.into(), "yes".into()));
        assert_eq!(test_state(&odd), TestState::Untested);
    }

    #[test]
    fn a_first_installation_image_is_never_rolled_out() {
        let a = image("ami-a", GOOD);
        let init = image(
            "ami-i",
            &[
                (EFS_ID_TAG, "fs-1"),
                (EFS_PATH_TAG, "/"),
                (LEASE_TAG, "1"),
                (HOME_INIT_TAG, "true"),
            ],
        );
        for strategy in [Strategy::Handover, Strategy::Replace] {
            let e = images(strategy, true, Some(&a), "ami-a", &init)
                .expect_err("refused")
                .to_string();
            assert!(e.contains("first-installation image"), "{e}");
        }
    }
}
