//! The boot test, on the instance tier: `jbake build` against moto (behind the fault proxy) with
//! SSH going to an nspawn Debian machine; when the bake launches its test instance from the new
//! image, [`CloudInit`] archives the build machine's root file system (what EC2's CreateImage
//! snapshots) and boots a new machine from it, as EC2 boots an AMI: the image's own machine id
//! and host keys, the test's user-data host key and key pair installed as cloud-init does.
//!
//! The recipe: a service whose configuration lives in `{{ config_dir }}` (`/etc/app`), started
//! and validated on the build machine. With `--var config_dir=/var/tmp/app` it still passes every
//! build-time check, but the image hygiene empties /var/tmp, so on a fresh machine the service
//! fails: a first-boot defect only the boot test sees.
//!
//! Proven: a good image passes and is tagged `jbake:tested=true` (and `jbake test` passes it
//! again); the defective one fails, is kept tagged `jbake:tested=false`, the build exits 1,
//! `jbake roll` refuses it and `jbake prune` removes it; SIGINT during the test and API faults
//! (the fault proxy's realistic world, a refused launch) leave nothing. After each, moto's
//! instances, key pairs, security groups, images and snapshots are listed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::build::{
    assert_nothing_left, build_id_of, finish, finished, follow, spawn, tested_build_cmd,
    wait_for_line,
};
use crate::support::bake::{BOOTS_LIKE_EC2, REALISTIC};
use crate::support::cli::{jbake, write, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto, REGION};
use crate::support::prereq;
use crate::support::sshd;

/// moto's resources after a run: what is left of it, listed.
fn listing(moto: &Moto) -> String {
    let r = moto.resources(REGION);
    let instances: Vec<String> = r
        .instances
        .iter()
        .map(|i| format!("{} {}", i.id, i.state))
        .collect();
    let images: Vec<String> = r
        .images
        .iter()
        .map(|i| format!("{} {:?}", i.id, i.state))
        .collect();
    format!(
        "instances [{}], key pairs {:?}, security groups {:?}, images [{}], jbake's snapshots {:?}",
        instances.join(", "),
        r.key_pairs.iter().map(|k| &k.name).collect::<Vec<_>>(),
        r.security_groups
            .iter()
            .map(|g| &g.name)
            .collect::<Vec<_>>(),
        images.join(", "),
        r.snapshots
            .iter()
            .filter(|s| s.tags.contains_key("jbake:build-id"))
            .map(|s| &s.id)
            .collect::<Vec<_>>()
    )
}

/// Nothing is left of anything jbake made (instances, key pairs, security groups, images,
/// snapshots), complete images included.
#[track_caller]
fn assert_no_trace(lab: &Lab, id: &str) {
    let r = lab.moto.resources(REGION);
    let left = r.leftovers_of(None);
    assert!(left.is_empty(), "{id}: {left:?}");
    let live: Vec<&String> = r
        .live_instances()
        .into_iter()
        .filter(|i| i.tags.contains_key("jbake:build-id"))
        .map(|i| &i.id)
        .collect();
    assert!(live.is_empty(), "{}", listing(&lab.moto));
    let images: Vec<&String> = r
        .images
        .iter()
        .filter(|i| i.tags.contains_key("jbake:build-id"))
        .filter(|i| i.state.as_deref() != Some("deregistered"))
        .map(|i| &i.id)
        .collect();
    assert!(images.is_empty(), "images left: {}", listing(&lab.moto));
    let snapshots: Vec<&String> = r
        .snapshots
        .iter()
        .filter(|s| s.tags.contains_key("jbake:build-id"))
        .map(|s| &s.id)
        .collect();
    assert!(
        snapshots.is_empty(),
        "snapshots left: {}",
        listing(&lab.moto)
    );
    // The machines booted for test instances are gone with them.
    let t = Instant::now();
    while !lab.cloud.booted_running().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "test machines still up: {:?}",
            lab.cloud.booted_running()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("boot_test: after {id}: {}", listing(&lab.moto));
}

const RECIPE: &str = "boot-app";

fn prerequisites() -> bool {
    prereq::instance_tier() & prereq::moto()
}

/// The recipe (see the module's documentation), as `dir/recipe.yaml`.
fn app_recipe(dir: &Path, user: &str) -> PathBuf {
    write(
        dir,
        "recipe.yaml",
        &format!(
            r#"version: 1
name: {RECIPE}
base: {{ ssm_parameter: {param}, ssh_user: {user} }}
instance: {{ type: t3.micro, volume_gb: 8 }}
vars:
  config_dir: {{ default: /etc/app, pattern: '^(/[a-z0-9._-]+)+$', description: where the service's configuration lives }}
  test_pause: {{ default: "0", pattern: '^[0-9]+$', description: seconds the boot test's check waits first (to interrupt it) }}
steps:
  - name: the app service, its configuration in {{{{ config_dir }}}}
    run: |
      dir={{{{ config_dir }}}}
      mkdir -p "$dir"
      echo greeting=hello > "$dir/app.conf"
      printf '[Unit]\nDescription=app\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/cat %s/app.conf\n[Install]\nWantedBy=multi-user.target\n' "$dir" > /etc/systemd/system/app.service
      systemctl daemon-reload
      systemctl enable --now app.service
validate:
  - name: the app runs
    run: systemctl is-active --quiet app.service
test:
  - name: the app runs on a fresh instance
    run: |
      sleep {{{{ test_pause }}}}
      timeout 60 systemctl is-system-running --wait >/dev/null || true
      systemctl is-active --quiet app.service || {{ systemctl status --no-pager app.service >&2; exit 1; }}
"#,
            param = crate::support::bake::BASE_PARAM,
        ),
    )
}

/// A build machine, the cloud-init stand-in for it, a proxy whose world shows instances
/// pending until the stand-in served them. Fields drop in order: the stand-in (and the
/// machines it booted), the proxy, the build machine, moto, the folder.
struct Lab {
    cloud: CloudInit,
    proxy: FaultProxy,
    vm: Instance,
    moto: Moto,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(name: &str) -> Lab {
        Lab::in_world(name, BOOTS_LIKE_EC2)
    }

    /// With the proxy's world `config` (it must show instances pending until served).
    fn in_world(name: &str, config: &str) -> Lab {
        let moto = Moto::start();
        let vm = Instance::builder(name).up();
        let cloud = CloudInit::for_instance(&moto, &vm);
        let proxy = FaultProxy::start(&moto.endpoint());
        cloud.report_to(&proxy);
        proxy.world(config);
        Lab {
            moto,
            vm,
            cloud,
            proxy,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn build(&self) -> Command {
        let recipe = app_recipe(self.dir.path(), &self.vm.user);
        tested_build_cmd(
            &self.moto,
            &self.proxy.endpoint(),
            &recipe,
            &self.vm.host,
            self.vm.port,
            &self.dir.path().join("manifest.json"),
        )
    }

    /// `jbake test AMI` of the recipe, through the proxy.
    fn retest(&self, ami: &str, extra: &[&str]) -> Run {
        let recipe = app_recipe(self.dir.path(), &self.vm.user);
        let mut c = jbake();
        self.moto.apply_env(&mut c);
        c.args(["test", ami, "--region", REGION])
            .args(["--endpoint-url", &self.proxy.endpoint()])
            .args(["--recipe", &recipe.display().to_string()])
            .args(["--ssh-cidr", "127.0.0.1/32", "--connect-timeout", "60s"])
            .args(["--output", "json"])
            .args(extra);
        Run::from_output(c.output().expect("run jbake test"))
    }

    fn image(&self, ami: &str) -> crate::support::moto::ImageInfo {
        self.moto
            .resources(REGION)
            .images
            .into_iter()
            .find(|i| i.id == ami)
            .unwrap_or_else(|| panic!("{ami} is not in moto"))
    }
}

fn test_event(run: &Run) -> Value {
    run.events()
        .into_iter()
        .find(|e| e["event"] == "test_finished")
        .unwrap_or_else(|| panic!("no test_finished event: {}\n{}", run.stdout, run.stderr))
}

fn check_names(test: &Value) -> Vec<(String, String)> {
    test["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_string(),
                c["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn boot_test_a_good_image_passes_and_is_tagged_tested_and_jbake_test_passes_it_again() {
    if !prerequisites() {
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::new("bt-good");
    let t = Instant::now();
    let run = Run::from_output(lab.build().output().expect("run jbake build"));
    let took = t.elapsed();
    run.assert_code(0);
    let id = build_id_of(&run);
    let built = finished(&run);
    assert_eq!(built["tested"], true, "{}", run.stdout);
    let ami = built["ami_id"].as_str().expect("ami").to_string();
    let test = test_event(&run);
    assert_eq!(test["passed"], true, "{test}");
    assert_eq!(
        check_names(&test),
        [
            ("a machine id of its own", "ok"),
            ("host keys of its own", "ok"),
            ("no build key is authorized", "ok"),
            ("the app runs on a fresh instance", "ok"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let image = lab.image(&ami);
    assert_eq!(
        image.tags.get("jbake:tested").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        image.tags.get("jbake:complete").map(String::as_str),
        Some("true")
    );
    let tested_at = image
        .tags
        .get("jbake:tested-at")
        .cloned()
        .expect("tested-at");
    // The test instance was the image's, with a key pair and group of its own, and is gone.
    let res = lab.moto.resources(REGION);
    let test_instance = res
        .instances
        .iter()
        .find(|i| i.image_id.as_deref() == Some(ami.as_str()))
        .expect("an instance of the image");
    assert_eq!(test_instance.state, "terminated");
    assert_eq!(
        test_instance.key_name.as_deref(),
        Some(format!("jbake-{id}-test").as_str())
    );
    assert_eq!(
        test_instance.tags.get("Name").map(String::as_str),
        Some(format!("jbake test {RECIPE} {id}").as_str())
    );
    assert!(lab.cloud.booted_running().is_empty());
    assert_nothing_left(&lab.moto, &id);
    let served = lab.cloud.served();
    assert_eq!(served.len(), 2, "{served:?}");
    eprintln!(
        "boot_test: bake with its boot test in {took:.1?}; the test stage: {}",
        run.events()
            .iter()
            .filter(|e| e["event"] == "tested")
            .filter_map(|e| e["message"].as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );

    // `jbake test` of the image: a run of its own (own id on what it makes), the same checks,
    // the verdict written again.
    std::thread::sleep(Duration::from_millis(1100));
    let t = Instant::now();
    let again = lab.retest(&ami, &[]);
    eprintln!("boot_test: jbake test in {:.1?}", t.elapsed());
    again.assert_code(0);
    let result = again
        .events()
        .into_iter()
        .find(|e| e["event"] == "test_result")
        .unwrap_or_else(|| panic!("no result: {}", again.stdout));
    assert_eq!(result["result"]["passed"], true);
    assert_eq!(result["result"]["ami_id"], ami.as_str());
    let run_id = result["result"]["run_id"]
        .as_str()
        .expect("run id")
        .to_string();
    assert_ne!(run_id, id);
    assert_eq!(check_names(&test_event(&again)).len(), 4);
    let image = lab.image(&ami);
    assert_eq!(
        image.tags.get("jbake:tested").map(String::as_str),
        Some("true")
    );
    assert_ne!(
        image.tags.get("jbake:tested-at"),
        Some(&tested_at),
        "updated"
    );
    assert_nothing_left(&lab.moto, &run_id);
    assert_eq!(lab.cloud.served().len(), 3);
    eprintln!("boot_test: good image in {:.1?}", t0.elapsed());
}

#[test]
fn boot_test_a_first_boot_defect_fails_the_image_is_kept_failed_roll_refuses_it_and_prune_removes_it(
) {
    if !prerequisites() {
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::new("bt-defect");
    let defect = ["--var", "config_dir=/var/tmp/app"];
    let run = Run::from_output(lab.build().args(defect).output().expect("run jbake build"));
    eprintln!("boot_test: the defective bake in {:.1?}", t0.elapsed());
    run.assert_code(1);
    let id = build_id_of(&run);
    // Every build-time check passed: only a fresh machine shows the defect.
    let validate_ok = run.events().iter().any(|e| {
        e["event"] == "step_finished"
            && e["phase"] == "validate"
            && e["name"] == "the app runs"
            && e["status"] == "ok"
    });
    assert!(validate_ok, "{}", run.stdout);
    let test = test_event(&run);
    assert_eq!(test["passed"], false);
    let failed: Vec<String> = check_names(&test)
        .into_iter()
        .filter(|(_, s)| s == "failed")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(failed, ["the app runs on a fresh instance"]);
    let ami = test["image"].as_str().expect("image").to_string();
    for want in [
        format!("build {id} failed: image {ami} (boot-app-"),
        "failed its boot test: 1 of 4 checks failed".to_string(),
        "test check 4 'the app runs on a fresh instance' (".to_string(),
        "kept for debugging, tagged jbake:tested=false".to_string(),
    ] {
        assert!(run.stderr.contains(&want), "{want}: {}", run.stderr);
    }
    // Kept, complete, failed; never in the manifest; nothing else of the build left (the
    // test instance, its key pair and group included).
    let image = lab.image(&ami);
    assert_eq!(
        image.tags.get("jbake:tested").map(String::as_str),
        Some("false")
    );
    assert_eq!(
        image.tags.get("jbake:complete").map(String::as_str),
        Some("true")
    );
    assert!(image.tags.contains_key("jbake:tested-at"));
    assert!(!lab.dir.path().join("manifest.json").exists());
    assert_nothing_left(&lab.moto, &id);
    eprintln!("boot_test: after the failed test: {}", listing(&lab.moto));

    // `jbake test` of it, with the build's variables (no content hash warning): fails again.
    let again = lab.retest(&ami, &defect);
    again.assert_code(1);
    assert!(
        !again.stdout.contains("are not the ones"),
        "same inputs: {}",
        again.stdout
    );
    assert!(
        again.stderr.contains("failed its boot test"),
        "{}",
        again.stderr
    );
    let again_id = again
        .events()
        .into_iter()
        .find(|e| e["event"] == "test")
        .and_then(|e| e["message"].as_str().map(str::to_string))
        .and_then(|m| m.split_whitespace().nth(2).map(str::to_string))
        .expect("the test run's id");
    assert_nothing_left(&lab.moto, &again_id);

    // jbake roll refuses it, whatever the flags (before any change).
    let group_ami = lab.moto.create_image_fixture("jenkins-controller-old", &[]);
    crate::roll::fixture_py(
        &lab.moto.harness_env(),
        "setup",
        serde_json::json!({"name": crate::roll::GROUP, "ami": group_ami, "group_version": "1"}),
    );
    for extra in [&[][..], &["--allow-untested"][..]] {
        let mut c = jbake();
        lab.moto.apply_env(&mut c);
        c.args([
            "roll",
            "--region",
            REGION,
            "--yes",
            "--asg",
            crate::roll::GROUP,
        ])
        .args(["--ami", &ami, "--recipe", RECIPE])
        .args(["--jenkins-url", "http://127.0.0.1:9"])
        .args(extra);
        let refused = Run::from_output(c.output().expect("run jbake roll"));
        refused.assert_code(2);
        assert!(
            refused.stderr.contains(&format!("{ami} (boot-app-"))
                && refused
                    .stderr
                    .contains("failed its boot test (jbake:tested=false at "),
            "{}",
            refused.stderr
        );
    }

    // jbake prune removes it (it does not count among the newest N), snapshot included.
    let snapshots = image.snapshot_ids.clone();
    assert!(!snapshots.is_empty());
    let mut c = jbake();
    lab.moto.apply_env(&mut c);
    let pruned = Run::from_output(
        c.args([
            "prune", "--region", REGION, "--keep", "1", "--recipe", RECIPE,
        ])
        .output()
        .expect("run jbake prune"),
    );
    pruned.assert_code(0);
    assert!(
        pruned.stdout.contains(&format!("pruned {ami} "))
            && pruned.stdout.contains("(it failed its boot test)"),
        "{}",
        pruned.stdout
    );
    let r = lab.moto.resources(REGION);
    assert!(
        r.images
            .iter()
            .all(|i| i.id != ami || i.state.as_deref() == Some("deregistered")),
        "{}",
        listing(&lab.moto)
    );
    assert!(
        r.snapshots.iter().all(|s| !snapshots.contains(&s.id)),
        "{}",
        listing(&lab.moto)
    );
    assert_no_trace(&lab, &id);
    eprintln!("boot_test: defect in {:.1?}", t0.elapsed());
}

#[test]
fn boot_test_interrupted_by_sigint_during_its_checks_leaves_nothing() {
    if !prerequisites() {
        return;
    }
    let lab = Lab::new("bt-sigint");
    let mut child = spawn({
        let mut c = lab.build();
        c.args(["--var", "test_pause=60"]);
        c
    });
    let (lines, id) = follow(&mut child);
    // The slow check is running on the test instance.
    wait_for_line(
        &lines,
        r#""name":"the app runs on a fresh instance","number":4,"phase":"test""#,
    );
    assert_eq!(lab.cloud.booted_running().len(), 1);
    let t = Instant::now();
    sshd::kill(&[child.id()], "INT");
    let out = finish(child, lines);
    eprintln!(
        "boot_test: SIGINT during the test: exit {} after {:.1?}",
        out.code,
        t.elapsed()
    );
    out.assert_code(130);
    assert!(
        out.stderr.contains(&format!(
            "error: interrupted (SIGINT) (build {id}); its temporary resources were removed"
        )),
        "{}",
        out.stderr
    );
    // No verdict: the image goes with the rest (it was never complete).
    assert!(out.stdout.contains("removing image ami-"), "{}", out.stdout);
    assert_no_trace(&lab, &id);
}

#[test]
fn boot_test_against_a_realistic_aws_passes_and_a_refused_test_launch_leaves_nothing() {
    if !prerequisites() {
        return;
    }
    // The realistic world, and the boot test's own creates answered once lost too (their first
    // answers: the build's come first).
    let mut world: Value = serde_json::from_str(REALISTIC).expect("JSON");
    world["lose_nth"] = serde_json::json!({
        "ImportKeyPair": [2],
        "CreateSecurityGroup": [2],
        "AuthorizeSecurityGroupIngress": [2],
        "RunInstances": [2],
        "RevokeSecurityGroupEgress": [1],
    });
    let lab = Lab::in_world("bt-real", &world.to_string());
    let t = Instant::now();
    let run = Run::from_output(lab.build().output().expect("run jbake build"));
    eprintln!(
        "boot_test: realistic bake with its boot test in {:.1?}",
        t.elapsed()
    );
    run.assert_code(0);
    let id = build_id_of(&run);
    let ami = finished(&run)["ami_id"].as_str().expect("ami").to_string();
    assert_eq!(
        lab.image(&ami).tags.get("jbake:tested").map(String::as_str),
        Some("true")
    );
    assert_nothing_left(&lab.moto, &id);
    let stats = lab.proxy.world_stats();
    eprintln!("boot_test: the world injected {stats:?}");
    assert!(stats.get("lost").copied().unwrap_or(0) >= 15, "{stats:?}");
    // One test instance (its RunInstances answer was lost, the retry adopted it).
    let of_image = lab
        .moto
        .resources(REGION)
        .instances
        .iter()
        .filter(|i| i.image_id.as_deref() == Some(ami.as_str()))
        .count();
    assert_eq!(of_image, 1);
    assert!(lab.cloud.booted_running().is_empty());

    // EC2 refuses to launch the test instance: no verdict, the build fails and removes
    // everything, its image too.
    lab.proxy.world(BOOTS_LIKE_EC2);
    lab.proxy.set(
        r#"[{"action": "RunInstances", "after": "CreateImage", "status": 400,
             "code": "InsufficientInstanceCapacity",
             "message": "We currently do not have sufficient t3.micro capacity"}]"#,
    );
    // A second build machine: the first one is an image now (stopped).
    let vm2 = Instance::builder("bt-real2").up();
    let cloud2 = CloudInit::for_instance(&lab.moto, &vm2);
    cloud2.report_to(&lab.proxy);
    let recipe = app_recipe(lab.dir.path(), &vm2.user);
    let refused = Run::from_output(
        tested_build_cmd(
            &lab.moto,
            &lab.proxy.endpoint(),
            &recipe,
            &vm2.host,
            vm2.port,
            &lab.dir.path().join("manifest.json"),
        )
        .arg("--force")
        .output()
        .expect("run jbake build"),
    );
    refused.assert_code(1);
    let refused_id = build_id_of(&refused);
    assert!(
        refused.stderr.contains("InsufficientInstanceCapacity"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stdout.contains("removing image ami-"),
        "{}",
        refused.stdout
    );
    assert_nothing_left(&lab.moto, &refused_id);
    let r = lab.moto.resources(REGION);
    let live: Vec<&String> = r
        .images
        .iter()
        .filter(|i| i.tags.get("jbake:build-id") == Some(&refused_id))
        .filter(|i| i.state.as_deref() != Some("deregistered"))
        .map(|i| &i.id)
        .collect();
    assert!(live.is_empty(), "{}", listing(&lab.moto));
    assert!(
        r.snapshots
            .iter()
            .all(|s| s.tags.get("jbake:build-id") != Some(&refused_id)),
        "{}",
        listing(&lab.moto)
    );
    eprintln!(
        "boot_test: after the refused launch: {}",
        listing(&lab.moto)
    );
}
