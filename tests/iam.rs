//! The IAM policies jbake ships, enforced: `jbake build`, `gc`, `roll` and `status` against moto
//! with IAM authorization on (`POST /moto-api/reset-auth 0`), signed with the access key of an
//! IAM user holding `iam/jbake-build-policy.json` or `iam/jbake-roll-policy.json`. moto then
//! checks each request's SigV4 signature and whether the user's policy allows its action.
//!
//! What moto cannot check: it authorizes every non-S3 request against the resource `*`, so a
//! statement scoped to resource ARNs never matches there, and it ignores conditions on keys it
//! does not supply (all of jbake's: `aws:ResourceTag/jbake:build-id`, `ec2:CreateAction`,
//! `aws:TagKeys`, ...). The shipped policies put every write on resource ARNs with conditions,
//! so the user moto sees holds [`for_moto`] of the file: the same statements, each Allow widened
//! to `*` (moto could not match the ARN), the Deny statements left out (moto would apply them
//! without their conditions, to everything). What that proves is the action lists: a build, gc
//! and a roll need exactly those actions and no more. Resources and conditions are checked on
//! the documents themselves instead: [`iam_policies_are_scoped_by_resource_and_condition`]
//! asserts the intent statement by statement, and [`iam_policies_pass_parliament`] runs the
//! `parliament` linter (tests/requirements.txt) with every finding justified. moto also checks
//! only the action of the API called, not what AWS additionally requires (tagging at creation
//! also needs `ec2:CreateTags` with `ec2:CreateAction`; pointing a group at a launch template
//! also needs `ec2:RunInstances` on it). docs/iam.md says which statement is scoped how.
//!
//! Also proven here: the policies are least privilege at the level of actions. Each action a
//! policy lists was used by the commands it is for (the build policy: a build, a failed build,
//! gc; the roll policy: a roll and status; minus those that moto cannot show).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use crate::build::{
    assert_nothing_left, build_cmd, build_id_of, finish, finished, follow, recipe, run, spawn,
    tested_build_cmd, wait_for_line,
};
use crate::roll::{self, iam_action, GROUP};
use crate::support::archive;
use crate::support::bake::{BOOTING, BOOTS_LIKE_EC2};
use crate::support::cli::{self, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto, REGION};
use crate::support::prereq;
use crate::support::sshd::{self, Sshd};

const BUILD_POLICY: &str = "iam/jbake-build-policy.json";
const ROLL_POLICY: &str = "iam/jbake-roll-policy.json";
const KEYS_POLICY: &str = "iam/jbake-keys-policy.json";
const PRUNE_POLICY: &str = "iam/jbake-prune-policy.json";

fn policy_text(file: &str) -> String {
    std::fs::read_to_string(cli::root().join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
}

/// The policy as moto can enforce it: every Allow statement on resource `*` (moto matches only
/// `*`; its conditions stay, moto ignores them), no Deny statement (moto would ignore its
/// conditions and deny everything it names).
pub(crate) fn for_moto(text: &str) -> String {
    let mut doc: Value = serde_json::from_str(text).expect("the policy is JSON");
    let statements = doc["Statement"].as_array_mut().expect("statements");
    statements.retain(|s| s["Effect"] == "Allow");
    for s in statements.iter_mut() {
        s["Resource"] = Value::String("*".into());
    }
    doc.to_string()
}

/// Every action the policy's Allow statements list.
fn policy_actions(text: &str) -> BTreeSet<String> {
    let doc: Value = serde_json::from_str(text).expect("the policy is JSON");
    doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a
                .iter()
                .map(|a| a.as_str().expect("action").to_string())
                .collect(),
            other => panic!("Action {other}"),
        })
        .collect()
}

/// The policy with `action` taken out of its statement.
fn policy_without(text: &str, action: &str) -> String {
    let mut doc: Value = serde_json::from_str(text).expect("the policy is JSON");
    let mut removed = false;
    for s in doc["Statement"].as_array_mut().expect("statements") {
        if let Some(list) = s["Action"].as_array_mut() {
            let before = list.len();
            list.retain(|a| a != action);
            removed |= list.len() != before;
        }
    }
    assert!(removed, "{action} is not in the policy");
    // A statement left without actions is not a statement (IAM refuses the document).
    doc["Statement"]
        .as_array_mut()
        .expect("statements")
        .retain(|s| s["Action"].as_array().is_none_or(|a| !a.is_empty()));
    doc.to_string()
}

/// The IAM actions (`ec2:RunInstances`) of API actions jbake was seen making.
fn iam_actions<'a>(actions: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    actions
        .into_iter()
        .filter(|a| !a.is_empty())
        .map(|a| match a.as_str() {
            "DescribeKey" => "kms:DescribeKey".to_string(),
            _ => iam_action(a),
        })
        .collect()
}

/// What EC2 asks KMS for on jbake's behalf when a customer managed key encrypts a volume or a
/// copy (`kms:ViaService`): in the build policy, never called by jbake itself, so never seen.
const KMS_VIA_EC2: [&str; 5] = [
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
];
/// Where the IAM build test copies its image; the account it shares it with.
const COPY_REGION: &str = "us-west-2";
const SHARE_WITH: &str = "111122223333";

/// A default subnet of the region (through the harness's own credentials).
fn a_subnet(moto: &Moto) -> String {
    let mut c = Command::new("python3");
    c.args([
        "-c",
        "import boto3; print(boto3.client('ec2').describe_subnets(Filters=[{'Name': \
         'default-for-az', 'Values': ['true']}])['Subnets'][0]['SubnetId'])",
    ]);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            c.env_remove(key);
        }
    }
    let out = c
        .envs(moto.harness_env())
        .output()
        .expect("run python3 boto3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What a denied call must say: the action, the policy that has it, what AWS answered.
#[track_caller]
fn assert_denied(out: &Run, action: &str, policy: &str) {
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!(
            "not authorized to perform {action}: check the IAM policy"
        )),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains(policy), "{}", out.stderr);
    assert!(
        out.stderr.contains("AccessDenied") || out.stderr.contains("UnauthorizedOperation"),
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// jbake build (instance tier: a successful build runs the image hygiene).

#[test]
fn iam_build_policy_bakes_an_image_and_a_missing_action_fails_cleanly() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let t0 = Instant::now();
    let moto = Moto::start();
    let policy = policy_text(BUILD_POLICY);
    let (key, secret) = moto.iam_user(&for_moto(&policy));
    // On AWS tagging at creation needs ec2:CreateTags too, and a build without it would fail at
    // its first ImportKeyPair; moto only checks CreateTags itself, which a build calls once the
    // image exists: the latest failure, with the most to clean up (image and snapshots too).
    let (no_tags_key, no_tags_secret) =
        moto.iam_user(&for_moto(&policy_without(&policy, "ec2:CreateTags")));
    // The image is copied, shared and published: customer managed keys (the home region's is
    // its default EBS key, looked up; the copy's is named) let it be shared.
    moto.kms_key(REGION, "alias/jbake-images");
    moto.set_ebs_default_key(REGION, "alias/jbake-images");
    moto.kms_key(COPY_REGION, "alias/jbake-dr");
    moto.enable_iam_auth();
    let subnet = a_subnet(&moto);
    let vm = Instance::builder("iam-build").up();
    // Created after enable_iam_auth: its watcher calls moto as the harness's admin user.
    let cloud = CloudInit::for_instance(&moto, &vm);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("manifest.json");
    let r = recipe(
        dir.path(),
        &vm.user,
        "steps:\n  - name: Mark the image\n    file: { path: /etc/jbake-built, content: \"{{ version }}\\n\" }\n\
         validate:\n  - name: marked\n    run: test -s /etc/jbake-built\n\
         test:\n  - name: still marked on a fresh instance\n    run: test -s /etc/jbake-built\n",
    );
    // jbake's requests, and only those, go through the proxy: its log is what jbake called.
    // Instances are pending until the stand-in served them (the boot test's own instance too:
    // a machine booted from the image).
    let boot = FaultProxy::start(&moto.endpoint());
    let dr_key = format!("{COPY_REGION}=alias/jbake-dr");
    boot.world(BOOTS_LIKE_EC2);
    cloud.report_to(&boot);
    let build = |vm: &Instance, key: &str, secret: &str| {
        let mut c = tested_build_cmd(&moto, &boot.endpoint(), &r, &vm.host, vm.port, &manifest);
        c.envs(moto.env_with(&boot.endpoint(), key, secret));
        c.args(["--copy-to", COPY_REGION, "--kms-key-id", &dr_key])
            .args(["--share-with", SHARE_WITH]);
        c
    };
    eprintln!("set up in {:?}", t0.elapsed());

    // The whole build with its boot test, as the user holding exactly the build policy.
    let t = Instant::now();
    let out = run(build(&vm, &key, &secret), &["--publish-ssm"]);
    eprintln!("build under the build policy: {:?}", t.elapsed());
    out.assert_code(0);
    let id = build_id_of(&out);
    let result = finished(&out);
    let ami = result["ami_id"].as_str().expect("ami_id").to_string();
    let res = moto.resources(REGION);
    let image = res
        .images
        .iter()
        .find(|i| i.id == ami)
        .unwrap_or_else(|| panic!("{ami} not in {:?}", res.images));
    assert_eq!(image.state.as_deref(), Some("available"));
    for (k, v) in [
        ("jbake:build-id", id.as_str()),
        ("jbake:recipe", "jbake-test"),
        ("jbake:complete", "true"),
        ("jbake:tested", "true"),
        (
            "jbake:version",
            result["version"].as_str().expect("version"),
        ),
    ] {
        assert_eq!(
            image.tags.get(k).map(String::as_str),
            Some(v),
            "{k}: {image:?}"
        );
    }
    for snap in &image.snapshot_ids {
        let s = res
            .snapshots
            .iter()
            .find(|s| &s.id == snap)
            .expect("listed");
        assert_eq!(s.tags.get("jbake:build-id"), Some(&id), "{s:?}");
    }
    assert_nothing_left(&moto, &id);
    // Copied, shared, published.
    let copy = result["regions"][COPY_REGION]
        .as_str()
        .expect("the copy")
        .to_string();
    assert_eq!(moto.launch_permissions(COPY_REGION, &copy), [SHARE_WITH]);
    assert_eq!(moto.launch_permissions(REGION, &ami), [SHARE_WITH]);
    assert_eq!(
        moto.parameter(COPY_REGION, "/jbake/jbake-test/latest")
            .map(|p| p.value),
        Some(copy.clone())
    );
    assert!(moto.resources(COPY_REGION).leftovers_of(None).is_empty());
    let image_archive = cloud.image_archive(&ami).expect("the image's archive");
    assert_eq!(
        String::from_utf8(archive::read(&image_archive, "etc/jbake-built").expect("marked"))
            .expect("UTF-8")
            .trim(),
        result["version"].as_str().expect("version")
    );
    // The build instance and the boot test's.
    assert_eq!(cloud.served().len(), 2, "{:?}", cloud.errors());
    drop(cloud);

    // One action less (and --subnet-id, so the build also looks the subnet up): the build
    // fails at that call, says what is missing, and removes what it made, image included.
    let images_before: BTreeSet<String> = res
        .images
        .iter()
        .filter(|i| i.state.as_deref() != Some("deregistered"))
        .map(|i| i.id.clone())
        .collect();
    let snapshots_before: BTreeSet<String> = res.snapshots.iter().map(|s| s.id.clone()).collect();
    // On a second build machine: the first one is an image now.
    let vm2 = Instance::builder("iam-build2").up();
    let cloud2 = CloudInit::for_instance(&moto, &vm2);
    cloud2.report_to(&boot);
    let t = Instant::now();
    // (Published under another prefix: the parameter it creates is deleted again. Without its
    // boot test, whose verdict is the first tag written after creation, the build gets as far
    // as the last stage: copied and published, then refused its jbake:complete.)
    let denied = run(
        build(&vm2, &no_tags_key, &no_tags_secret),
        &[
            "--force",
            "--subnet-id",
            &subnet,
            "--skip-test",
            "--publish-ssm",
            "/jbake/denied",
            "--allow-untested",
        ],
    );
    eprintln!("build without ec2:CreateTags: {:?}", t.elapsed());
    eprintln!("{}", denied.stderr.trim_end());
    assert_denied(&denied, "ec2:CreateTags", BUILD_POLICY);
    let denied_id = build_id_of(&denied);
    assert!(
        denied
            .stderr
            .contains(&format!("build {denied_id} failed: CreateTags")),
        "{}",
        denied.stderr
    );
    assert!(
        denied.stdout.contains("removing image ami-"),
        "the half-made image is removed: {}",
        denied.stdout
    );
    assert_nothing_left(&moto, &denied_id);
    let res = moto.resources(REGION);
    assert!(
        res.tagged_with_build(&denied_id).is_empty(),
        "{:?}",
        res.tagged_with_build(&denied_id)
    );
    let images_after: BTreeSet<String> = res
        .images
        .iter()
        .filter(|i| i.state.as_deref() != Some("deregistered"))
        .map(|i| i.id.clone())
        .collect();
    let snapshots_after: BTreeSet<String> = res.snapshots.iter().map(|s| s.id.clone()).collect();
    assert_eq!(images_after, images_before, "the new image is deregistered");
    assert_eq!(
        snapshots_after, snapshots_before,
        "its snapshots are deleted"
    );
    // Its copy and parameters too.
    assert!(
        moto.resources(COPY_REGION)
            .tagged_with_build(&denied_id)
            .is_empty(),
        "the denied build's copy is removed"
    );
    for region in [REGION, COPY_REGION] {
        assert_eq!(
            moto.parameter(region, "/jbake/denied/jbake-test/latest"),
            None
        );
    }

    // gc (nothing left to find) also lives with the build policy.
    let t = Instant::now();
    let gc = gc_run(
        &moto,
        &boot.endpoint(),
        &key,
        &secret,
        &["--older-than", "0s"],
    );
    eprintln!("gc: {:?}", t.elapsed());
    gc.assert_code(0);
    assert!(
        gc.stderr.contains("nothing to remove") || gc.stdout.contains("nothing to remove"),
        "{}",
        gc.stderr
    );

    // Least privilege: every action the policy lists was needed by these runs (but what EC2
    // asks KMS for on jbake's behalf, which moto does not play).
    let used = iam_actions(boot.log().iter().map(|e| &e.action));
    let mut expected = policy_actions(&policy);
    for via_ec2 in KMS_VIA_EC2 {
        assert!(expected.remove(via_ec2), "{via_ec2} is in the build policy");
    }
    assert_eq!(
        used, expected,
        "the build policy and what build and gc called differ"
    );
    eprintln!("total {:?}", t0.elapsed());
}

fn gc_run(moto: &Moto, endpoint: &str, key: &str, secret: &str, extra: &[&str]) -> Run {
    let mut c = cli::jbake();
    moto.apply_env(&mut c);
    c.envs(moto.env_with(endpoint, key, secret));
    c.args(["gc", "--region", REGION, "--endpoint-url", endpoint]);
    run(c, extra)
}

// ---------------------------------------------------------------------------------------------
// jbake copy (quick tier: nothing runs on a machine).

#[test]
fn iam_build_policy_copies_shares_and_publishes_an_image() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let policy = policy_text(BUILD_POLICY);
    let (key, secret) = moto.iam_user(&for_moto(&policy));
    moto.kms_key(REGION, "alias/jbake-images");
    moto.set_ebs_default_key(REGION, "alias/jbake-images");
    moto.kms_key(COPY_REGION, "alias/jbake-dr");
    let (image, _) = moto.image_fixture_in(
        REGION,
        "jenkins-agent-2026.11.30-1",
        &[
            ("jbake:recipe", "jenkins-agent"),
            ("jbake:build-id", "20261130-010203-a1b2c3"),
            ("jbake:version", "2026.11.30-1"),
            ("jbake:complete", "true"),
            ("jbake:tested", "true"),
        ],
        Some(None),
    );
    moto.enable_iam_auth();
    let proxy = FaultProxy::start(&moto.endpoint());
    let mut c = cli::jbake();
    moto.apply_env(&mut c);
    c.envs(moto.env_with(&proxy.endpoint(), &key, &secret))
        .args(["copy", &image, "--region", REGION, "--to", COPY_REGION])
        .args(["--kms-key-id", &format!("{COPY_REGION}=alias/jbake-dr")])
        .args(["--share-with", SHARE_WITH, "--publish-ssm"])
        .args(["--endpoint-url", &proxy.endpoint()]);
    let out = Run::from_output(c.output().expect("run jbake copy"));
    out.assert_code(0);
    let used = iam_actions(proxy.log().iter().map(|e| &e.action));
    let allowed = policy_actions(&policy);
    assert!(used.is_subset(&allowed), "{used:?} not in {allowed:?}");
    for needed in [
        "ec2:CopyImage",
        "ec2:ModifyImageAttribute",
        "kms:DescribeKey",
        "ssm:GetParameter",
        "ssm:PutParameter",
        "ec2:CreateTags",
    ] {
        assert!(used.contains(needed), "{needed} not in {used:?}");
    }
    assert_eq!(
        moto.launch_permissions(COPY_REGION, &{
            let res = moto.resources(COPY_REGION);
            res.images
                .iter()
                .find(|i| i.tags.get("jbake:copy-of") == Some(&image))
                .expect("the copy")
                .id
                .clone()
        }),
        [SHARE_WITH]
    );
}

// ---------------------------------------------------------------------------------------------
// jbake gc (quick tier: builds that stop before the image hygiene).

#[test]
fn iam_gc_under_the_build_policy_removes_what_killed_and_aborted_builds_left() {
    if !prereq::quick_tier() || !prereq::moto() {
        return;
    }
    let t0 = Instant::now();
    let moto = Moto::start();
    let (key, secret) = moto.iam_user(&for_moto(&policy_text(BUILD_POLICY)));
    moto.enable_iam_auth();
    let mut sshd = Sshd::start();
    let _cloud = CloudInit::for_sshd(&moto, &mut sshd);
    let boot = FaultProxy::start(&moto.endpoint());
    let dir = tempfile::tempdir().expect("tempdir");
    let build = |steps: &str| {
        boot.set(BOOTING);
        let r = recipe(dir.path(), sshd.user(), steps);
        let manifest = dir.path().join("manifest.json");
        let mut c = build_cmd(
            &moto,
            &boot.endpoint(),
            &r,
            sshd.host(),
            sshd.port(),
            &manifest,
        );
        c.envs(moto.env_with(&boot.endpoint(), &key, &secret));
        c
    };

    // A build killed with SIGKILL mid-step: nothing of it is removed.
    let mut child = spawn(build(
        "steps:\n  - name: long\n    run: echo started; sleep 60\n",
    ));
    let (lines, killed) = follow(&mut child);
    wait_for_line(&lines, "started");
    sshd::kill(&[child.id()], "KILL");
    let _ = finish(child, lines);
    // A build whose step fails, with --on-error abort: its resources are left on purpose.
    let aborted = run(
        build("steps:\n  - name: fails\n    run: exit 3\n"),
        &["--on-error", "abort"],
    );
    aborted.assert_code(1);
    let aborted_id = build_id_of(&aborted);
    let gc_command = format!("jbake gc --region {REGION} --build-id {aborted_id}");
    assert!(
        aborted.events().iter().any(|e| e["event"] == "warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains(&gc_command))),
        "{}",
        aborted.stdout
    );
    let res = moto.resources(REGION);
    for id in [&killed, &aborted_id] {
        let left = res.tagged_with_build(id);
        for kind in ["instance ", "key-pair ", "security-group "] {
            assert!(left.iter().any(|l| l.starts_with(kind)), "{id}: {left:?}");
        }
    }

    // The command --on-error abort printed, as the build policy's user.
    let t = Instant::now();
    let out = gc_run(
        &moto,
        &boot.endpoint(),
        &key,
        &secret,
        &["--build-id", &aborted_id],
    );
    eprintln!("gc --build-id: {:?}", t.elapsed());
    out.assert_code(0);
    let res = moto.resources(REGION);
    assert!(
        res.tagged_with_build(&aborted_id).is_empty(),
        "{:?}",
        res.tagged_with_build(&aborted_id)
    );
    assert!(
        !res.tagged_with_build(&killed).is_empty(),
        "only that build"
    );
    // Then everything older than now: the killed build's leftovers.
    let t = Instant::now();
    let out = gc_run(
        &moto,
        &boot.endpoint(),
        &key,
        &secret,
        &["--older-than", "0s"],
    );
    eprintln!("gc --older-than 0s: {:?}", t.elapsed());
    out.assert_code(0);
    assert!(
        out.stderr.contains("removed 3 resources") || out.stdout.contains("removed 3 resources"),
        "{}",
        out.stderr
    );
    assert_nothing_left(&moto, &killed);
    assert_nothing_left(&moto, &aborted_id);

    let used = iam_actions(boot.log().iter().map(|e| &e.action));
    let allowed = policy_actions(&policy_text(BUILD_POLICY));
    assert!(used.is_subset(&allowed), "{used:?} not in {allowed:?}");
    for gc_action in [
        "ec2:TerminateInstances",
        "ec2:DeleteSecurityGroup",
        "ec2:DeleteKeyPair",
    ] {
        assert!(used.contains(gc_action), "{used:?}");
    }
    eprintln!("total {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// jbake roll and status.

#[test]
fn iam_roll_policy_rolls_and_shows_status_and_a_missing_action_changes_nothing() {
    if !prereq::moto() {
        return;
    }
    let t0 = Instant::now();
    let mut f = roll::fixture("1");
    let policy = policy_text(ROLL_POLICY);
    let (key, secret) = f.moto.iam_user(&for_moto(&policy));
    let (no_lt_key, no_lt_secret) = f.moto.iam_user(&for_moto(&policy_without(
        &policy,
        "ec2:CreateLaunchTemplateVersion",
    )));
    f.moto.enable_iam_auth();
    f.env = f.moto.harness_env();
    let cmd = |key: &str, secret: &str, args: &[&str]| {
        let mut c = roll::jbake();
        f.moto.apply_env(&mut c);
        c.envs(f.moto.env_with(&f.moto.endpoint(), key, secret));
        c.args(args).args(["--region", REGION]);
        c
    };
    // Without --jenkins-credentials (plain HTTP to the stand-in, which would refuse them, and a
    // parameter path the policy names by example). The new controller answers as its image's
    // jbake:jenkins-version says.
    let url = f.jenkins.url();
    let roll_args = ["roll", "--yes", "--jenkins-url", url.as_str()];
    eprintln!("set up in {:?}", t0.elapsed());

    // One action less: refused before anything changed (nothing drained, nothing replaced).
    let t = Instant::now();
    let denied = Run::from_output(
        cmd(&no_lt_key, &no_lt_secret, &roll_args)
            .output()
            .expect("run jbake roll"),
    );
    eprintln!(
        "roll without ec2:CreateLaunchTemplateVersion: {:?}",
        t.elapsed()
    );
    eprintln!("{}", denied.stderr.trim_end());
    assert_denied(&denied, "ec2:CreateLaunchTemplateVersion", ROLL_POLICY);
    roll::assert_untouched(&f, "1");
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );

    // The roll, as the user holding exactly the roll policy.
    f.moto.start_recording();
    let t = Instant::now();
    let rolled = Run::from_output(
        cmd(&key, &secret, &roll_args)
            .output()
            .expect("run jbake roll"),
    );
    eprintln!("roll under the roll policy: {:?}", t.elapsed());
    f.moto.stop_recording();
    // (The recording stops before the harness's own calls below.)
    let mut used = iam_actions(&f.moto.recorded_actions());
    rolled.assert_code(0);
    assert!(
        rolled
            .stdout
            .contains(&format!("rolled group {GROUP} to {}", f.new_ami)),
        "{}\n{}",
        rolled.stdout,
        rolled.stderr
    );
    let st = f.state();
    assert_eq!(st["group_version"], "2", "{st}");
    let running = f.running();
    assert_eq!(running.len(), 1, "{st}");
    assert_ne!(running[0].0, f.instance);
    assert_eq!(running[0].1, f.new_ami);

    // status, as the same user.
    f.moto.start_recording();
    let t = Instant::now();
    let status = Run::from_output(
        cmd(&key, &secret, &["status", "--output", "json"])
            .output()
            .expect("run jbake status"),
    );
    eprintln!("status: {:?}", t.elapsed());
    f.moto.stop_recording();
    used.extend(iam_actions(&f.moto.recorded_actions()));
    status.assert_code(0);
    let events = status.events();
    let s = &events.last().expect("a status event")["result"];
    assert_eq!(s["group"], GROUP);
    assert_eq!(s["instances"][0]["image"]["id"], f.new_ami.as_str());
    assert_eq!(s["versions"][0]["number"], 2);

    // Least privilege: every action the policy lists was needed, except those moto cannot
    // show (see the top of this file).
    let mut expected = policy_actions(&policy);
    // (ssm:GetParameter is seen: the roll lock is read.)
    for unseen in ["ec2:RunInstances", "ec2:CreateTags"] {
        assert!(expected.remove(unseen), "{unseen} is in the roll policy");
    }
    assert_eq!(
        used, expected,
        "the roll policy and what roll and status called differ"
    );
    eprintln!("total {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// jbake prune and jbake keys.

/// The IAM action of an API action jbake calls (the service by the operation's name).
fn action_of(api: &str) -> String {
    let service = match api {
        "DescribeLaunchConfigurations" => "autoscaling",
        "GetParameter" | "PutParameter" | "DeleteParameter" | "AddTagsToResource" => "ssm",
        _ => return iam_action(api),
    };
    format!("{service}:{api}")
}

#[test]
fn iam_prune_and_keys_policies_run_their_commands() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    for d in 1..=3 {
        let version = format!("2026.11.0{d}-1");
        moto.create_image_fixture(
            &format!("jenkins-agent-{version}"),
            &[
                ("jbake:recipe", "jenkins-agent"),
                ("jbake:build-id", &format!("b-{d}")),
                ("jbake:version", &version),
                ("jbake:complete", "true"),
            ],
        );
    }
    let prune_policy = policy_text(PRUNE_POLICY);
    let keys_policy = policy_text(KEYS_POLICY);
    let (prune_key, prune_secret) = moto.iam_user(&for_moto(&prune_policy));
    let (keys_key, keys_secret) = moto.iam_user(&for_moto(&keys_policy));
    moto.enable_iam_auth();
    let run = |key: &str, secret: &str, args: &[&str]| {
        let mut c = cli::jbake();
        moto.apply_env(&mut c);
        c.envs(moto.env_with(&moto.endpoint(), key, secret));
        c.args(args).args(["--region", REGION]);
        Run::from_output(c.output().expect("run jbake"))
    };

    // prune, as the prune policy's user: the oldest two images and their snapshots go.
    moto.start_recording();
    let out = run(&prune_key, &prune_secret, &["prune", "--keep", "1"]);
    moto.stop_recording();
    out.assert_code(0);
    let used = iam_actions(&moto.recorded_actions())
        .into_iter()
        .map(|a| action_of(a.split(':').nth(1).unwrap_or_default()))
        .collect::<BTreeSet<String>>();
    let left = moto
        .resources(REGION)
        .images
        .iter()
        .filter(|i| i.state.as_deref() == Some("available"))
        .count();
    assert_eq!(left, 1, "{}", out.stdout);
    let mut expected = policy_actions(&prune_policy);
    // No launch template here (so no versions to read, nor one naming an image through SSM);
    // tests/prune.rs has them, without IAM enforcement.
    assert!(expected.remove("ssm:GetParameter"));
    assert!(expected.remove("ec2:DescribeLaunchTemplateVersions"));
    assert_eq!(
        used, expected,
        "the prune policy and what prune called differ"
    );

    // keys: init, a rotation, its end, as the keys policy's user.
    moto.start_recording();
    for args in [
        vec!["keys", "init"],
        vec!["keys", "rotate", "--agent-sync", "0s"],
        vec!["keys", "finish", "--controller-sync", "0s"],
        vec!["keys", "show"],
    ] {
        run(&keys_key, &keys_secret, &args).assert_code(0);
    }
    moto.stop_recording();
    let used = iam_actions(&moto.recorded_actions())
        .into_iter()
        .map(|a| action_of(a.split(':').nth(1).unwrap_or_default()))
        .collect::<BTreeSet<String>>();
    let mut expected = policy_actions(&keys_policy);
    // AWS checks it when PutParameter carries tags; moto checks only the call's own action.
    assert!(expected.remove("ssm:AddTagsToResource"));
    assert_eq!(
        used, expected,
        "the keys policy and what keys called differ"
    );
}

// ---------------------------------------------------------------------------------------------
// The documents themselves: what moto cannot check (resources and conditions).

/// The policies of the instances jbake's images run on, not of jbake's own credentials: in a
/// folder of their own, so that what reads `iam/*.json` as jbake's operator policies
/// (terraform/modules/iam) does not give them to operators.
const INSTANCE_POLICIES: [&str; 2] = [
    "iam/instance-roles/jbake-controller.json",
    "iam/instance-roles/jbake-agent.json",
];

/// The `*.json` files of a folder of the repository, sorted.
fn json_files(folder: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(cli::root().join(folder))
        .unwrap_or_else(|e| panic!("read {folder}/: {e}"))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .map(|n| format!("{folder}/{n}"))
        .collect();
    files.sort();
    files
}

/// Every policy: `iam/*.json` (jbake's own credentials) and `iam/instance-roles/*.json`.
fn policy_files() -> Vec<String> {
    let mut files = json_files("iam");
    files.extend(json_files("iam/instance-roles"));
    files
}

/// A string-or-list element as a list.
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("a string").to_string())
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("not a string or a list: {other}"),
    }
}

/// `(operator, key, values)` of a statement's conditions.
fn conditions(st: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    if let Some(ops) = st["Condition"].as_object() {
        for (op, keys) in ops {
            for (key, values) in keys.as_object().expect("condition keys") {
                out.push((op.clone(), key.clone(), strings(values)));
            }
        }
    }
    out
}

fn has_condition(st: &Value, op: &str, key: &str, value: &str) -> bool {
    conditions(st)
        .iter()
        .any(|(o, k, v)| o == op && k == key && v.iter().any(|x| x == value))
}

/// A read-only action that AWS does not scope to resources (`Describe*`, `List*`, the
/// account's default EBS key).
fn is_describe(action: &str) -> bool {
    let op = action.split(':').nth(1).unwrap_or_default();
    op.starts_with("Describe") || op.starts_with("List") || action == "ec2:GetEbsDefaultKmsKeyId"
}

/// An action that removes, stops or changes something that exists.
fn is_destructive(action: &str) -> bool {
    let op = action.split(':').nth(1).unwrap_or_default();
    [
        "Terminate",
        "Stop",
        "Delete",
        "Deregister",
        "Modify",
        "Update",
        "Detach",
        "Disassociate",
        "Revoke",
        "Reboot",
        "Suspend",
        "Resume",
        "Set",
    ]
    .iter()
    .any(|verb| op.starts_with(verb))
}

#[test]
fn iam_policies_are_scoped_by_resource_and_condition() {
    let files = policy_files();
    for want in [BUILD_POLICY, ROLL_POLICY, KEYS_POLICY, PRUNE_POLICY]
        .iter()
        .chain(INSTANCE_POLICIES.iter())
    {
        assert!(files.iter().any(|f| f == want), "{want} is missing");
    }
    // An authorization failure names the jbake policy that allows the action (src/aws/mod.rs
    // embeds them by file name): every policy for jbake's own credentials is listed there.
    let aws_mod = std::fs::read_to_string(cli::root().join("src/aws/mod.rs")).expect("aws/mod.rs");
    for f in json_files("iam") {
        assert!(
            aws_mod.contains(&format!("\"{f}\"")),
            "{f} is not in src/aws/mod.rs's POLICIES"
        );
    }
    for file in &files {
        let doc: Value = serde_json::from_str(&policy_text(file)).expect("JSON");
        assert_eq!(doc["Version"], "2012-10-17", "{file}");
        let statements = doc["Statement"].as_array().expect("statements");
        let mut sids = BTreeSet::new();
        for st in statements {
            let sid = st["Sid"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a statement without Sid"));
            assert!(sids.insert(sid.to_string()), "{file}: Sid {sid} twice");
            let at = format!("{file} {sid}");
            let actions = strings(&st["Action"]);
            let resources = strings(&st["Resource"]);
            assert!(!actions.is_empty() && !resources.is_empty(), "{at}");
            assert!(
                st.get("NotAction").is_none() && st.get("NotResource").is_none(),
                "{at}"
            );
            assert!(
                actions.iter().all(|a| !a.contains('*')),
                "{at}: wildcard action"
            );
            if st["Effect"] == "Deny" {
                continue;
            }
            assert_eq!(st["Effect"], "Allow", "{at}");
            // No `*` resource but for describes, which AWS does not scope to resources.
            if resources.iter().any(|r| r == "*") {
                let broad: Vec<&String> = actions.iter().filter(|a| !is_describe(a)).collect();
                assert!(broad.is_empty(), "{at}: {broad:?} on resource *");
            }
            for r in &resources {
                assert!(
                    r == "*" || r.starts_with("arn:aws:"),
                    "{at}: resource {r} is not an ARN"
                );
                // An SSM parameter is named, or a path of them; never every parameter.
                if r.contains(":parameter/") {
                    let path = r.split(":parameter/").nth(1).unwrap_or_default();
                    assert!(
                        path.len() > 2 && !path.starts_with('*'),
                        "{at}: {r} is every parameter"
                    );
                }
            }
            for action in &actions {
                // Every destructive EC2 and Auto Scaling action only on what carries jbake's tag.
                let service = action.split(':').next().unwrap_or_default();
                if is_destructive(action) && (service == "ec2" || service == "autoscaling") {
                    let tagged = conditions(st).iter().any(|(_, k, _)| {
                        k == "aws:ResourceTag/jbake:build-id"
                            || k == "aws:ResourceTag/jbake:role"
                            || k == "autoscaling:ResourceTag/jbake:role"
                    });
                    assert!(tagged, "{at}: {action} without a jbake tag condition");
                }
                // Tags only when creating, or jbake:complete on jbake's own images.
                if action == "ec2:CreateTags" {
                    let at_creation = conditions(st)
                        .iter()
                        .any(|(o, k, _)| o == "StringEquals" && k == "ec2:CreateAction");
                    let own_and_jbake_keys =
                        has_condition(st, "Null", "aws:ResourceTag/jbake:build-id", "false")
                            && conditions(st).iter().any(|(o, k, v)| {
                                o == "ForAllValues:StringEquals"
                                    && k == "aws:TagKeys"
                                    && v.iter().all(|t| t.starts_with("jbake:"))
                            });
                    assert!(
                        at_creation || own_and_jbake_keys,
                        "{at}: CreateTags anywhere"
                    );
                }
                // A resource made by the build carries the build's tag from its creation on.
                let creates = [
                    ("ec2:ImportKeyPair", "key-pair/"),
                    ("ec2:CreateSecurityGroup", "security-group/"),
                    ("ec2:RunInstances", "instance/"),
                    ("ec2:RunInstances", "volume/"),
                    ("ec2:CreateImage", "image/"),
                    ("ec2:CreateImage", "snapshot/"),
                    ("ec2:CopyImage", "image/"),
                ];
                for (act, kind) in creates {
                    if action == act && resources.iter().any(|r| r.contains(&format!(":{kind}"))) {
                        let tagged_request =
                            has_condition(st, "Null", "aws:RequestTag/jbake:build-id", "false");
                        let from_template = conditions(st)
                            .iter()
                            .any(|(o, k, _)| o == "ArnLike" && k == "ec2:LaunchTemplate");
                        assert!(
                            tagged_request || from_template,
                            "{at}: {action} makes {kind} without jbake:build-id"
                        );
                    }
                }
            }
        }
    }

    let build: Value = serde_json::from_str(&policy_text(BUILD_POLICY)).expect("JSON");
    let deny = build["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find(|s| s["Effect"] == "Deny")
        .expect("a Deny statement in the build policy");
    assert_eq!(strings(&deny["Action"]), ["ec2:CreateTags"]);
    assert!(has_condition(
        deny,
        "ForAnyValue:StringLike",
        "aws:TagKeys",
        "jbake:*"
    ));
    assert!(has_condition(deny, "Null", "ec2:CreateAction", "true"));
    assert!(has_condition(
        deny,
        "Null",
        "aws:ResourceTag/jbake:build-id",
        "true"
    ));
    // The build reads public parameters (the base image) and the ones it publishes image ids
    // in, never a secret; it writes only those.
    let build_ssm: Vec<String> = statements_with(&build, "ssm:GetParameter");
    assert!(
        build_ssm
            .iter()
            .all(|r| r.contains(":parameter/aws/service/")
                || r.ends_with(":parameter/jbake/*/latest")),
        "{build_ssm:?}"
    );
    for write in ["ssm:PutParameter", "ssm:DeleteParameter"] {
        assert_eq!(
            statements_with(&build, write),
            ["arn:aws:ssm:*:*:parameter/jbake/*/latest"],
            "{write}: the publish path only (never the roll lock under /jbake/locks)"
        );
    }
    // Copies are tagged at creation, of the account's own images; EC2 uses customer managed
    // keys for jbake only through EC2 (and grants only for AWS resources).
    let copy = build["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .find(|s| strings(&s["Action"]) == ["ec2:CopyImage"])
        .expect("a CopyImage statement");
    assert!(has_condition(
        copy,
        "StringEqualsIfExists",
        "ec2:Owner",
        "${aws:PrincipalAccount}"
    ));
    for st in build["Statement"].as_array().expect("statements") {
        let actions = strings(&st["Action"]);
        if actions.iter().any(|a| KMS_VIA_EC2.contains(&a.as_str())) {
            assert!(
                has_condition(st, "StringLike", "kms:ViaService", "ec2.*.amazonaws.com"),
                "{st}"
            );
        }
        if actions.iter().any(|a| a == "kms:CreateGrant") {
            assert!(
                has_condition(st, "Bool", "kms:GrantIsForAWSResource", "true"),
                "{st}"
            );
        }
    }

    // roll: the controller's launch template (tagged jbake:role=controller) and only it.
    let roll: Value = serde_json::from_str(&policy_text(ROLL_POLICY)).expect("JSON");
    for st in roll["Statement"].as_array().expect("statements") {
        let actions = strings(&st["Action"]);
        let lt_write = actions
            .iter()
            .any(|a| a == "ec2:CreateLaunchTemplateVersion" || a == "ec2:ModifyLaunchTemplate");
        if lt_write {
            assert_eq!(
                strings(&st["Resource"]),
                ["arn:aws:ec2:*:*:launch-template/*"]
            );
            assert!(has_condition(
                st,
                "StringEquals",
                "aws:ResourceTag/jbake:role",
                "controller"
            ));
        }
        if actions.iter().any(|a| a == "ec2:RunInstances") {
            let on_template = strings(&st["Resource"]) == ["arn:aws:ec2:*:*:launch-template/*"]
                && has_condition(
                    st,
                    "StringEquals",
                    "aws:ResourceTag/jbake:role",
                    "controller",
                );
            let from_template = conditions(st)
                .iter()
                .any(|(o, k, _)| o == "ArnLike" && k == "ec2:LaunchTemplate");
            assert!(on_template || from_template, "{st}");
        }
    }

    // The instances read their own parameter and nothing else; they change nothing in AWS.
    let agent: Value = serde_json::from_str(&policy_text(INSTANCE_POLICIES[1])).expect("JSON");
    assert_eq!(
        statements_with(&agent, "ssm:GetParameter"),
        ["arn:aws:ssm:*:*:parameter/devops-tools/jenkins/id_rsa.pub"],
        "the agents read the controller's public key only, never the private key"
    );
    assert_eq!(policy_actions(&agent.to_string()).len(), 1);
    let controller: Value = serde_json::from_str(&policy_text(INSTANCE_POLICIES[0])).expect("JSON");
    assert_eq!(
        statements_with(&controller, "ssm:GetParameter"),
        ["arn:aws:ssm:*:*:parameter/devops-tools/jenkins/id_rsa"]
    );
    for a in policy_actions(&controller.to_string()) {
        assert!(
            a == "ssm:GetParameter" || a.starts_with("elasticfilesystem:Client"),
            "{a}"
        );
    }
}

/// The resources of every Allow statement listing `action`.
fn statements_with(doc: &Value, action: &str) -> Vec<String> {
    doc["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .filter(|s| s["Effect"] == "Allow" && strings(&s["Action"]).iter().any(|a| a == action))
        .flat_map(|s| strings(&s["Resource"]))
        .collect()
}

/// parliament (PyPI, pinned in tests/requirements.txt) on every policy, community auditors
/// included. The one kind of finding it reports here is RESOURCE_MISMATCH on a statement that
/// holds only some of an action's resource types: jbake splits RunInstances, CreateImage and
/// CreateSecurityGroup by resource type on purpose, because a condition applies to a whole
/// statement (the instance must be tagged at creation, the security group and key pair must be
/// the build's own, the image and subnet are anyone's). Such a finding is justified when
/// another Allow statement of the same policy gives the action the resource type it names.
/// The other: PERMISSIONS_MANAGEMENT_ACTIONS for `kms:CreateGrant` in the build policy, which
/// EBS needs to encrypt with a customer managed key; justified when every statement allowing it
/// holds it to grants for AWS resources made through EC2. Any other finding fails the test.
#[test]
fn iam_policies_pass_parliament() {
    if !prereq::require(
        "parliament (pip install -r tests/requirements.txt)",
        prereq::has_program("parliament"),
    ) {
        return;
    }
    let mut findings = 0;
    let mut justified = Vec::new();
    let mut unjustified = Vec::new();
    for file in policy_files() {
        let text = policy_text(&file);
        let out = Command::new("parliament")
            .args(["--json", "--include-community-auditors", "--string", &text])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run parliament");
        assert!(
            out.status.success() || !out.stdout.is_empty(),
            "parliament failed on {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_str(&text).expect("JSON");
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
        {
            findings += 1;
            let f: Value = serde_json::from_str(line).expect("a parliament finding");
            // kms:CreateGrant is "permissions management": allowed only for grants EC2 makes
            // for its own volumes and copies (kms:GrantIsForAWSResource, through EC2).
            let grants_for_ebs = f["issue"] == "PERMISSIONS_MANAGEMENT_ACTIONS"
                && strings(&f["location"]["actions"]) == ["kms:creategrant"]
                && doc["Statement"]
                    .as_array()
                    .expect("statements")
                    .iter()
                    .filter(|s| strings(&s["Action"]).iter().any(|a| a == "kms:CreateGrant"))
                    .all(|s| {
                        has_condition(s, "Bool", "kms:GrantIsForAWSResource", "true")
                            && has_condition(
                                s,
                                "StringLike",
                                "kms:ViaService",
                                "ec2.*.amazonaws.com",
                            )
                    });
            let ok = grants_for_ebs
                || f["issue"] == "RESOURCE_MISMATCH"
                    && f["detail"].as_array().is_some_and(|details| {
                        details.iter().all(|d| {
                            let action = d["action"].as_str().unwrap_or_default();
                            let kind = d["required_format"]
                                .as_str()
                                .unwrap_or_default()
                                .rsplit(':')
                                .next()
                                .unwrap_or_default();
                            statements_with(&doc, action)
                                .iter()
                                .any(|r| r.ends_with(&format!(":{kind}")))
                        })
                    });
            let what = format!(
                "{file}:{}: {} {}",
                f["location"]["line"], f["issue"], f["detail"]
            );
            if ok {
                justified.push(what);
            } else {
                unjustified.push(what);
            }
        }
    }
    eprintln!(
        "parliament: {findings} findings, {} justified (the action gets that resource type in another statement of the policy):\n  {}",
        justified.len(),
        justified.join("\n  ")
    );
    assert!(
        unjustified.is_empty(),
        "parliament findings that are not a statement split by resource type:\n{}",
        unjustified.join("\n")
    );
}
