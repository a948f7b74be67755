//! Copy, share, publish (issue 14): `jbake copy IMAGE` against moto's image fixtures (no SSH:
//! the quick tier, nothing runs on any machine), and one whole `jbake build --copy-to …
//! --share-with … --publish-ssm` on an nspawn instance (a build that succeeds runs the image
//! hygiene: never on this machine).
//!
//! moto serves every region from one endpoint (the region is in each request's SigV4 scope),
//! copies images across them (the harness teaches it the client token, the tags, the encryption
//! and the snapshot description of a real CopyImage: tests/support/moto_server.py), and the fault
//! proxy fails calls in one region, keeps copies `pending`, loses answers. After every test every
//! region involved is listed: instances, key pairs, security groups, images and snapshots.

use std::collections::BTreeMap;
use std::process::Command;

use crate::build::{finish, follow, spawn, wait_for_line};
use crate::support::bake::BASE_PARAM;
use crate::support::cli::{jbake, run as run_args, write, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto, Resources};
use crate::support::prereq;
use crate::support::sshd;

const HOME: &str = "us-east-1";
const WEST: &str = "us-west-2";
const EU: &str = "eu-west-1";
const OTHER: &str = "111122223333";
const RECIPE: &str = "jenkins-agent";
const PARAM: &str = "/jbake/jenkins-agent/latest";
/// A build id as jbake makes them (gc checks the form).
const SOURCE_BUILD: &str = "20261130-010203-a1b2c3";

/// moto with a fault proxy in front, customer managed keys `alias/jbake-images` in the three
/// regions (the home region's is its default EBS key), and a finished, tested jbake image
/// encrypted with it.
struct Fixture {
    moto: Moto,
    proxy: FaultProxy,
    image: String,
    image_snapshot: String,
    /// The key ARN of each region.
    keys: BTreeMap<String, String>,
}

fn fixture() -> Option<Fixture> {
    if !prereq::moto() {
        return None;
    }
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    let mut keys = BTreeMap::new();
    for r in [HOME, WEST, EU] {
        keys.insert(r.to_string(), moto.kms_key(r, "alias/jbake-images"));
    }
    moto.set_ebs_default_key(HOME, "alias/jbake-images");
    let (image, image_snapshot) = jbake_image(&moto, "2026.11.30-1", &[("jbake:tested", "true")]);
    Some(Fixture {
        moto,
        proxy,
        image,
        image_snapshot,
        keys,
    })
}

/// A finished jbake image of [`RECIPE`] in [`HOME`], encrypted with the region's default key.
fn jbake_image(moto: &Moto, version: &str, extra: &[(&str, &str)]) -> (String, String) {
    let name = format!("{RECIPE}-{version}");
    let mut tags = vec![
        ("jbake:recipe", RECIPE),
        ("jbake:build-id", SOURCE_BUILD),
        ("jbake:version", version),
        ("jbake:complete", "true"),
        ("jbake:content-hash", "0123abcd"),
        ("jbake:expires-at", "2026-11-30T03:00:00Z"),
        ("Name", name.as_str()),
        ("team", "ci"),
    ];
    tags.extend_from_slice(extra);
    moto.image_fixture_in(HOME, &name, &tags, Some(None))
}

impl Fixture {
    /// `jbake copy IMAGE --region us-east-1 ARGS`, through the proxy, JSON events.
    fn copy(&self, image: &str, args: &[&str]) -> Command {
        let mut c = jbake();
        self.moto.apply_env(&mut c);
        c.args(["copy", image, "--region", HOME])
            .args(["--endpoint-url", &self.proxy.endpoint(), "--output", "json"])
            .args(args);
        c
    }

    fn run(&self, image: &str, args: &[&str]) -> Run {
        Run::from_output(self.copy(image, args).output().expect("run jbake copy"))
    }

    fn gc(&self, args: &[&str]) -> Run {
        let mut c = jbake();
        self.moto.apply_env(&mut c);
        c.args([
            "gc",
            "--region",
            HOME,
            "--endpoint-url",
            &self.proxy.endpoint(),
        ])
        .args(args);
        Run::from_output(c.output().expect("run jbake gc"))
    }
}

/// The run id a `jbake copy` announced.
fn run_id(run: &Run) -> String {
    run.events()
        .iter()
        .find(|e| e["event"] == "copy")
        .and_then(|e| e["message"].as_str())
        .and_then(|m| m.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no copy event in {}", run.stdout))
        .to_string()
}

fn result(run: &Run) -> serde_json::Value {
    run.events()
        .into_iter()
        .find(|e| e["event"] == "copy_finished")
        .unwrap_or_else(|| panic!("no copy_finished in {}", run.stdout))["result"]
        .clone()
}

/// In every region: nothing temporary (no instance alive, no key pair or security group, no
/// image that is not complete, no snapshot no complete image uses), and nothing at all of the
/// failed run `failed` (its copies and their snapshots).
#[track_caller]
fn assert_clean(moto: &Moto, failed: Option<&str>) -> Vec<(String, Resources)> {
    let all = moto.resources_in(&[HOME, WEST, EU]);
    for (region, res) in &all {
        let left = res.leftovers_of(None);
        assert!(left.is_empty(), "{region}: left {left:?}");
        assert!(
            res.live_instances().is_empty(),
            "{region}: {:?}",
            res.instances
        );
        if let Some(id) = failed {
            let of_run = res.tagged_with_build(id);
            assert!(of_run.is_empty(), "{region}: run {id} left {of_run:?}");
        }
    }
    all
}

fn copies_of<'a>(res: &'a Resources, source: &str) -> Vec<&'a crate::support::moto::ImageInfo> {
    res.images
        .iter()
        .filter(|i| {
            i.tags.get("jbake:copy-of").map(String::as_str) == Some(source)
                && i.state.as_deref() != Some("deregistered")
        })
        .collect()
}

#[test]
fn copies_in_two_regions_are_tagged_encrypted_shared_and_published() {
    let Some(f) = fixture() else { return };
    // EC2 as it is: a copy is pending for a while, new things are NotFound at first, throttling.
    f.proxy.world(
        r#"{"copy_pending_s": 3, "not_found": 2, "hide_s": 1, "throttle_every": 9, "throttle_burst": 2, "seed": 14}"#,
    );
    f.moto.start_recording();
    let t = std::time::Instant::now();
    let out = f.run(
        &f.image,
        &[
            "--to",
            &format!("{WEST},{EU}"),
            "--kms-key-id",
            "alias/jbake-images",
            "--share-with",
            OTHER,
            "--publish-ssm",
        ],
    );
    f.moto.stop_recording();
    eprintln!("jbake copy to two regions: {:?}", t.elapsed());
    out.assert_code(0);
    let run = run_id(&out);
    let r = result(&out);
    assert_eq!(r["regions"][HOME], f.image.as_str(), "{r}");
    assert_eq!(r["shared_with"], serde_json::json!([OTHER]));
    let source_tags = f
        .moto
        .resources(HOME)
        .images
        .into_iter()
        .find(|i| i.id == f.image)
        .expect("the source")
        .tags;
    for region in [WEST, EU] {
        let res = f.moto.resources(region);
        let copies = copies_of(&res, &f.image);
        assert_eq!(copies.len(), 1, "{region}: {copies:?}");
        let copy = copies[0];
        assert_eq!(r["regions"][region], copy.id.as_str(), "{r}");
        assert_eq!(
            copy.name.as_deref(),
            Some(&*format!("{RECIPE}-2026.11.30-1"))
        );
        assert_eq!(copy.state.as_deref(), Some("available"));
        assert_eq!(copy.imds_support.as_deref(), Some("v2.0"), "{copy:?}");
        // The source's tags (jbake writes them: EC2 copies none), whose and what it is.
        for (k, v) in &source_tags {
            let want = match k.as_str() {
                "jbake:build-id" => run.clone(),
                "jbake:expires-at" | "jbake:created-at" => continue,
                _ => v.clone(),
            };
            assert_eq!(copy.tags.get(k), Some(&want), "{region} {k}: {copy:?}");
        }
        assert_eq!(
            copy.tags.get("jbake:source-region").map(String::as_str),
            Some(HOME)
        );
        assert_eq!(
            copy.tags.get("jbake:complete").map(String::as_str),
            Some("true")
        );
        // Its snapshots: the same tags (but jbake:complete), encrypted with the region's key.
        assert!(!copy.snapshot_ids.is_empty());
        for id in &copy.snapshot_ids {
            let s = res
                .snapshots
                .iter()
                .find(|s| &s.id == id)
                .expect("snapshot");
            assert_eq!(s.tags.get("jbake:copy-of"), Some(&f.image), "{s:?}");
            assert_eq!(
                s.tags.get("jbake:version").map(String::as_str),
                Some("2026.11.30-1")
            );
            assert_eq!(s.tags.get("jbake:build-id"), Some(&run));
            assert!(!s.tags.contains_key("jbake:complete"), "{s:?}");
            assert!(s.encrypted, "{s:?}");
            assert_eq!(s.kms_key_id.as_ref(), Some(&f.keys[region]), "{s:?}");
            assert!(
                s.description.as_deref().is_some_and(
                    |d| d.starts_with(&format!("Copied for DestinationAmi {}", copy.id))
                ),
                "{s:?}"
            );
        }
        // Shared, and published in its region.
        assert_eq!(f.moto.launch_permissions(region, &copy.id), [OTHER]);
        let p = f.moto.parameter(region, PARAM).expect("published");
        assert_eq!(p.value, copy.id);
        assert_eq!(p.data_type.as_deref(), Some("aws:ec2:image"));
    }
    assert_eq!(f.moto.launch_permissions(HOME, &f.image), [OTHER]);
    assert_eq!(
        f.moto.parameter(HOME, PARAM).map(|p| p.value),
        Some(f.image.clone())
    );
    // What the accounts shared with need on the keys is said.
    assert!(
        out.stdout.contains("kms:CreateGrant") && out.stdout.contains(&f.keys[WEST]),
        "{}",
        out.stdout
    );
    // CopyImage as EC2 wants it: encrypted, with the key, an idempotency token, tagged at
    // creation (image and snapshot); once per region.
    let requests = f.moto.recorded_requests();
    let copy_calls: Vec<_> = requests
        .iter()
        .filter(|r| r.action == "CopyImage")
        .collect();
    assert_eq!(copy_calls.len(), 2, "{copy_calls:?}");
    for c in &copy_calls {
        let p = |k: &str| c.params.get(k).map(String::as_str);
        assert_eq!(p("Encrypted"), Some("true"), "{c:?}");
        assert_eq!(p("KmsKeyId"), Some("alias/jbake-images"));
        assert_eq!(p("SourceRegion"), Some(HOME));
        assert!(p("ClientToken").is_some_and(|t| t.starts_with(&format!("jbake-{run}-"))));
        let kinds: Vec<&str> = (1..=2)
            .filter_map(|n| p(&format!("TagSpecification.{n}.ResourceType")))
            .collect();
        assert_eq!(kinds, ["image", "snapshot"], "{c:?}");
    }
    let stats = f.proxy.world_stats();
    assert!(
        stats.get("image_pending").copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    assert_clean(&f.moto, None);

    // Again, as a nightly would: the copies exist, the parameters name them: nothing is made.
    f.moto.start_recording();
    let again = f.run(
        &f.image,
        &[
            "--to",
            &format!("{WEST},{EU}"),
            "--kms-key-id",
            "alias/jbake-images",
            "--share-with",
            OTHER,
            "--publish-ssm",
        ],
    );
    f.moto.stop_recording();
    again.assert_code(0);
    let actions = f.moto.recorded_actions();
    for made in ["CopyImage", "PutParameter"] {
        assert!(!actions.iter().any(|a| a == made), "{made} in {actions:?}");
    }
    assert_eq!(result(&again)["regions"], r["regions"]);
    for region in [WEST, EU] {
        assert_eq!(copies_of(&f.moto.resources(region), &f.image).len(), 1);
    }
    assert_clean(&f.moto, None);
}

#[test]
fn a_fault_in_the_second_region_leaves_no_half_copy() {
    let Some(f) = fixture() else { return };
    f.proxy.world(r#"{"copy_pending_s": 4}"#);
    // CopyImage is refused in eu-west-1 while us-west-2's copy is on its way.
    f.proxy.set(&format!(
        r#"[{{"action": "CopyImage", "region": "{EU}", "delay_ms": 1500, "status": 400, "code": "UnauthorizedOperation", "message": "injected: no CopyImage in {EU}"}}]"#
    ));
    let out = f.run(&f.image, &["--to", &format!("{WEST},{EU}")]);
    out.assert_code(1);
    let run = run_id(&out);
    assert!(
        out.stderr
            .contains(&format!("injected: no CopyImage in {EU}"))
            && out.stderr.contains(&format!("copy run {run} failed"))
            && out.stderr.contains("ec2:CopyImage"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("removing copy ami-"), "{}", out.stdout);
    let all = assert_clean(&f.moto, Some(&run));
    for (region, res) in &all {
        assert!(copies_of(res, &f.image).is_empty(), "{region}");
    }
    // The source is untouched.
    let home = &all[0].1;
    let source = home
        .images
        .iter()
        .find(|i| i.id == f.image)
        .expect("source");
    assert_eq!(source.state.as_deref(), Some("available"));
    assert!(home.snapshots.iter().any(|s| s.id == f.image_snapshot));

    // The copy is made there and becomes available, then EC2 refuses to make it IMDSv2-only:
    // both copies are removed, with their snapshots.
    f.proxy.set(&format!(
        r#"[{{"action": "ModifyImageAttribute", "region": "{EU}", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no ModifyImageAttribute in {EU}"}}]"#
    ));
    let out = f.run(&f.image, &["--to", &format!("{WEST},{EU}")]);
    out.assert_code(1);
    let run = run_id(&out);
    assert!(
        out.stderr.contains("injected: no ModifyImageAttribute"),
        "{}",
        out.stderr
    );
    let removed = out.stdout.matches("removing copy ami-").count();
    assert_eq!(removed, 2, "{}", out.stdout);
    for (region, res) in &assert_clean(&f.moto, Some(&run)) {
        assert!(copies_of(res, &f.image).is_empty(), "{region}");
    }
}

#[test]
fn an_interrupted_copy_leaves_nothing_and_a_killed_one_is_left_to_gc() {
    let Some(f) = fixture() else { return };
    // Minutes on AWS; here long enough to be interrupted while EC2 copies.
    f.proxy.world(r#"{"copy_pending_s": 60}"#);
    for signal in ["INT", "TERM"] {
        let mut child = spawn(f.copy(&f.image, &["--to", &format!("{WEST},{EU}")]));
        let (lines, run) = follow(&mut child);
        wait_for_line(&lines, "to be available: pending");
        sshd::kill(&[child.id()], signal);
        let out = finish(child, lines);
        out.assert_code(130);
        assert!(
            out.stderr.contains(&format!(
                "interrupted (SIG{signal}) (copy run {run}); what it made was removed"
            )),
            "{}",
            out.stderr
        );
        for (region, res) in &assert_clean(&f.moto, Some(&run)) {
            assert!(copies_of(res, &f.image).is_empty(), "{region}: {signal}");
        }
    }

    // SIGKILL: nothing is removed; gc leaves a copy EC2 is still making, then removes it. The
    // image names where its copies go (a build's image does: jbake:copy-regions), so gc of the
    // home region looks there without being told.
    f.proxy.world(r#"{"copy_pending_s": 4}"#);
    let (tagged, _) = jbake_image(
        &f.moto,
        "2026.11.30-2",
        &[("jbake:tested", "true"), ("jbake:copy-regions", WEST)],
    );
    let mut child = spawn(f.copy(&tagged, &["--to", WEST]));
    let (lines, run) = follow(&mut child);
    wait_for_line(&lines, "to be available: pending");
    sshd::kill(&[child.id()], "KILL");
    let _ = finish(child, lines);
    let west = f.moto.resources(WEST);
    assert_eq!(copies_of(&west, &tagged).len(), 1, "the half-made copy");
    let gc = f.gc(&["--older-than", "0s"]);
    gc.assert_code(0);
    assert!(
        gc.stderr.contains(&format!("also looking in {WEST}")),
        "{}",
        gc.stderr
    );
    assert!(gc.stderr.contains("still pending"), "{}", gc.stderr);
    assert_eq!(
        copies_of(&f.moto.resources(WEST), &tagged).len(),
        1,
        "spared"
    );
    std::thread::sleep(std::time::Duration::from_secs(4));
    let gc = f.gc(&["--older-than", "0s"]);
    gc.assert_code(0);
    assert!(gc.stderr.contains("removing image ami-"), "{}", gc.stderr);
    for (region, res) in &assert_clean(&f.moto, Some(&run)) {
        assert!(copies_of(res, &tagged).is_empty(), "{region}");
    }
}

#[test]
fn a_lost_copy_answer_is_adopted_not_duplicated() {
    let Some(f) = fixture() else { return };
    f.proxy
        .world(r#"{"lose_once": ["CopyImage"], "lose_how": ["drop"], "copy_pending_s": 1}"#);
    f.moto.start_recording();
    let out = f.run(&f.image, &["--to", WEST]);
    f.moto.stop_recording();
    out.assert_code(0);
    let calls = f
        .moto
        .recorded_actions()
        .into_iter()
        .filter(|a| a == "CopyImage")
        .count();
    assert!(calls >= 2, "the lost answer was not retried: {calls}");
    let copies = copies_of(&f.moto.resources(WEST), &f.image).len();
    assert_eq!(copies, 1, "one copy, whatever the retries");
    assert_eq!(f.proxy.world_stats().get("lost").copied(), Some(1));
    assert_clean(&f.moto, None);
}

#[test]
fn an_image_encrypted_with_aws_ebs_cannot_be_shared() {
    let Some(f) = fixture() else { return };
    // us-west-2's default EBS key is the AWS managed aws/ebs: a copy there could not be shared.
    f.moto.start_recording();
    let out = f.run(&f.image, &["--to", WEST, "--share-with", OTHER]);
    f.moto.stop_recording();
    out.assert_code(2);
    assert!(
        out.stderr.contains(&format!(
            "cannot share with {OTHER}: the image in {WEST} would be encrypted with the AWS managed key aws/ebs"
        )) && out.stderr.contains(&format!("--kms-key-id {WEST}=")),
        "{}",
        out.stderr
    );
    let writes: Vec<String> = f
        .moto
        .recorded_actions()
        .into_iter()
        .filter(|a| !a.starts_with("Describe") && !a.starts_with("Get"))
        .collect();
    assert!(writes.is_empty(), "refused, yet it wrote: {writes:?}");
    // An image of the home region encrypted with aws/ebs (built before the default changed).
    let (ebs, _) = {
        let name = format!("{RECIPE}-2026.11.29-1");
        f.moto.image_fixture_in(
            HOME,
            &name,
            &[
                ("jbake:recipe", RECIPE),
                ("jbake:build-id", SOURCE_BUILD),
                ("jbake:version", "2026.11.29-1"),
                ("jbake:complete", "true"),
            ],
            Some(Some("alias/aws/ebs")),
        )
    };
    let out = f.run(&ebs, &["--share-with", OTHER]);
    out.assert_code(2);
    assert!(
        out.stderr.contains(&format!(
            "the image in {HOME} would be encrypted with the AWS managed key aws/ebs"
        )),
        "{}",
        out.stderr
    );
    assert!(f.moto.launch_permissions(HOME, &ebs).is_empty());
    // A key KMS does not have there, before anything is made.
    let out = f.run(
        &f.image,
        &["--to", WEST, "--kms-key-id", &format!("{WEST}=alias/nope")],
    );
    out.assert_code(2);
    assert!(
        out.stderr.contains(&format!(
            "--kms-key-id alias/nope: KMS has no such key in {WEST}"
        )),
        "{}",
        out.stderr
    );
    // Named aws/ebs: refused offline, before any AWS call.
    f.moto.start_recording();
    let out = f.run(
        &f.image,
        &[
            "--to",
            WEST,
            "--kms-key-id",
            "alias/aws/ebs",
            "--share-with",
            OTHER,
        ],
    );
    f.moto.stop_recording();
    out.assert_code(2);
    assert!(f.moto.recorded_actions().is_empty());
    // With customer managed keys everywhere it is shared, and the accounts are told what they
    // need on which keys.
    let out = f.run(
        &f.image,
        &[
            "--to",
            WEST,
            "--kms-key-id",
            "alias/jbake-images",
            "--share-with",
            OTHER,
        ],
    );
    out.assert_code(0);
    assert_eq!(f.moto.launch_permissions(HOME, &f.image), [OTHER]);
    assert!(out.stdout.contains(&f.keys[HOME]), "{}", out.stdout);
    assert_clean(&f.moto, None);
}

#[test]
fn publish_never_puts_an_older_or_untested_image_and_is_put_back_on_failure() {
    let Some(f) = fixture() else { return };
    let (newer, _) = jbake_image(&f.moto, "2026.12.01-1", &[("jbake:tested", "true")]);
    let (untested, _) = jbake_image(&f.moto, "2026.12.02-1", &[]);
    // The newer image first: the parameter is created, data type aws:ec2:image.
    let out = f.run(&newer, &["--publish-ssm"]);
    out.assert_code(0);
    let p = f.moto.parameter(HOME, PARAM).expect("published");
    assert_eq!(
        (p.value.as_str(), p.data_type.as_deref()),
        (newer.as_str(), Some("aws:ec2:image"))
    );
    // The older one is refused: the parameter stays.
    let out = f.run(&f.image, &["--publish-ssm"]);
    out.assert_code(1);
    assert!(
        out.stderr
            .contains(&format!("not publishing {} in {PARAM} ({HOME})", f.image))
            && out.stderr.contains("newer than 2026.11.30-1"),
        "{}",
        out.stderr
    );
    assert_eq!(
        f.moto.parameter(HOME, PARAM).map(|p| p.value),
        Some(newer.clone())
    );
    // Untested: refused, unless --allow-untested.
    let out = f.run(&untested, &["--publish-ssm"]);
    out.assert_code(1);
    assert!(out.stderr.contains("--allow-untested"), "{}", out.stderr);
    assert_eq!(
        f.moto.parameter(HOME, PARAM).map(|p| p.value),
        Some(newer.clone())
    );
    // Something jbake did not put there is left alone.
    f.moto
        .put_parameter_in(HOME, "/team/jenkins-agent/latest", "golden");
    let out = f.run(&newer, &["--publish-ssm", "/team"]);
    out.assert_code(1);
    assert!(out.stderr.contains("not an image id"), "{}", out.stderr);

    // The run fails after publishing (the copy cannot be marked complete): the parameters are
    // put back, in both regions, and the copy removed.
    f.moto
        .put_parameter_in(WEST, PARAM, "ami-0000000000000dead");
    f.proxy.set(
        r#"[{"action": "CreateTags", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no CreateTags"}]"#,
    );
    let out = f.run(
        &untested,
        &[
            "--to",
            WEST,
            "--publish-ssm",
            "--allow-untested",
            "--kms-key-id",
            "alias/jbake-images",
        ],
    );
    out.assert_code(1);
    let run = run_id(&out);
    assert!(
        out.stderr.contains("injected: no CreateTags"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("removing SSM parameter"),
        "{}",
        out.stdout
    );
    assert_eq!(
        f.moto.parameter(HOME, PARAM).map(|p| p.value),
        Some(newer.clone()),
        "put back"
    );
    assert_eq!(
        f.moto.parameter(WEST, PARAM),
        None,
        "it named an image that does not exist: deleted"
    );
    assert_clean(&f.moto, Some(&run));
    f.proxy.set("[]");
    let out = f.run(&untested, &["--publish-ssm", "--allow-untested"]);
    out.assert_code(0);
    assert!(
        out.stdout.contains("published untested") || out.stdout.contains("not tested"),
        "{}",
        out.stdout
    );
    assert_eq!(
        f.moto.parameter(HOME, PARAM).map(|p| p.value),
        Some(untested)
    );
}

#[test]
fn prune_and_gc_know_copies_in_their_regions() {
    let Some(f) = fixture() else { return };
    let mut images = vec![f.image.clone()];
    for v in ["2026.12.01-1", "2026.12.02-1"] {
        images.push(jbake_image(&f.moto, v, &[("jbake:tested", "true")]).0);
    }
    for i in &images {
        f.run(i, &["--to", WEST, "--kms-key-id", "alias/jbake-images"])
            .assert_code(0);
    }
    let west = f.moto.resources(WEST);
    let copies: Vec<(String, Vec<String>)> = images
        .iter()
        .map(|i| {
            let c = copies_of(&west, i);
            assert_eq!(c.len(), 1);
            (c[0].id.clone(), c[0].snapshot_ids.clone())
        })
        .collect();
    let mut c = jbake();
    f.moto.apply_env(&mut c);
    c.args(["prune", "--region", HOME, "--regions", WEST, "--keep", "1"])
        .args(["--endpoint-url", &f.proxy.endpoint()]);
    let out = Run::from_output(c.output().expect("run jbake prune"));
    out.assert_code(0);
    assert_eq!(
        out.stdout
            .matches("pruned 2 image(s) of 3 jbake image(s)")
            .count(),
        2,
        "{}",
        out.stdout
    );
    let west = f.moto.resources(WEST);
    let live: Vec<&str> = west
        .images
        .iter()
        .filter(|i| i.state.as_deref() == Some("available"))
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(live, [copies[2].0.as_str()], "the newest copy stays");
    let snaps: Vec<&str> = west.snapshots.iter().map(|s| s.id.as_str()).collect();
    for (id, s) in &copies[..2] {
        for s in s {
            assert!(
                !snaps.contains(&s.as_str()),
                "snapshot {s} of pruned copy {id}"
            );
        }
    }
    assert!(copies[2].1.iter().all(|s| snaps.contains(&s.as_str())));
    // gc there: the finished copy is never touched.
    let gc = f.gc(&["--regions", WEST, "--older-than", "0s"]);
    gc.assert_code(0);
    assert!(gc.stderr.contains("nothing to remove"), "{}", gc.stderr);
    assert_clean(&f.moto, None);
}

#[test]
fn bad_distribution_flags_are_refused_before_any_aws_call() {
    // No endpoint answers: none of these may get that far.
    let image = "ami-0123456789abcdef0";
    for (args, says) in [
        (vec!["--to", HOME], "that is the image's own region"),
        (vec!["--to", "us-west-2,us-west-2"], "names us-west-2 twice"),
        (vec!["--to", "mars-1"], "is not an AWS region name"),
        (
            vec!["--share-with", "all"],
            "jbake never makes an image public",
        ),
        (vec!["--share-with", "1234"], "12 digits"),
        (vec!["--publish-ssm", "/aws/x"], "reserved by AWS"),
        (vec!["--publish-ssm", "jbake"], "not an SSM parameter path"),
        (
            vec!["--to", WEST, "--kms-key-id", "eu-west-1=alias/x"],
            "nor a --copy-to region",
        ),
        (
            vec!["--to", WEST, "--kms-key-id", &format!("{HOME}=alias/x")],
            "exists already",
        ),
        (
            vec!["--to", WEST, "--kms-key-id", "not a key"],
            "is not a KMS key",
        ),
        (
            vec![
                "--kms-key-id",
                "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "--to",
                EU,
            ],
            "nor a --copy-to region",
        ),
        (vec!["--allow-untested"], "--publish-ssm"),
        (vec![], "nothing to do"),
    ] {
        let r = run_args(
            &[
                &[
                    "copy",
                    image,
                    "--region",
                    HOME,
                    "--endpoint-url",
                    "http://127.0.0.1:9",
                ][..],
                &args[..],
            ]
            .concat(),
        );
        r.assert_code(2);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    let r = run_args(&["copy", "ami-x", "--region", HOME, "--to", WEST]);
    r.assert_code(2);
    // The build's flags are the same, checked before the build (nothing to connect to).
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = write(
        dir.path(),
        "r.yaml",
        &format!("version: 1\nname: r\nbase: {{ ssm_parameter: {BASE_PARAM}, ssh_user: admin }}\nsteps:\n  - name: x\n    run: 'true'\n"),
    );
    for (args, says) in [
        (vec!["--copy-to", HOME], "that is the image's own region"),
        (
            vec!["--kms-key-id", "alias/aws/ebs", "--share-with", OTHER],
            "AWS managed key aws/ebs",
        ),
    ] {
        let r = run_args(
            &[
                &[
                    "build",
                    &recipe.display().to_string(),
                    "--region",
                    HOME,
                    "--endpoint-url",
                    "http://127.0.0.1:9",
                    "--ssh-cidr",
                    "127.0.0.1/32",
                    "--manifest",
                    &dir.path().join("m.json").display().to_string(),
                ][..],
                &args[..],
            ]
            .concat(),
        );
        r.assert_code(2);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn a_build_that_could_not_share_is_refused_before_anything_is_launched() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = write(
        dir.path(),
        "r.yaml",
        &format!("version: 1\nname: r\nbase: {{ ssm_parameter: {BASE_PARAM}, ssh_user: admin }}\nsteps:\n  - name: x\n    run: 'true'\n"),
    );
    // The account's default EBS key is the AWS managed one: the build's image could not be
    // shared. Nothing to connect to: it must not get that far.
    moto.start_recording();
    let mut c = jbake();
    moto.apply_env(&mut c);
    c.args(["build", &recipe.display().to_string(), "--region", HOME])
        .args([
            "--endpoint-url",
            &moto.endpoint(),
            "--ssh-cidr",
            "127.0.0.1/32",
        ])
        .args([
            "--manifest",
            &dir.path().join("m.json").display().to_string(),
        ])
        .args(["--share-with", OTHER]);
    let out = Run::from_output(c.output().expect("run jbake build"));
    moto.stop_recording();
    out.assert_code(2);
    assert!(
        out.stderr.contains(&format!(
            "cannot share with {OTHER}: the image in {HOME} would be encrypted with the AWS managed key aws/ebs"
        )),
        "{}",
        out.stderr
    );
    let actions = moto.recorded_actions();
    assert!(
        actions
            .iter()
            .all(|a| a == "GetEbsDefaultKmsKeyId" || a.starts_with("Describe")),
        "{actions:?}"
    );
    assert!(actions.iter().any(|a| a == "GetEbsDefaultKmsKeyId"));
    assert!(moto.resources(HOME).leftovers_of(None).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Instance tier: a whole build, copied, shared and published, in EC2 as it is.

#[test]
fn a_build_is_copied_shared_and_published_and_the_manifest_lists_every_region() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    let mut keys = BTreeMap::new();
    for r in [HOME, WEST, EU] {
        keys.insert(r, moto.kms_key(r, "alias/jbake-images"));
    }
    let vm = Instance::builder("dist-build").up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("manifest.json");
    let recipe = crate::build::recipe(
        dir.path(),
        &vm.user,
        "steps:\n  - name: Mark the image\n    file: { path: /etc/jbake-built, content: \"{{ version }}\\n\" }\n",
    );
    // The build with its boot test: the test instance boots a machine of its own from the image.
    cloud.report_to(&proxy);
    let build = |extra: &[&str]| {
        let mut c = crate::build::tested_build_cmd(
            &moto,
            &proxy.endpoint(),
            &recipe,
            &vm.host,
            vm.port,
            &manifest,
        );
        c.args(extra);
        Run::from_output(c.output().expect("run jbake build"))
    };
    let flags = [
        "--copy-to",
        "us-west-2,eu-west-1",
        "--kms-key-id",
        "alias/jbake-images",
        "--share-with",
        OTHER,
        "--publish-ssm",
    ];
    proxy.world(
        r#"{"image_pending_s": 2, "copy_pending_s": 3, "not_found": 1, "seed": 5, "pending_until_ready": true, "pending_max_s": 60}"#,
    );
    let t = std::time::Instant::now();
    moto.start_recording();
    let out = build(&flags);
    moto.stop_recording();
    eprintln!("a build copied to two regions: {:?}", t.elapsed());
    out.assert_code(0);
    let id = crate::build::build_id_of(&out);
    let built = crate::build::finished(&out);
    let ami = built["ami_id"].as_str().expect("ami").to_string();
    // The stages ran in order: image, boot test, copy, share, publish, tag.
    let order: Vec<usize> = [
        "creating image",
        "boot test of ",
        "copying ",
        "sharing ",
        "publishing ",
    ]
    .iter()
    .map(|w| {
        out.stdout
            .find(w)
            .unwrap_or_else(|| panic!("no {w:?} in {}", out.stdout))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    // The image (its snapshot encrypted with the build's key) and its copies.
    let home = moto.resources(HOME);
    let image = home.images.iter().find(|i| i.id == ami).expect("the image");
    assert_eq!(
        image.tags.get("jbake:copy-regions").map(String::as_str),
        Some("us-west-2,eu-west-1")
    );
    for s in &image.snapshot_ids {
        let snap = home
            .snapshots
            .iter()
            .find(|x| &x.id == s)
            .expect("snapshot");
        assert_eq!(
            snap.kms_key_id.as_deref(),
            Some(keys[HOME].as_str()),
            "{snap:?}"
        );
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    let record = &m["builds"][0];
    assert_eq!(record["regions"][HOME], ami.as_str(), "{record}");
    for region in [WEST, EU] {
        let res = moto.resources(region);
        let copies = copies_of(&res, &ami);
        assert_eq!(copies.len(), 1, "{region}");
        let copy = copies[0];
        assert_eq!(copy.tags.get("jbake:build-id"), Some(&id));
        assert_eq!(
            copy.tags.get("jbake:complete").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            copy.tags.get("jbake:version"),
            image.tags.get("jbake:version")
        );
        assert_eq!(record["regions"][region], copy.id.as_str(), "{record}");
        assert_eq!(built["regions"][region], copy.id.as_str());
        assert_eq!(moto.launch_permissions(region, &copy.id), [OTHER]);
        let p = moto
            .parameter(region, "/jbake/jbake-test/latest")
            .expect("published");
        assert_eq!(p.value, copy.id);
        for s in &copy.snapshot_ids {
            let snap = res.snapshots.iter().find(|x| &x.id == s).expect("snapshot");
            assert_eq!(snap.tags.get("jbake:build-id"), Some(&id), "{snap:?}");
            assert_eq!(snap.kms_key_id.as_deref(), Some(keys[region].as_str()));
        }
    }
    assert_eq!(moto.launch_permissions(HOME, &ami), [OTHER]);
    assert_eq!(
        moto.parameter(HOME, "/jbake/jbake-test/latest")
            .map(|p| p.value),
        Some(ami.clone())
    );
    assert_eq!(
        record["published"].as_array().map(Vec::len),
        Some(3),
        "{record}"
    );
    let launch = moto.recorded_requests();
    let run = launch
        .iter()
        .find(|r| r.action == "RunInstances")
        .expect("RunInstances");
    assert_eq!(
        run.params
            .get("BlockDeviceMapping.1.Ebs.KmsKeyId")
            .map(String::as_str),
        Some("alias/jbake-images")
    );
    assert_clean(&moto, None);
    // The build instance and the boot test's.
    assert_eq!(cloud.served().len(), 2, "{:?}", cloud.errors());
    assert_eq!(
        image.tags.get("jbake:tested").map(String::as_str),
        Some("true")
    );
    for region in [WEST, EU] {
        let res = moto.resources(region);
        let copies = copies_of(&res, &ami);
        assert_eq!(
            copies[0].tags.get("jbake:tested").map(String::as_str),
            Some("true"),
            "the copy in {region} carries the verdict"
        );
    }

    // The nightly again: unchanged, nothing copied or written; the manifest still lists every
    // region.
    moto.start_recording();
    let again = build(&flags);
    moto.stop_recording();
    again.assert_code(0);
    let actions = moto.recorded_actions();
    for made in ["RunInstances", "CreateImage", "CopyImage", "PutParameter"] {
        assert!(!actions.iter().any(|a| a == made), "{made} in {actions:?}");
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    assert_eq!(m["builds"][1]["regions"], record["regions"]);
    assert_eq!(m["builds"][1]["skipped_unchanged"], true);
    assert_clean(&moto, None);
}
