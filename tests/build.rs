//! `jbake build` / `controller` / `agent` / `gc` against moto (the AWS APIs) with SSH going to a
//! real server that the harness prepares the way cloud-init would ([`CloudInit`]).
//!
//! Successful builds run only on the instance tier (an nspawn Debian system): the image hygiene
//! step is destructive by design (it removes host keys, authorized keys, machine-id), so it must
//! never run on the CI machine itself. Quick-tier tests (an sshd on 127.0.0.1) only exercise
//! builds that fail or are interrupted before hygiene.
//!
//! After every test the moto state is listed: nothing the build made may be left, except the
//! image of a successful build.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::bake::{CheckIp, BASE_PARAM, BOOTING, BOOTS_LIKE_EC2, REALISTIC};
use crate::support::cli::{jbake, write, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto};
use crate::support::prereq;
use crate::support::sshd::{self, Sshd};

const REGION: &str = "us-east-1";

pub(crate) fn recipe(dir: &Path, user: &str, steps: &str) -> PathBuf {
    write(
        dir,
        "recipe.yaml",
        &format!(
            "version: 1\nname: jbake-test\n\
             base: {{ ssm_parameter: {BASE_PARAM}, ssh_user: {user} }}\n\
             instance: {{ type: t3.micro, volume_gb: 8 }}\n{steps}"
        ),
    )
}

/// `jbake build RECIPE --skip-test` against `endpoint`, SSH to `host:port`, JSON events. These
/// tests are about the bake itself; the boot test has its own (tests/boot_test.rs), which
/// launch instances of the image: [`tested_build_cmd`].
pub(crate) fn build_cmd(
    moto: &Moto,
    endpoint: &str,
    recipe: &Path,
    host: &str,
    port: u16,
    manifest: &Path,
) -> Command {
    let mut c = tested_build_cmd(moto, endpoint, recipe, host, port, manifest);
    c.arg("--skip-test");
    c
}

/// [`build_cmd`] with the boot test: its test instance boots a machine of its own from the
/// image (the [`CloudInit`] must `report_to` the proxy of a world that shows instances pending
/// until served: `BOOTS_LIKE_EC2`).
pub(crate) fn tested_build_cmd(
    moto: &Moto,
    endpoint: &str,
    recipe: &Path,
    host: &str,
    port: u16,
    manifest: &Path,
) -> Command {
    let mut c = jbake();
    moto.apply_env(&mut c);
    c.args(["build", &recipe.display().to_string(), "--region", REGION])
        .args(["--endpoint-url", endpoint])
        .args(["--ssh-host", host, "--ssh-port", &port.to_string()])
        .args(["--ssh-cidr", "127.0.0.1/32", "--connect-timeout", "60s"])
        .args(["--manifest", &manifest.display().to_string()])
        .args(["--output", "json"]);
    c
}

pub(crate) fn run(mut c: Command, extra: &[&str]) -> Run {
    Run::from_output(c.args(extra).output().expect("run jbake"))
}

/// The build id a run announced (its first event: "build <id> of <recipe> in <region>").
pub(crate) fn build_id_of(run: &Run) -> String {
    run.events()
        .iter()
        .find(|e| e["event"] == "build")
        .and_then(|e| e["message"].as_str())
        .and_then(|m| m.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no build event in {}", run.stdout))
        .to_string()
}

pub(crate) fn finished(run: &Run) -> serde_json::Value {
    run.events()
        .into_iter()
        .find(|e| e["event"] == "build_finished")
        .unwrap_or_else(|| panic!("no build_finished event in {}", run.stdout))["result"]
        .clone()
}

/// Nothing of the build, nor of any other build, is left in moto (listed there: instances, key
/// pairs, security groups, images, snapshots): no instance that is not terminated, no key pair,
/// no security group, no half-made image, no snapshot that no complete image uses.
#[track_caller]
pub(crate) fn assert_nothing_left(moto: &Moto, build_id: &str) {
    let r = moto.resources(REGION);
    let left = r.leftovers_of(Some(build_id));
    let all = r.leftovers_of(None);
    assert!(
        left.is_empty() && all.is_empty(),
        "build {build_id} left {left:?}; all builds left {all:?}"
    );
    assert!(r.live_instances().is_empty(), "{:?}", r.instances);
}

// ---------------------------------------------------------------------------------------------
// Instance tier: whole builds.

#[test]
fn a_build_bakes_a_tagged_versioned_ami_and_leaves_nothing_behind() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let vm = Instance::builder("build").up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("manifest.json");
    write(dir.path(), "files/app.conf", "answer=42\n");
    let r = recipe(
        dir.path(),
        &vm.user,
        "vars:\n  flavour: { default: a }\n  token: { secret: true, default: s3cr3t-build-token }\n\
         steps:\n  - name: Mark the image\n    file: { path: /etc/jbake-built, content: \"{{ version }}\\n\" }\n\
         \x20 - name: Config\n    upload: { src: app.conf, dest: /etc/jbake-app.conf }\n\
         \x20 - name: Flavour\n    run: echo {{ flavour }} > /etc/jbake-flavour; test -n {{ token }}\n\
         validate:\n  - name: marked\n    run: test -s /etc/jbake-built\n",
    );
    let boot = FaultProxy::start(&moto.endpoint());
    let build = || {
        boot.set(BOOTING);
        build_cmd(&moto, &boot.endpoint(), &r, &vm.host, vm.port, &manifest)
    };
    // What the image must not carry: a persistent journal, a random seed, DHCP leases.
    vm.exec_ok(
        "mkdir -p /var/log/journal /var/lib/dhcp /var/lib/systemd && systemd-tmpfiles --create --prefix /var/log/journal >/dev/null 2>&1; \
         journalctl --flush >/dev/null 2>&1; logger jbake-test-before-the-build; journalctl --flush >/dev/null 2>&1; \
         echo seed > /var/lib/systemd/random-seed; echo lease > /var/lib/dhcp/dhclient.host0.leases",
    );
    assert_ne!(
        vm.exec_ok("find /var/log/journal -type f | wc -l"),
        "0",
        "the instance keeps a journal on disk before the build"
    );

    moto.start_recording();
    let out = run(build(), &[]);
    moto.stop_recording();
    out.assert_code(0);
    let id = build_id_of(&out);
    let result = finished(&out);

    // The launch asked for what a build instance must be: IMDSv2 only, an encrypted gp3 root
    // volume sized by the recipe that goes with the instance, terminate on shutdown, tags on
    // the instance and its volume.
    let requests = moto.recorded_requests();
    let launch = requests
        .iter()
        .find(|r| r.action == "RunInstances")
        .unwrap_or_else(|| panic!("no RunInstances in {requests:?}"));
    let p = |k: &str| launch.params.get(k).map(String::as_str);
    assert_eq!(
        p("MetadataOptions.HttpTokens"),
        Some("required"),
        "{launch:?}"
    );
    assert_eq!(p("InstanceInitiatedShutdownBehavior"), Some("terminate"));
    assert_eq!(p("InstanceType"), Some("t3.micro"));
    assert_eq!(p("BlockDeviceMapping.1.Ebs.Encrypted"), Some("true"));
    assert_eq!(p("BlockDeviceMapping.1.Ebs.VolumeType"), Some("gp3"));
    assert_eq!(p("BlockDeviceMapping.1.Ebs.VolumeSize"), Some("8"));
    assert_eq!(
        p("ClientToken").map(|t| t.starts_with("jbake-")),
        Some(true)
    );
    // The image and its snapshots are tagged at creation (nothing of them is ever untagged).
    let create = requests
        .iter()
        .find(|r| r.action == "CreateImage")
        .unwrap_or_else(|| panic!("no CreateImage in {requests:?}"));
    let tagged_at_creation: Vec<&str> = (1..=2)
        .filter_map(|n| {
            create
                .params
                .get(&format!("TagSpecification.{n}.ResourceType"))
                .map(String::as_str)
        })
        .collect();
    assert_eq!(tagged_at_creation, ["image", "snapshot"], "{create:?}");
    // The image is IMDSv2-only.
    assert!(
        requests.iter().any(|r| r.action == "ModifyImageAttribute"
            && r.params.get("ImdsSupport.Value").map(String::as_str) == Some("v2.0")),
        "{requests:?}"
    );
    assert_eq!(
        p("BlockDeviceMapping.1.Ebs.DeleteOnTermination"),
        Some("true")
    );
    let tagged: Vec<&str> = (1..=4)
        .filter_map(|n| p(&format!("TagSpecification.{n}.ResourceType")))
        .collect();
    assert!(
        tagged.contains(&"instance") && tagged.contains(&"volume"),
        "{launch:?}"
    );
    let ami = result["ami_id"].as_str().expect("ami_id").to_string();
    let version = result["version"].as_str().expect("version").to_string();
    assert_eq!(result["skipped_unchanged"], false);
    assert_eq!(result["name"], format!("jbake-test-{version}"));
    assert!(version.ends_with("-1"), "{version}");

    // The image: available, named by version, tagged; its snapshots tagged too.
    let res = moto.resources(REGION);
    let image = res
        .images
        .iter()
        .find(|i| i.id == ami)
        .unwrap_or_else(|| panic!("{ami} not in {:?}", res.images));
    assert_eq!(image.state.as_deref(), Some("available"));
    assert_eq!(image.imds_support.as_deref(), Some("v2.0"), "{image:?}");
    for (k, v) in [
        ("jbake:recipe", "jbake-test"),
        ("jbake:version", version.as_str()),
        ("jbake:build-id", id.as_str()),
        ("jbake:complete", "true"),
    ] {
        assert_eq!(
            image.tags.get(k).map(String::as_str),
            Some(v),
            "{k}: {image:?}"
        );
    }
    let hash = image.tags.get("jbake:content-hash").expect("content hash");
    assert_eq!(hash.len(), 64);
    assert!(image
        .tags
        .get("jbake:base-ami")
        .is_some_and(|b| b.starts_with("ami-")));
    assert!(!image.snapshot_ids.is_empty());
    for snap in &image.snapshot_ids {
        let s = res
            .snapshots
            .iter()
            .find(|s| &s.id == snap)
            .expect("snapshot listed");
        assert_eq!(s.tags.get("jbake:version"), Some(&version), "{s:?}");
        assert_eq!(s.tags.get("jbake:build-id"), Some(&id), "{s:?}");
    }
    // The build instance was launched safely, and is gone.
    let launched = res
        .instances
        .iter()
        .find(|i| i.tags.get("jbake:build-id") == Some(&id))
        .expect("the build instance is listed");
    assert_eq!(launched.state, "terminated");
    assert_eq!(launched.http_tokens.as_deref(), Some("required"));
    assert!(launched.tags.contains_key("jbake:expires-at"));
    assert!(
        launched
            .user_data
            .as_deref()
            .unwrap_or_default()
            .contains("shutdown -h +120"),
        "the TTL watchdog is in the user data"
    );
    assert_nothing_left(&moto, &id);

    // The recipe ran, then the image hygiene removed the build's access.
    assert_eq!(vm.exec_ok("cat /etc/jbake-built"), version);
    let served = cloud.served();
    assert_eq!(served.len(), 1, "{served:?}");
    let keys = vm.exec_ok(&format!(
        "cat /home/{}/.ssh/authorized_keys 2>/dev/null || true",
        vm.user
    ));
    assert!(!keys.contains(&format!("jbake-{id}")), "{keys}");
    assert_eq!(vm.exec_ok("ls /etc/ssh/ | grep -c ssh_host_ || true"), "0");
    assert_eq!(vm.exec_ok("wc -c < /etc/machine-id"), "0");
    // Nor the build's journal, random seed, DHCP leases.
    assert_eq!(vm.exec_ok("find /var/log/journal -type f | wc -l"), "0");
    assert_eq!(
        vm.exec_ok("ls /var/lib/systemd/random-seed /var/lib/dhcp/*.leases 2>/dev/null | wc -l"),
        "0"
    );

    // The manifest records the build.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    let builds = m["builds"].as_array().expect("builds");
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0]["ami_id"], ami.as_str());
    assert_eq!(builds[0]["region"], REGION);
    assert!(!m.to_string().contains("PRIVATE KEY"));

    // The same inputs again: nothing launched, the same AMI reported, the manifest appended.
    moto.start_recording();
    let again = run(build(), &[]);
    moto.stop_recording();
    again.assert_code(0);
    let same = finished(&again);
    assert_eq!(same["skipped_unchanged"], true);
    assert_eq!(same["ami_id"], ami.as_str());
    let actions = moto.recorded_actions();
    for forbidden in [
        "RunInstances",
        "ImportKeyPair",
        "CreateSecurityGroup",
        "CreateImage",
    ] {
        assert!(
            !actions.iter().any(|a| a == forbidden),
            "{forbidden} in {actions:?}"
        );
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    assert_eq!(m["builds"].as_array().map(Vec::len), Some(2));

    // What defines the image changes: a variable, one byte of an uploaded file, the base AMI.
    // Each is a new build, with the next version of the day (never a name collision).
    let mut versions = vec![version.clone()];
    let mut rebuilt = |extra: &[&str], what: &str| {
        let out = run(build(), extra);
        out.assert_code(0);
        let result = finished(&out);
        assert_eq!(result["skipped_unchanged"], false, "{what}: {}", out.stdout);
        let v = result["version"].as_str().expect("version").to_string();
        assert_ne!(result["ami_id"], ami.as_str(), "{what}");
        assert_nothing_left(&moto, &build_id_of(&out));
        versions.push(v);
        out
    };
    rebuilt(&["--var", "flavour=b"], "a variable");
    assert_eq!(vm.exec_ok("cat /etc/jbake-flavour"), "b");
    write(dir.path(), "files/app.conf", "answer=43\n");
    rebuilt(&["--var", "flavour=b"], "an uploaded file");
    assert_eq!(vm.exec_ok("cat /etc/jbake-app.conf"), "answer=43");
    let other_base = rebuilt(
        &[
            "--var",
            "flavour=b",
            "--base-ssm-parameter",
            "/aws/service/ami-amazon-linux-latest/amzn2-ami-hvm-x86_64-gp2",
        ],
        "the base AMI",
    );
    assert_ne!(finished(&other_base)["base_ami"], result["base_ami"]);
    rebuilt(&["--var", "flavour=b", "--force"], "--force");
    let day = version
        .rsplit_once('-')
        .map(|(d, _)| d.to_string())
        .expect("dated version");
    let expected: Vec<String> = (1..=5).map(|n| format!("{day}-{n}")).collect();
    assert_eq!(versions, expected);

    // No secret anywhere: not the secret variable, not the one-time host key (it is in the
    // instance's user data), not any private key; in the output, the manifest, the image tags.
    let res = moto.resources(REGION);
    let user_data = &res
        .instances
        .iter()
        .find(|i| i.tags.get("jbake:build-id") == Some(&id))
        .expect("instance")
        .user_data
        .clone()
        .unwrap_or_default();
    let key_lines: Vec<&str> = user_data
        .lines()
        .map(str::trim)
        .filter(|l| l.len() > 40 && !l.contains(' '))
        .collect();
    assert!(
        !key_lines.is_empty(),
        "the user data holds the host key: {user_data}"
    );
    let manifest_text = std::fs::read_to_string(&manifest).expect("manifest");
    let tags_text = format!("{:?}", res.images);
    for text in [
        &out.stdout,
        &out.stderr,
        &again.stdout,
        &again.stderr,
        &manifest_text,
        &tags_text,
    ] {
        assert!(!text.contains("s3cr3t-build-token"), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        for l in &key_lines {
            assert!(!text.contains(l), "host key material in {text}");
        }
    }
}

/// A one-step build on a fresh instance, its API calls through a fault proxy set to `rules`.
/// Fields drop in order: the run, its folder, the cloud-init stand-in, the instance, the proxy,
/// moto.
struct FaultedBuild {
    out: Run,
    manifest: PathBuf,
    _dir: tempfile::TempDir,
    _cloud: CloudInit,
    _vm: Instance,
    proxy: FaultProxy,
    moto: Moto,
}

fn faulted_build(name: &str, rules: &str) -> FaultedBuild {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    proxy.set(rules);
    let vm = Instance::builder(name).up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest = dir.path().join("manifest.json");
    let r = recipe(
        dir.path(),
        &vm.user,
        "steps:\n  - name: x\n    run: 'true'\n",
    );
    let out = run(
        build_cmd(&moto, &proxy.endpoint(), &r, &vm.host, vm.port, &manifest),
        &[],
    );
    FaultedBuild {
        out,
        manifest,
        _dir: dir,
        _cloud: cloud,
        _vm: vm,
        proxy,
        moto,
    }
}

#[test]
fn an_image_that_cannot_be_made_is_cleaned_up_with_everything_else() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let b = faulted_build(
        "build-fault",
        // EC2 refuses (an answer lost on the way is another test's: the image is adopted).
        r#"[{"action": "CreateImage", "status": 400, "code": "IncorrectInstanceState", "message": "injected"},
            {"action": "DescribeInstances", "delay_ms": 4000, "times": 1}]"#,
    );
    b.out.assert_code(1);
    assert!(
        b.out.stderr.contains("CreateImage") || b.out.stderr.contains("creating image"),
        "{}",
        b.out.stderr
    );
    assert!(b.out.stderr.contains("injected"), "{}", b.out.stderr);
    let id = build_id_of(&b.out);
    assert_nothing_left(&b.moto, &id);
    assert!(b
        .moto
        .resources(REGION)
        .images
        .iter()
        .all(|i| !i.tags.contains_key("jbake:build-id")));
    assert!(
        !b.manifest.exists(),
        "a failed build writes no manifest entry"
    );
}

#[test]
fn a_built_image_whose_cleanup_fails_is_kept_and_the_build_exits_1() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    // The image gets made, then nothing temporary can be removed (a permission that went away).
    let b = faulted_build(
        "build-leak",
        r#"[{"action": "DescribeInstances", "after": "RunInstances", "delay_ms": 4000, "times": 1},
            {"action": "TerminateInstances", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no terminate"},
            {"action": "DeleteSecurityGroup", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no delete"},
            {"action": "DeleteKeyPair", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no delete"}]"#,
    );
    // A leak is not a success, even with a good image: the cron sees it in the exit status.
    b.out.assert_code(1);
    let id = build_id_of(&b.out);
    let ami = finished(&b.out)["ami_id"]
        .as_str()
        .expect("the image is reported")
        .to_string();
    let last = b.out.stderr.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with(&format!("error: built {ami} (jbake-test-"))
            && last.contains("but its cleanup failed, these are left: ")
            && last.ends_with(&format!(
                "; `jbake gc --region {REGION} --build-id {id}` removes them"
            )),
        "{}",
        b.out.stderr
    );
    let left = b.moto.resources(REGION).tagged_with_build(&id);
    for kind in ["instance ", "key-pair ", "security-group "] {
        assert!(left.iter().any(|l| l.starts_with(kind)), "{left:?}");
    }
    assert_each_named_once(&last, &left);
    // The image is complete and recorded: the next run finds it, nothing is rebuilt.
    let image = b
        .moto
        .resources(REGION)
        .images
        .into_iter()
        .find(|i| i.id == ami)
        .expect("the image is kept");
    assert_eq!(image.state.as_deref(), Some("available"));
    assert_eq!(
        image.tags.get("jbake:complete").map(String::as_str),
        Some("true")
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&b.manifest).expect("manifest"))
            .expect("json");
    assert_eq!(m["builds"][0]["ami_id"], ami.as_str());

    // The command it names removes the rest and keeps the image.
    b.proxy.set("[]");
    let mut gc = jbake();
    b.moto.apply_env(&mut gc);
    gc.args(["gc", "--region", REGION, "--build-id", &id])
        .args(["--endpoint-url", &b.moto.endpoint()]);
    run(gc, &[]).assert_code(0);
    assert_nothing_left(&b.moto, &id);
    assert!(b.moto.resources(REGION).images.iter().any(|i| i.id == ami));
}

// ---------------------------------------------------------------------------------------------
// Quick tier: failures and interruptions before the image hygiene.

struct Quick {
    moto: Moto,
    boot: FaultProxy,
    sshd: Sshd,
    _cloud: CloudInit,
    dir: tempfile::TempDir,
}

fn quick() -> Option<Quick> {
    if !prereq::quick_tier() || !prereq::moto() {
        return None;
    }
    let moto = Moto::start();
    let mut sshd = Sshd::start();
    let cloud = CloudInit::for_sshd(&moto, &mut sshd);
    let boot = FaultProxy::start(&moto.endpoint());
    Some(Quick {
        boot,
        moto,
        sshd,
        _cloud: cloud,
        dir: tempfile::tempdir().expect("tempdir"),
    })
}

impl Quick {
    fn build(&self, steps: &str) -> Command {
        self.boot.set(BOOTING);
        self.build_via(&self.boot.endpoint(), steps)
    }

    fn build_via(&self, endpoint: &str, steps: &str) -> Command {
        self.build_to(endpoint, self.sshd.port(), steps)
    }

    fn build_to(&self, endpoint: &str, port: u16, steps: &str) -> Command {
        let r = recipe(self.dir.path(), self.sshd.user(), steps);
        build_cmd(
            &self.moto,
            endpoint,
            &r,
            self.sshd.host(),
            port,
            &self.dir.path().join("manifest.json"),
        )
    }
}

#[test]
fn a_failing_step_names_the_step_and_instance_and_everything_is_removed() {
    let Some(q) = quick() else { return };
    let out = run(
        q.build("steps:\n  - name: Install nothing\n    run: \"echo 'E: Unable to locate package nope' >&2; exit 100\"\n"),
        &[],
    );
    out.assert_code(1);
    let id = build_id_of(&out);
    assert!(
        out.stderr.contains("step 1 'Install nothing'"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("exited 100 on i-"), "{}", out.stderr);
    assert!(
        out.stderr.contains("Unable to locate package nope"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&format!("build {id} failed")),
        "{}",
        out.stderr
    );
    assert_nothing_left(&q.moto, &id);
    let res = q.moto.resources(REGION);
    assert!(res
        .images
        .iter()
        .all(|i| !i.tags.contains_key("jbake:build-id")));
}

#[test]
fn api_faults_at_each_stage_end_with_everything_removed() {
    let Some(q) = quick() else { return };
    let proxy = FaultProxy::start(&q.moto.endpoint());
    for action in [
        "ImportKeyPair",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "RunInstances",
        "DescribeInstances",
    ] {
        proxy.set(&format!(
            r#"[{{"action": "{action}", "status": 400, "code": "UnauthorizedOperation", "message": "injected fault in {action}"}}]"#
        ));
        let out = run(
            q.build_via(&proxy.endpoint(), "steps:\n  - name: x\n    run: 'true'\n"),
            &[],
        );
        out.assert_code(1);
        assert!(
            out.stderr.contains(&format!("injected fault in {action}")),
            "{action}: {}",
            out.stderr
        );
        proxy.set("[]");
        assert_nothing_left(&q.moto, &build_id_of(&out));
    }
    // Throttling is retried by the SDK (backoff), and the build goes on.
    proxy.set(r#"[{"action": "RunInstances", "status": 503, "code": "RequestLimitExceeded", "message": "slow down", "times": 2},
        {"action": "DescribeInstances", "delay_ms": 4000, "times": 1}]"#);
    let out = run(
        q.build_via(
            &proxy.endpoint(),
            "steps:\n  - name: fails later\n    run: exit 3\n",
        ),
        &[],
    );
    out.assert_code(1);
    assert!(out.stderr.contains("exited 3"), "{}", out.stderr);
    assert_nothing_left(&q.moto, &build_id_of(&out));
}

#[test]
fn a_connection_lost_mid_step_fails_and_cleans_up() {
    let Some(q) = quick() else { return };
    let mut child = spawn(q.build("steps:\n  - name: long\n    run: echo started; sleep 30\n"));
    let (lines, id) = follow(&mut child);
    wait_for_line(&lines, "started");
    q.sshd.drop_connections();
    let out = finish(child, lines);
    out.assert_code(1);
    assert!(
        out.stderr.contains("connection") && out.stderr.contains("lost"),
        "{}",
        out.stderr
    );
    assert_nothing_left(&q.moto, &id);
}

#[test]
fn sigint_sigterm_and_sighup_stop_the_build_and_remove_everything() {
    let Some(q) = quick() else { return };
    // SIGHUP: the terminal or SSH session of whoever started it closed.
    for signal in ["INT", "TERM", "HUP"] {
        let mut child = spawn(q.build("steps:\n  - name: long\n    run: echo started; sleep 60\n"));
        let (lines, id) = follow(&mut child);
        wait_for_line(&lines, "started");
        sshd::kill(&[child.id()], signal);
        let out = finish(child, lines);
        out.assert_code(130);
        assert!(
            out.stderr
                .contains(&format!("error: interrupted (SIG{signal}) (build {id}); its temporary resources were removed")),
            "{}",
            out.stderr
        );
        assert_nothing_left(&q.moto, &id);
    }
    // Interrupted while waiting for SSH (nothing answers on that port).
    let c = q.build_to(
        &q.moto.endpoint(),
        1,
        "steps:\n  - name: x\n    run: 'true'\n",
    );
    let mut child = spawn(c);
    let (lines, id) = follow(&mut child);
    wait_for_line(&lines, "launched");
    sshd::kill(&[child.id()], "INT");
    let out = finish(child, lines);
    out.assert_code(130);
    assert_nothing_left(&q.moto, &id);
}

#[test]
fn a_cleanup_that_fails_says_what_is_left_and_the_gc_command() {
    let Some(q) = quick() else { return };
    let mut child = spawn(q.build("steps:\n  - name: long\n    run: echo started; sleep 60\n"));
    let (lines, id) = follow(&mut child);
    wait_for_line(&lines, "started");
    // From now on nothing can be deleted (like an endpoint or a permission that went away).
    q.boot.set(
        r#"[{"action": "TerminateInstances", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no terminate"},
            {"action": "DeleteSecurityGroup", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no delete"},
            {"action": "DeleteKeyPair", "status": 400, "code": "UnauthorizedOperation", "message": "injected: no delete"}]"#,
    );
    sshd::kill(&[child.id()], "INT");
    let out = finish(child, lines);
    out.assert_code(130);
    let last = out.stderr.lines().last().unwrap_or_default().to_string();
    let left = q.moto.resources(REGION).tagged_with_build(&id);
    assert!(!left.is_empty(), "the faults kept nothing alive");
    assert!(
        !out.stderr.contains("were removed"),
        "claims a cleanup that failed: {}",
        out.stderr
    );
    assert!(
        last.starts_with(&format!(
            "error: interrupted (SIGINT) (build {id}); its cleanup failed, these are left: "
        )) && last.ends_with(&format!(
            "; `jbake gc --region {REGION} --build-id {id}` removes them"
        )),
        "{}",
        out.stderr
    );
    assert_each_named_once(&last, &left);

    // The command it names removes them.
    q.boot.set("[]");
    let mut gc = jbake();
    q.moto.apply_env(&mut gc);
    let gc_cmd = last
        .rsplit_once("; `")
        .and_then(|(_, c)| c.split_once('`'))
        .map(|(c, _)| c.to_string())
        .expect("a command in backquotes");
    let words: Vec<&str> = gc_cmd.split_whitespace().collect();
    assert_eq!(words[0], "jbake", "{gc_cmd}");
    gc.args(&words[1..])
        .args(["--endpoint-url", &q.moto.endpoint()]);
    run(gc, &[]).assert_code(0);
    assert_nothing_left(&q.moto, &id);
}

/// Each temporary resource in `left` (as the harness lists them: "instance i-…", "key-pair
/// jbake-…", "security-group sg-… (name)") is named once in the error line `last`; images and
/// snapshots are not temporary.
fn assert_each_named_once(last: &str, left: &[String]) {
    for what in left
        .iter()
        .filter(|l| !l.starts_with("image ") && !l.starts_with("snapshot "))
    {
        let (kind, rest) = what.split_once(' ').expect("kind and id");
        let name = rest.split_whitespace().next().expect("id");
        let kind = kind.replace('-', " ");
        assert!(
            last.contains(&format!("{kind} {name}")),
            "{what} is not named: {last}"
        );
        assert_eq!(last.matches(name).count(), 1, "{name} twice: {last}");
    }
}

#[test]
fn after_sigkill_gc_finds_and_removes_what_the_build_left() {
    let Some(q) = quick() else { return };
    let mut child = spawn(q.build("steps:\n  - name: long\n    run: echo started; sleep 60\n"));
    let (lines, id) = follow(&mut child);
    wait_for_line(&lines, "started");
    sshd::kill(&[child.id()], "KILL");
    let _ = finish(child, lines);
    let left = q.moto.resources(REGION).tagged_with_build(&id);
    assert!(left.iter().any(|l| l.starts_with("instance ")), "{left:?}");
    assert!(left.iter().any(|l| l.starts_with("key-pair ")), "{left:?}");
    assert!(
        left.iter().any(|l| l.starts_with("security-group ")),
        "{left:?}"
    );

    let gc = |extra: &[&str]| {
        let mut c = jbake();
        q.moto.apply_env(&mut c);
        c.args([
            "gc",
            "--region",
            REGION,
            "--endpoint-url",
            &q.moto.endpoint(),
        ]);
        run(c, extra)
    };
    // A build that is not over and not expired is left alone by default.
    let out = gc(&[]);
    out.assert_code(0);
    assert_eq!(q.moto.resources(REGION).tagged_with_build(&id), left);
    // --dry-run lists, removes nothing.
    let out = gc(&["--build-id", &id, "--dry-run"]);
    out.assert_code(0);
    assert!(
        out.stderr.contains("would remove") || out.stdout.contains("would remove"),
        "{}",
        out.stderr
    );
    assert_eq!(q.moto.resources(REGION).tagged_with_build(&id), left);
    let out = gc(&["--older-than", "0s"]);
    out.assert_code(0);
    assert_nothing_left(&q.moto, &id);
    // Idempotent: nothing more to do.
    let out = gc(&["--older-than", "0s"]);
    out.assert_code(0);
    assert!(
        out.stderr.contains("nothing to remove") || out.stdout.contains("nothing to remove"),
        "{}",
        out.stderr
    );
}

#[test]
fn bad_input_is_refused_before_any_aws_call() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let good = recipe(
        dir.path(),
        "admin",
        "steps:\n  - name: x\n    run: 'true'\n",
    );
    let needs_var = write(
        dir.path(),
        "needs.yaml",
        &format!(
            "version: 1\nname: n\nbase: {{ ssm_parameter: {BASE_PARAM}, ssh_user: admin }}\n\
             vars:\n  efs_id: {{ required: true, pattern: '^fs-[0-9a-f]{{8}}$' }}\n\
             steps:\n  - name: x\n    run: echo {{{{ efs_id }}}}\n"
        ),
    );
    let malformed = write(dir.path(), "bad.yaml", "version: 1\nname: [oops\n");
    let g = good.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["build".into(), malformed.display().to_string()],
            "bad.yaml:",
        ),
        (
            vec!["build".into(), needs_var.display().to_string()],
            "missing required variable 'efs_id'",
        ),
        (
            vec![
                "build".into(),
                needs_var.display().to_string(),
                "--var".into(),
                "efs_id=nope".into(),
            ],
            "does not match",
        ),
        (
            vec![
                "build".into(),
                g.clone(),
                "--base-ami".into(),
                "ami-xyz".into(),
            ],
            "ami-xyz",
        ),
        (
            vec![
                "build".into(),
                g.clone(),
                "--subnet-id".into(),
                "sub".into(),
            ],
            "sub",
        ),
        (
            vec![
                "build".into(),
                g.clone(),
                "--ssh-cidr".into(),
                "10.0.0.0/40".into(),
            ],
            "CIDR",
        ),
        (
            vec![
                "build".into(),
                g.clone(),
                "--bastion".into(),
                "u@127.0.0.1".into(),
            ],
            "--bastion-identity",
        ),
        (
            vec!["controller".into(), "--efs-id".into(), "fs-12".into()],
            "fs-12",
        ),
        (vec!["controller".into()], "--efs-id"),
    ];
    moto.start_recording();
    for (args, needle) in &cases {
        let mut c = jbake();
        moto.apply_env(&mut c);
        c.args(args)
            .args(["--region", REGION, "--endpoint-url", &moto.endpoint()]);
        let out = run(c, &[]);
        out.assert_code(2);
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    // A region that is not a region name.
    let mut c = jbake();
    moto.apply_env(&mut c);
    let out = run(
        c,
        &[
            "build",
            &g,
            "--region",
            "Mars-1",
            "--endpoint-url",
            &moto.endpoint(),
        ],
    );
    out.assert_code(2);
    moto.stop_recording();
    let actions = moto.recorded_actions();
    assert!(actions.is_empty(), "bad input made AWS calls: {actions:?}");
}

// ---------------------------------------------------------------------------------------------
// Driving a running build.

pub(crate) fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn jbake")
}

/// Streams the child's stdout lines into a channel; returns it and the build id (the first
/// event).
pub(crate) fn follow(child: &mut Child) -> (mpsc::Receiver<String>, String) {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the build announces itself");
    let v: serde_json::Value = serde_json::from_str(&first).expect("JSON event");
    let id = v["message"]
        .as_str()
        .and_then(|m| m.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no build id in {first}"))
        .to_string();
    (rx, id)
}

/// The first line containing `needle` (within 2 minutes).
fn line_with(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("the build never printed {needle:?}");
}

pub(crate) fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains(needle) => return,
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("the build never printed {needle:?}");
}

pub(crate) fn finish(child: Child, lines: mpsc::Receiver<String>) -> Run {
    let out = child.wait_with_output().expect("wait for jbake");
    // The reader ends at EOF, shortly after the process.
    let mut stdout = Vec::new();
    while let Ok(l) = lines.recv_timeout(Duration::from_secs(10)) {
        stdout.push(l);
    }
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: stdout.join("\n"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// EC2 as it is on a real account (the fault proxy's realistic world): instance tier, whole builds.

/// moto behind a proxy whose realistic world is `config`, an nspawn instance the cloud-init
/// stand-in serves (and reports to the proxy: the instance is `pending` until then), a folder
/// for the recipe and manifest. Fields drop in order: folder, stand-in, instance, proxy, moto.
struct World {
    dir: tempfile::TempDir,
    cloud: CloudInit,
    vm: Instance,
    proxy: FaultProxy,
    moto: Moto,
}

fn world(name: &str, config: &str) -> Option<World> {
    if !prereq::instance_tier() || !prereq::moto() {
        return None;
    }
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    proxy.world(config);
    let vm = Instance::builder(name).up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    cloud.report_to(&proxy);
    Some(World {
        dir: tempfile::tempdir().expect("tempdir"),
        cloud,
        vm,
        proxy,
        moto,
    })
}

impl World {
    fn manifest(&self) -> PathBuf {
        self.dir.path().join("manifest.json")
    }

    /// `jbake build` of a recipe with `steps`, through the proxy.
    fn build(&self, steps: &str) -> Command {
        let r = recipe(self.dir.path(), &self.vm.user, steps);
        build_cmd(
            &self.moto,
            &self.proxy.endpoint(),
            &r,
            &self.vm.host,
            self.vm.port,
            &self.manifest(),
        )
    }

    fn gc(&self, extra: &[&str]) -> Run {
        let mut c = jbake();
        self.moto.apply_env(&mut c);
        c.args([
            "gc",
            "--region",
            REGION,
            "--endpoint-url",
            &self.proxy.endpoint(),
        ]);
        run(c, extra)
    }

    /// The world's faults of `kind` the proxy answered to `action`.
    fn faults(&self, action: &str, kind: &str) -> usize {
        self.proxy
            .log()
            .iter()
            .filter(|e| e.action == action && e.world.as_deref() == Some(kind))
            .count()
    }
}

const ONE_STEP: &str = "steps:\n  - name: Mark the image\n    file: { path: /etc/jbake-built, content: \"{{ version }}\\n\" }\n";

/// The image of a build, from moto.
fn image_of(moto: &Moto, ami: &str) -> crate::support::moto::ImageInfo {
    let res = moto.resources(REGION);
    res.images
        .into_iter()
        .find(|i| i.id == ami)
        .unwrap_or_else(|| panic!("{ami} is not in moto"))
}

#[test]
fn against_a_realistic_aws_a_build_succeeds_and_leaves_nothing() {
    let Some(w) = world("build-real", REALISTIC) else {
        return;
    };
    let t = std::time::Instant::now();
    w.moto.start_recording();
    let out = run(w.build(ONE_STEP), &[]);
    w.moto.stop_recording();
    eprintln!("a build against the realistic world: {:?}", t.elapsed());
    out.assert_code(0);
    let id = build_id_of(&out);
    let ami = finished(&out)["ami_id"]
        .as_str()
        .expect("ami_id")
        .to_string();
    // Every behaviour of the world happened during this one build.
    let stats = w.proxy.world_stats();
    eprintln!("the world injected: {stats:?}");
    for kind in [
        "not_found",
        "hidden",
        "pending",
        "stopping",
        "shutting-down",
        "image_pending",
        "throttle",
        "lost",
        "dependency",
    ] {
        assert!(
            stats.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} in {stats:?}"
        );
    }
    // Each lost create was adopted: one key pair, group, instance and image were made.
    let requests = w.moto.recorded_requests();
    let count = |action: &str| requests.iter().filter(|r| r.action == action).count();
    assert!(
        count("RunInstances") >= 2 && count("CreateImage") >= 2,
        "{requests:?}"
    );
    let res = w.moto.resources(REGION);
    let of_build =
        |tags: &std::collections::BTreeMap<String, String>| tags.get("jbake:build-id") == Some(&id);
    assert_eq!(
        res.instances.iter().filter(|i| of_build(&i.tags)).count(),
        1
    );
    assert_eq!(res.images.iter().filter(|i| of_build(&i.tags)).count(), 1);
    let image = image_of(&w.moto, &ami);
    assert_eq!(
        image.tags.get("jbake:complete").map(String::as_str),
        Some("true")
    );
    assert_eq!(image.imds_support.as_deref(), Some("v2.0"));
    for snap in &image.snapshot_ids {
        let s = res
            .snapshots
            .iter()
            .find(|s| &s.id == snap)
            .expect("snapshot");
        assert_eq!(s.tags.get("jbake:build-id"), Some(&id), "{s:?}");
    }
    assert_nothing_left(&w.moto, &id);
    assert_eq!(w.cloud.served().len(), 1, "{:?}", w.cloud.errors());
    // gc, in the same world, finds nothing to remove and keeps the image.
    let gc = w.gc(&["--older-than", "0s"]);
    gc.assert_code(0);
    assert!(gc.stderr.contains("nothing to remove"), "{}", gc.stderr);
    assert_eq!(image_of(&w.moto, &ami).state.as_deref(), Some("available"));
}

#[test]
fn ec2_not_knowing_what_it_just_made_is_waited_for() {
    // Each new instance, group and image is NotFound for its first 3 requests and missing from
    // lists for 2 s: the launch, the group's SSH rule and the image wait go on.
    let Some(w) = world(
        "build-notfound",
        r#"{"not_found": 3, "hide_s": 2, "pending_until_ready": true}"#,
    ) else {
        return;
    };
    let out = run(w.build(ONE_STEP), &[]);
    out.assert_code(0);
    let id = build_id_of(&out);
    for action in [
        "AuthorizeSecurityGroupIngress",
        "DescribeInstances",
        "DescribeImages",
    ] {
        assert!(
            w.faults(action, "not_found") > 0,
            "no NotFound for {action}: {:?}",
            w.proxy.log()
        );
    }
    assert!(
        out.stdout.contains("not visible yet"),
        "the wait says why: {}",
        out.stdout
    );
    assert_nothing_left(&w.moto, &id);
}

#[test]
fn snapshots_are_tagged_at_creation_and_no_path_leaks_one() {
    // The image (and its snapshots) stay pending for 20 s, without block device mappings: only
    // the build's tag tells which snapshots are its.
    let Some(w) = world(
        "build-snap",
        r#"{"pending_until_ready": true, "image_pending_s": 20}"#,
    ) else {
        return;
    };
    let before: Vec<String> = w
        .moto
        .resources(REGION)
        .snapshots
        .into_iter()
        .map(|s| s.id)
        .collect();

    // Interrupted while the image is being made: the image is deregistered and its snapshots
    // deleted (DeregisterImage alone keeps them).
    let mut child = spawn(w.build(ONE_STEP));
    let (lines, id) = follow(&mut child);
    wait_for_line(&lines, "to be available");
    let pending = w.moto.resources(REGION);
    let snaps: Vec<_> = pending
        .snapshots
        .iter()
        .filter(|s| s.tags.get("jbake:build-id") == Some(&id))
        .collect();
    assert_eq!(
        snaps.len(),
        1,
        "the snapshot is tagged at creation: {snaps:?}"
    );
    assert_eq!(
        snaps[0].tags.get("jbake:recipe").map(String::as_str),
        Some("jbake-test")
    );
    sshd::kill(&[child.id()], "INT");
    let out = finish(child, lines);
    out.assert_code(130);
    assert!(out.stdout.contains("removing image ami-"), "{}", out.stdout);
    assert_nothing_left(&w.moto, &id);

    // Killed (SIGKILL) while the image is being made: gc leaves the build while EC2 still makes
    // its image, then removes the instance, image and snapshot, group and key pair.
    let mut child = spawn(w.build(ONE_STEP));
    let (lines, killed) = follow(&mut child);
    wait_for_line(&lines, "to be available");
    sshd::kill(&[child.id()], "KILL");
    let _ = finish(child, lines);
    let spared = w.gc(&["--older-than", "0s"]);
    spared.assert_code(0);
    assert!(
        spared.stderr.contains(&format!("left build {killed}"))
            && spared.stderr.contains("is still pending"),
        "{}",
        spared.stderr
    );
    assert!(!w
        .moto
        .resources(REGION)
        .leftovers_of(Some(&killed))
        .is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let gc = w.gc(&["--older-than", "0s"]);
        gc.assert_code(0);
        if gc.stderr.contains("removed") {
            assert!(gc.stderr.contains("removing image ami-"), "{}", gc.stderr);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gc never removed it: {}",
            gc.stderr
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_nothing_left(&w.moto, &killed);
    let after: Vec<String> = w
        .moto
        .resources(REGION)
        .snapshots
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(after, before, "every snapshot the builds made is gone");
}

#[test]
fn a_lost_create_image_answer_adopts_the_image_it_made() {
    // The first CreateImage takes effect, its answer is lost (connection dropped, HTTP 500, or
    // no answer at all until the attempt's timeout: 2 s here, a minute in release builds); the
    // SDK's retry is refused (InvalidAMIName.Duplicate) and jbake adopts its image.
    let Some(w) = world("build-lost", BOOTS_LIKE_EC2) else {
        return;
    };
    for how in ["drop", "500", "hang"] {
        w.proxy.world(&format!(
            r#"{{"pending_until_ready": true, "lose_once": ["CreateImage", "RunInstances", "CreateSecurityGroup", "ImportKeyPair"], "lose_how": ["{how}"], "hang_s": 30}}"#
        ));
        let lost_before = w.faults("CreateImage", "lost");
        let mut cmd = w.build(ONE_STEP);
        cmd.env("JBAKE_TEST_ATTEMPT_TIMEOUT_MS", "2000");
        let t = std::time::Instant::now();
        let out = run(cmd, &["--force"]);
        eprintln!("lost answers ({how}): the build took {:?}", t.elapsed());
        out.assert_code(0);
        let id = build_id_of(&out);
        assert_eq!(w.faults("CreateImage", "lost") - lost_before, 1, "{how}");
        let res = w.moto.resources(REGION);
        let images: Vec<_> = res
            .images
            .iter()
            .filter(|i| i.tags.get("jbake:build-id") == Some(&id))
            .collect();
        assert_eq!(images.len(), 1, "{how}: {images:?}");
        assert_eq!(
            images[0].id,
            finished(&out)["ami_id"].as_str().unwrap_or_default()
        );
        let instances = res
            .instances
            .iter()
            .filter(|i| i.tags.get("jbake:build-id") == Some(&id))
            .count();
        assert_eq!(
            instances, 1,
            "{how}: RunInstances is idempotent by its client token"
        );
        assert_nothing_left(&w.moto, &id);
    }
}

#[test]
fn the_image_number_is_confirmed_at_create_image_time() {
    let Some(w) = world("build-number", BOOTS_LIKE_EC2) else {
        return;
    };
    // jbake's CreateImage waits in the proxy until the test lets it go.
    w.proxy
        .set(r#"[{"action": "CreateImage", "hold": "create-image", "times": 1}]"#);
    let mut child = spawn(w.build(ONE_STEP));
    let (lines, id) = follow(&mut child);
    // CreateImage of the version this build planned (and reserved on its key pair)...
    let line = line_with(&lines, "creating image jbake-test-");
    let message = serde_json::from_str::<serde_json::Value>(&line).expect("JSON")["message"]
        .as_str()
        .expect("message")
        .to_string();
    let planned = message
        .strip_prefix("creating image jbake-test-")
        .expect("the image's name")
        .to_string();
    let reserved = w
        .moto
        .resources(REGION)
        .key_pairs
        .into_iter()
        .find(|k| k.tags.get("jbake:build-id") == Some(&id))
        .and_then(|k| k.tags.get("jbake:version").cloned());
    assert_eq!(reserved.as_deref(), Some(planned.as_str()));
    // ... is taken by another build's image while its CreateImage is on the way.
    let taken = w.moto.awsctl(
        "register-image",
        serde_json::json!({
            "name": format!("jbake-test-{planned}"),
            "region": REGION,
            "tags": {"jbake:build-id": "20000101-000000-0ther0", "jbake:recipe": "jbake-test", "jbake:complete": "true"},
        }),
    );
    w.proxy.release("create-image");
    let out = finish(child, lines);
    out.assert_code(0);
    let result = finished(&out);
    let (day, n) = planned.rsplit_once('-').expect("DAY-N");
    let next = format!("{day}-{}", n.parse::<u32>().expect("N") + 1);
    assert_eq!(result["version"], next.as_str(), "{}", out.stdout);
    assert_eq!(result["name"], format!("jbake-test-{next}"));
    assert!(
        out.stdout.contains(&format!(
            "image name jbake-test-{planned} was taken meanwhile"
        )),
        "{}",
        out.stdout
    );
    assert!(taken["image_id"].is_string());
    assert_nothing_left(&w.moto, &id);
}

#[test]
fn two_builds_of_one_recipe_at_once_both_finish_with_distinct_versions() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    proxy.world(BOOTS_LIKE_EC2);
    // Two machines; each build launches its own instance type, so the cloud-init stand-ins
    // each serve one of them.
    let (a, b) = (
        Instance::builder("build-twin-a").up(),
        Instance::builder("build-twin-b").up(),
    );
    let cloud_a = CloudInit::for_instance_of_type(&moto, &a, "t3.micro");
    let cloud_b = CloudInit::for_instance_of_type(&moto, &b, "t3.small");
    cloud_a.report_to(&proxy);
    cloud_b.report_to(&proxy);
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(dir.path(), &a.user, ONE_STEP);
    let manifest = dir.path().join("manifest.json");
    let first = spawn({
        let mut c = build_cmd(&moto, &proxy.endpoint(), &r, &a.host, a.port, &manifest);
        c.args(["--instance-type", "t3.micro"]);
        c
    });
    let second = spawn({
        let mut c = build_cmd(&moto, &proxy.endpoint(), &r, &b.host, b.port, &manifest);
        c.args(["--instance-type", "t3.small"]);
        c
    });
    let outs: Vec<Run> = [first, second]
        .into_iter()
        .map(|c| Run::from_output(c.wait_with_output().expect("wait for jbake")))
        .collect();
    let mut versions = Vec::new();
    for out in &outs {
        out.assert_code(0);
        let result = finished(out);
        assert_eq!(result["skipped_unchanged"], false);
        let ami = result["ami_id"].as_str().expect("ami_id");
        assert_eq!(
            image_of(&moto, ami)
                .tags
                .get("jbake:complete")
                .map(String::as_str),
            Some("true")
        );
        versions.push(result["version"].as_str().expect("version").to_string());
        assert_nothing_left(&moto, &build_id_of(out));
    }
    assert_ne!(versions[0], versions[1], "two builds, two versions");
    // Both are in the one manifest (it is rewritten atomically, never clobbered).
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).expect("manifest")).expect("json");
    assert_eq!(m["builds"].as_array().map(Vec::len), Some(2), "{m}");
}

#[test]
fn gc_spares_a_build_still_making_its_image() {
    let Some(w) = world(
        "build-busy",
        r#"{"pending_until_ready": true, "image_pending_s": 25}"#,
    ) else {
        return;
    };
    let mut build = w.build(ONE_STEP);
    build.args(["--image-timeout", "3h"]);
    let mut child = spawn(build);
    let (lines, id) = follow(&mut child);
    wait_for_line(&lines, "to be available");
    // Even taken for over (--older-than 0s, or by its id), it is left while its image is made.
    for extra in [vec!["--older-than", "0s"], vec!["--build-id", id.as_str()]] {
        let gc = w.gc(&extra);
        gc.assert_code(0);
        assert!(
            gc.stderr.contains(&format!("left build {id}"))
                && gc.stderr.contains("is still pending"),
            "{extra:?}: {}",
            gc.stderr
        );
        assert!(!gc.stderr.contains("removing"), "{}", gc.stderr);
    }
    // Its expires-at says how long it may still take (the image wait, --image-timeout 3h).
    let res = w.moto.resources(REGION);
    let image = res
        .images
        .iter()
        .find(|i| i.tags.get("jbake:build-id") == Some(&id))
        .expect("the image being made");
    let instance = res
        .instances
        .iter()
        .find(|i| i.tags.get("jbake:build-id") == Some(&id))
        .expect("the instance");
    let time = |t: &std::collections::BTreeMap<String, String>| {
        humantime::parse_rfc3339_weak(t.get("jbake:expires-at").expect("expires-at"))
            .expect("a time")
    };
    assert!(
        time(&image.tags) >= time(&instance.tags) + Duration::from_secs(3600),
        "{:?} vs {:?}",
        image.tags,
        instance.tags
    );
    let out = finish(child, lines);
    out.assert_code(0);
    assert_nothing_left(&w.moto, &id);
}

#[test]
fn soak_20_builds_with_random_faults_and_interrupts_leave_nothing() {
    use rand::{Rng, SeedableRng};
    // Reproducible: JBAKE_SOAK_SEED=N replays a run; JBAKE_SOAK_BUILDS the count.
    let seed: u64 = std::env::var("JBAKE_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261130);
    let builds: u64 = std::env::var("JBAKE_SOAK_BUILDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let Some(w) = world("build-soak", BOOTS_LIKE_EC2) else {
        return;
    };
    let t0 = std::time::Instant::now();
    let mut tally: std::collections::BTreeMap<String, u64> = Default::default();
    let mut outcomes = Vec::new();
    for n in 0..builds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(n));
        w.proxy.world(&format!(
            r#"{{"seed": {}, "not_found": {}, "hide_s": 1, "pending_until_ready": true,
                "stopping_s": 1, "shutting_down_s": 1, "group_busy_s": 1, "group_in_use": 1, "image_pending_s": 2,
                "throttle_p": 0.04, "throttle_burst": 2, "lose_p": 0.15,
                "lose_actions": ["ImportKeyPair", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress",
                    "RunInstances", "StopInstances", "CreateImage", "ModifyImageAttribute", "CreateTags",
                    "TerminateInstances", "DeleteSecurityGroup", "DeleteKeyPair", "DeregisterImage",
                    "DeleteSnapshot", "DescribeInstances", "DescribeImages"]}}"#,
            seed.wrapping_add(n),
            rng.gen_range(0..=3)
        ));
        // 60% of the builds get a signal at a random moment.
        let interrupt = if rng.gen_bool(0.6) {
            let signal = ["INT", "TERM", "HUP"][rng.gen_range(0..3)];
            Some((signal, Duration::from_millis(rng.gen_range(300..12_000))))
        } else {
            None
        };
        let t = std::time::Instant::now();
        let mut build = w.build(
            "steps:\n  - name: Mark the image\n    file: { path: /etc/jbake-built, content: \"{{ version }}\\n\" }\n\
             \x20 - name: a while\n    run: sleep 1\n",
        );
        build.arg("--force");
        let mut child = spawn(build);
        let (lines, id) = follow(&mut child);
        if let Some((signal, after)) = interrupt {
            std::thread::sleep(after.saturating_sub(t.elapsed()));
            sshd::kill(&[child.id()], signal);
        }
        let out = finish(child, lines);
        let took = t.elapsed();
        let outcome = match (out.code, interrupt) {
            (0, _) => {
                assert_eq!(finished(&out)["skipped_unchanged"], false, "{}", out.stdout);
                "built"
            }
            (130, Some((signal, _))) => {
                assert!(
                    out.stderr.contains(&format!("interrupted (SIG{signal}) (build {id}); its temporary resources were removed")),
                    "build {n} (seed {}): {}",
                    seed.wrapping_add(n),
                    out.stderr
                );
                "interrupted"
            }
            (code, _) => panic!(
                "build {n} (seed {}) exited {code} ({interrupt:?}):\n{}\n{}",
                seed.wrapping_add(n),
                out.stdout,
                out.stderr
            ),
        };
        let left = w.moto.resources(REGION).leftovers_of(None);
        assert!(
            left.is_empty(),
            "build {n} (seed {}) left {left:?}",
            seed.wrapping_add(n)
        );
        for (k, v) in w.proxy.world_stats() {
            *tally.entry(k).or_default() += v;
        }
        eprintln!(
            "soak {n:2}: {outcome:11} in {took:>8.1?} ({})",
            interrupt
                .map(|(s, a)| format!("SIG{s} after {a:.1?}"))
                .unwrap_or_else(|| "no signal".into())
        );
        outcomes.push(outcome);
    }
    let built = outcomes.iter().filter(|o| **o == "built").count();
    eprintln!(
        "soak: {builds} builds (seed {seed}) in {:.1?}: {built} built, {} interrupted, 0 resources left; faults injected: {tally:?}",
        t0.elapsed(),
        outcomes.len() - built
    );
    assert!(built > 0 && built < outcomes.len(), "{outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// Quick tier: no input makes jbake panic or lose its cleanup.

#[test]
fn no_input_makes_jbake_panic() {
    let Some(q) = quick() else { return };
    // Durations past what a clock can hold: refused, or no deadline at all; never a panic.
    let r = recipe(
        q.dir.path(),
        q.sshd.user(),
        "steps:\n  - name: forever\n    timeout: 99999999999h\n    run: 'true'\n\
         \x20 - name: fails\n    run: exit 3\n  - name: never\n    reboot: { timeout: 99999999999h }\n",
    );
    q.boot.set(BOOTING);
    let mut c = jbake();
    q.moto.apply_env(&mut c);
    c.args(["build", &r.display().to_string(), "--region", REGION])
        .args(["--endpoint-url", &q.boot.endpoint(), "--output", "json"])
        .args([
            "--ssh-host",
            q.sshd.host(),
            "--ssh-port",
            &q.sshd.port().to_string(),
        ])
        .args(["--ssh-cidr", "127.0.0.1/32"])
        .args([
            "--connect-timeout",
            "99999999999h",
            "--image-timeout",
            "99999999999h",
        ])
        .args([
            "--manifest",
            &q.dir.path().join("m.json").display().to_string(),
        ]);
    let out = run(c, &[]);
    out.assert_code(1);
    assert!(out.stderr.contains("exited 3"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert_nothing_left(&q.moto, &build_id_of(&out));
    for ttl in ["99999999999999999999h", "200h", "30s"] {
        let out = run(
            q.build("steps:\n  - name: x\n    run: 'true'\n"),
            &["--ttl", ttl],
        );
        out.assert_code(2);
        assert!(out.stderr.contains("--ttl"), "{ttl}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    let mut gc = jbake();
    q.moto.apply_env(&mut gc);
    gc.args([
        "gc",
        "--region",
        REGION,
        "--endpoint-url",
        &q.moto.endpoint(),
    ]);
    let out = run(gc, &["--older-than", "99999999999h"]);
    out.assert_code(0);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn a_closed_output_pipe_does_not_stop_the_cleanup() {
    let Some(q) = quick() else { return };
    // `jbake build … | head -1`: the reader goes away after the first line.
    for interrupt in [false, true] {
        let steps = if interrupt {
            "steps:\n  - name: long\n    run: echo started; sleep 60\n"
        } else {
            "steps:\n  - name: fails\n    run: sleep 1; exit 3\n"
        };
        let mut child = q
            .build(steps)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn jbake");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("the first line");
        drop(child.stderr.take());
        let id = serde_json::from_str::<serde_json::Value>(&first).expect("JSON")["message"]
            .as_str()
            .and_then(|m| m.split_whitespace().nth(1))
            .expect("build id")
            .to_string();
        if interrupt {
            // Once its instance runs, Ctrl-C.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !q
                .moto
                .resources(REGION)
                .live_instances()
                .iter()
                .any(|i| i.tags.get("jbake:build-id") == Some(&id))
            {
                assert!(std::time::Instant::now() < deadline, "no instance");
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_secs(5));
            sshd::kill(&[child.id()], "INT");
        }
        let status = child.wait().expect("wait for jbake");
        assert_eq!(
            status.code(),
            Some(if interrupt { 130 } else { 1 }),
            "{status:?}"
        );
        assert_nothing_left(&q.moto, &id);
    }
}

#[test]
fn a_panicking_build_still_removes_what_it_made() {
    let Some(q) = quick() else { return };
    let mut c = q.build("steps:\n  - name: x\n    run: 'true'\n");
    // Debug builds only: the stage panics as it starts (key pair, group and instance exist).
    c.env("JBAKE_FAILPOINT", "panic:provision");
    let out = run(c, &[]);
    out.assert_code(1);
    let id = build_id_of(&out);
    assert!(
        out.stderr.contains(&format!(
            "error: build {id} stopped on an internal error (a bug in jbake: JBAKE_FAILPOINT: a panic in stage provision); its temporary resources were removed"
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("removing instance i-"),
        "{}",
        out.stdout
    );
    assert_nothing_left(&q.moto, &id);
}

#[test]
fn a_broken_manifest_is_refused_before_any_aws_call() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(
        dir.path(),
        "admin",
        "steps:\n  - name: x\n    run: 'true'\n",
    );
    let not_json = write(dir.path(), "not-json.json", "{ this is not json");
    let cases = [
        (not_json, "is not a jbake manifest"),
        (dir.path().to_path_buf(), "cannot read the manifest"),
        (
            dir.path().join("no/such/folder/m.json"),
            "cannot write the manifest",
        ),
    ];
    moto.start_recording();
    for (manifest, needle) in &cases {
        let out = run(
            build_cmd(&moto, &moto.endpoint(), &r, "127.0.0.1", 1, manifest),
            &[],
        );
        out.assert_code(2);
        assert!(out.stderr.contains(needle), "{manifest:?}: {}", out.stderr);
    }
    moto.stop_recording();
    assert!(
        moto.recorded_actions().is_empty(),
        "{:?}",
        moto.recorded_actions()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("not-json.json")).expect("read"),
        "{ this is not json",
        "a file that is not a manifest is left alone"
    );
}

#[test]
fn gc_removes_only_what_looks_like_jbakes() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("id");
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("run ssh-keygen")
        .success();
    assert!(ok);
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let plant = |id: &str, names: serde_json::Value| {
        let mut args = serde_json::json!({
            "build_id": id, "region": REGION, "public_key": public,
            "created": "2026-01-01T00:00:00Z", "expires": "2026-01-01T02:00:00Z",
        });
        if let (Some(a), Some(n)) = (args.as_object_mut(), names.as_object()) {
            a.extend(n.clone());
        }
        moto.awsctl("plant", args)
    };
    // What a killed build leaves...
    let genuine = "20260101-000000-a1b2c3";
    plant(
        genuine,
        serde_json::json!({
            "key_name": format!("jbake-{genuine}"), "group_name": format!("jbake-{genuine}"),
            "instance_key": format!("jbake-{genuine}"), "instance_name": format!("jbake build r {genuine}"),
            "image_name": "r-2026.01.01-1", "image_version": "2026.01.01-1",
        }),
    );
    // ... and someone's resources that carry a jbake tag but are not jbake's.
    let foreign = "20260101-000000-d4e5f6";
    let theirs = plant(
        foreign,
        serde_json::json!({
            "key_name": "prod-key", "group_name": "web", "instance_key": "prod-key",
            "instance_name": "web-1", "image_name": "golden", "image_version": "2026.01.01-1",
        }),
    );
    let mut gc = jbake();
    moto.apply_env(&mut gc);
    gc.args([
        "gc",
        "--region",
        REGION,
        "--endpoint-url",
        &moto.endpoint(),
        "--older-than",
        "0s",
    ]);
    let out = run(gc, &[]);
    out.assert_code(0);
    for (what, why) in [
        ("key pair prod-key", "jbake names a build's key pair"),
        ("security group", "jbake names a build's security group"),
        ("instance", "jbake's build instances use key pair"),
        ("image", "jbake names a build's image"),
    ] {
        assert!(
            out.stderr.contains(&format!("left {what}")) && out.stderr.contains(why),
            "{what}: {}",
            out.stderr
        );
    }
    // The genuine instance, image (with its snapshot), security group and key pair.
    assert!(out.stderr.contains("removed 4 resources"), "{}", out.stderr);
    let res = moto.resources(REGION);
    assert!(
        res.leftovers_of(Some(genuine)).is_empty(),
        "{:?}",
        res.leftovers_of(Some(genuine))
    );
    let left = res.leftovers_of(Some(foreign));
    for id in ["instance", "image", "group", "key_pair"] {
        let value = theirs[id].as_str().expect("planted");
        assert!(
            left.iter().any(|l| l.contains(value)),
            "{id} {value} was removed: {left:?}"
        );
    }
}

#[test]
fn the_public_ip_is_asked_over_https_only() {
    let Some(q) = quick() else { return };
    let checkip = CheckIp::start("203.0.113.7");
    let steps = "steps:\n  - name: x\n    run: 'true'\n";
    // No --ssh-cidr: the security group allows this machine's public IP, asked over HTTPS.
    let without_cidr = |url: &str, ca: Option<&Path>| {
        let r = recipe(q.dir.path(), q.sshd.user(), steps);
        let mut c = jbake();
        q.moto.apply_env(&mut c);
        q.boot.set("[]");
        c.args(["build", &r.display().to_string(), "--region", REGION])
            .args(["--endpoint-url", &q.boot.endpoint()])
            .args([
                "--ssh-host",
                "127.0.0.1",
                "--ssh-port",
                "1",
                "--connect-timeout",
                "1s",
            ])
            .args([
                "--manifest",
                &q.dir.path().join("m.json").display().to_string(),
            ])
            .env("JBAKE_CHECKIP_URL", url);
        // Untrusted: the system's CAs only (none of them signed the stand-in's certificate).
        match ca {
            Some(ca) => c.env("SSL_CERT_FILE", ca),
            None => c.env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
        };
        c
    };
    q.moto.start_recording();
    let out = run(without_cidr(&checkip.url(), Some(&checkip.ca())), &[]);
    q.moto.stop_recording();
    out.assert_code(1);
    let id = out
        .stderr
        .lines()
        .find_map(|l| l.split("build ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .expect("a build id")
        .to_string();
    let rule = q
        .moto
        .recorded_requests()
        .into_iter()
        .find(|r| r.action == "AuthorizeSecurityGroupIngress")
        .expect("the SSH rule");
    assert_eq!(
        rule.params
            .get("IpPermissions.1.IpRanges.1.CidrIp")
            .map(String::as_str),
        Some("203.0.113.7/32"),
        "{rule:?}"
    );
    assert_nothing_left(&q.moto, &id);
    // An endpoint whose certificate is not trusted: no address, nothing made is left.
    let out = run(without_cidr(&checkip.url(), None), &[]);
    out.assert_code(1);
    assert!(
        out.stderr
            .contains("cannot discover this machine's public IP")
            && out.stderr.contains("--ssh-cidr"),
        "{}",
        out.stderr
    );
    assert!(q.moto.resources(REGION).leftovers_of(None).is_empty());
    // Plain HTTP is refused before any AWS call (jbake's calls go through the proxy).
    let before = q.boot.log().len();
    let out = run(without_cidr("http://127.0.0.1:9/", None), &[]);
    out.assert_code(2);
    assert!(
        out.stderr.contains("is not an https:// URL"),
        "{}",
        out.stderr
    );
    assert_eq!(q.boot.log().len(), before, "{:?}", q.boot.log());
}

/// The image hygiene scrubs only the instance jbake launched: on a machine whose sshd host key
/// is not the one-time key jbake gave its instance (a test's sshd on the developer's machine,
/// a tunnel to the wrong host), it refuses and changes nothing. Run on a booted Debian, never
/// on this machine: if the guard failed, this machine would be scrubbed.
#[test]
fn hygiene_refuses_a_machine_that_is_not_the_launched_instance() {
    if !crate::support::prereq::instance_tier() {
        return;
    }
    let vm = crate::support::instance::Instance::builder("hygiene").up();
    let machine_id = vm.exec_ok("cat /etc/machine-id");
    let own = vm.exec_ok("cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub");
    let other = "AAAAC3NzaC1lZDI1NTE5AAAAIOtherHostKeyNotThisMachine0000000000000000";
    let refused = vm.exec(&jbake::bake::cloud_init::hygiene_script(
        "AAAAclientkey",
        other,
    ));
    assert_eq!(refused.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refusing to scrub this machine"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(
        vm.exec_ok("cat /etc/machine-id"),
        machine_id,
        "scrubbed anyway"
    );
    assert!(vm
        .exec("test -e /etc/ssh/ssh_host_ed25519_key")
        .status
        .success());
    // Its own host key: scrubbed (identity and host keys gone).
    let done = vm.exec(&jbake::bake::cloud_init::hygiene_script(
        "AAAAclientkey",
        &own,
    ));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(vm.exec_ok("cat /etc/machine-id"), "");
    assert!(!vm
        .exec("ls /etc/ssh/ssh_host_* 2>/dev/null | grep -q .")
        .status
        .success());
}
