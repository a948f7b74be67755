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

use crate::support::bake::{BASE_PARAM, BOOTING};
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

/// `jbake build RECIPE` against `endpoint`, SSH to `host:port`, JSON events.
pub(crate) fn build_cmd(
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

/// Nothing of the build is alive in moto: no instance that is not terminated, no key pair, no
/// security group, no half-made image.
#[track_caller]
pub(crate) fn assert_nothing_left(moto: &Moto, build_id: &str) {
    let r = moto.resources(REGION);
    let left = r.tagged_with_build(build_id);
    let images: Vec<_> = r
        .images
        .iter()
        .filter(|i| i.tags.get("jbake:complete").map(String::as_str) == Some("false"))
        .collect();
    assert!(
        left.iter()
            .all(|l| l.starts_with("image ") || l.starts_with("snapshot "))
            && images.is_empty(),
        "build {build_id} left: {left:?} incomplete images {images:?}"
    );
    assert!(r.jbake_key_pairs().is_empty(), "{:?}", r.key_pairs);
    assert!(
        r.jbake_security_groups().is_empty(),
        "{:?}",
        r.security_groups
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
        r#"[{"action": "CreateImage", "status": 500, "code": "InternalError", "message": "injected"},
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
fn sigint_and_sigterm_stop_the_build_and_remove_everything() {
    let Some(q) = quick() else { return };
    for signal in ["INT", "TERM"] {
        let mut child = spawn(q.build("steps:\n  - name: long\n    run: echo started; sleep 60\n"));
        let (lines, id) = follow(&mut child);
        wait_for_line(&lines, "started");
        sshd::kill(&[child.id()], signal);
        let out = finish(child, lines);
        out.assert_code(130);
        assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
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
            "error: interrupted (build {id}); its cleanup failed, these are left: "
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
