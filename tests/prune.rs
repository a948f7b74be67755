//! `jbake prune` against moto: per recipe the newest N stay, images something uses stay (an old
//! launch template version, a launch template version naming an SSM parameter, a stopped
//! instance), images jbake did not make are never touched, the rest go with their snapshots.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::support::cli::{self, Run};
use crate::support::moto::{Moto, REGION};

fn fixture(moto: &Moto, args: Value) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/prune_fixture.py"))
        .arg(args.to_string())
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(moto.harness_env());
    let out = cmd.output().expect("run prune_fixture.py");
    assert!(
        out.status.success(),
        "prune_fixture.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prune_fixture.py prints JSON")
}

/// A finished jbake image of `recipe`, version `YYYY.MM.DD-N`.
fn jbake_image(moto: &Moto, recipe: &str, version: &str) -> String {
    let name = format!("{recipe}-{version}");
    let build = format!("b-{}", version.replace('.', ""));
    moto.create_image_fixture(
        &name,
        &[
            ("jbake:recipe", recipe),
            ("jbake:build-id", &build),
            ("jbake:version", version),
            ("jbake:complete", "true"),
        ],
    )
}

fn prune(moto: &Moto, args: &[&str]) -> Run {
    let mut cmd = cli::jbake();
    moto.apply_env(&mut cmd);
    cmd.arg("prune").args(["--region", REGION]).args(args);
    Run::from_output(cmd.output().expect("run jbake prune"))
}

/// Image id → its snapshots, of every image moto still has.
fn images(moto: &Moto) -> BTreeMap<String, Vec<String>> {
    moto.resources(REGION)
        .images
        .into_iter()
        .map(|i| (i.id, i.snapshot_ids))
        .collect()
}

#[test]
fn prune_keeps_the_newest_and_every_used_image_and_removes_the_rest_with_their_snapshots() {
    let moto = Moto::start();
    // Six controller images, oldest first, and three agent images.
    let c: Vec<String> = (1..=6)
        .map(|d| jbake_image(&moto, "jenkins-controller", &format!("2026.11.0{d}-1")))
        .collect();
    let a: Vec<String> = (1..=3)
        .map(|d| jbake_image(&moto, "jenkins-agent", &format!("2026.11.0{d}-1")))
        .collect();
    // Not jbake's (no tags), and jbake-tagged but named otherwise: never touched.
    let foreign = moto.create_image_fixture("golden-2020", &[]);
    let renamed = moto.create_image_fixture(
        "hand-made",
        &[
            ("jbake:recipe", "jenkins-controller"),
            ("jbake:build-id", "b-x"),
            ("jbake:version", "2026.11.00-1"),
            ("jbake:complete", "true"),
        ],
    );
    // c[0]: only an old launch template version uses it. c[1]: only a stopped instance.
    // c[2]: a launch template version that names an SSM parameter holding it.
    moto.put_parameter("/jbake/jenkins-controller/latest", &c[2], false);
    let used = fixture(
        &moto,
        json!({
            "region": REGION,
            "template": { "name": "jenkins", "versions": [
                c[0], "resolve:ssm:/jbake/jenkins-controller/latest", c[5]
            ]},
            "stopped_instance": c[1],
        }),
    );
    let before = images(&moto);
    let n_before = before.len();

    // Dry run: nothing changes; it says why each image stays.
    moto.start_recording();
    let dry = prune(&moto, &["--keep", "2", "--dry-run"]);
    moto.stop_recording();
    dry.assert_code(0);
    let writes: Vec<String> = moto
        .recorded_actions()
        .into_iter()
        .filter(|a| !a.starts_with("Describe") && !a.starts_with("Get"))
        .collect();
    assert!(writes.is_empty(), "a dry run wrote: {writes:?}");
    assert_eq!(images(&moto), before);
    let out = &dry.stdout;
    let line = |id: &str| {
        out.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{out}"))
            .to_string()
    };
    let tid = used["template_id"].as_str().unwrap();
    let iid = used["instance_id"].as_str().unwrap();
    assert!(
        line(&c[0]).starts_with("keep")
            && line(&c[0]).contains(&format!("launch template {tid} (jenkins) version 1")),
        "{out}"
    );
    assert!(
        line(&c[1]).contains(&format!("instance {iid} (stopped)")),
        "{out}"
    );
    assert!(
        line(&c[2]).contains("through SSM parameter /jbake/jenkins-controller/latest"),
        "{out}"
    );
    assert!(line(&c[3]).starts_with("would prune"), "{out}");
    assert!(line(&c[4]).contains("number 2 of the newest 2"), "{out}");
    assert!(
        line(&c[5]).contains("the newest of its recipe") && line(&c[5]).contains("version 3"),
        "{out}"
    );
    assert!(line(&a[0]).starts_with("would prune"), "{out}");
    assert!(
        line(&renamed).starts_with("skip") && line(&renamed).contains("name is not"),
        "{out}"
    );
    assert!(!out.contains(&foreign), "a foreign image is listed:\n{out}");

    // For real: c[3] and a[0] go, with their snapshots; everything else stays.
    let run = prune(&moto, &["--keep", "2"]);
    run.assert_code(0);
    let after = images(&moto);
    let gone: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    assert_eq!(gone, {
        let mut g = vec![&c[3], &a[0]];
        g.sort();
        g
    });
    assert_eq!(after.len(), n_before - 2);
    let snapshots: Vec<String> = moto
        .resources(REGION)
        .snapshots
        .into_iter()
        .map(|s| s.id)
        .collect();
    for id in [&c[3], &a[0]] {
        for s in &before[id] {
            assert!(
                !snapshots.contains(s),
                "snapshot {s} of pruned {id} is left"
            );
        }
    }
    for (id, snaps) in &after {
        for s in snaps {
            assert!(
                snapshots.contains(s),
                "snapshot {s} of kept {id} was deleted"
            );
        }
    }
    assert!(run.stdout.contains("pruned 2 image(s)"), "{}", run.stdout);

    // Again: nothing more to do; --recipe limits it; JSON for machines.
    let again = prune(
        &moto,
        &[
            "--keep",
            "2",
            "--recipe",
            "jenkins-agent",
            "--output",
            "json",
        ],
    );
    again.assert_code(0);
    let report: Value = serde_json::from_str(again.stdout.trim()).unwrap();
    assert_eq!(report["pruned"], json!([]));
    assert_eq!(report["decisions"].as_array().unwrap().len(), 2);
}

#[test]
fn prune_refuses_bad_input_before_any_aws_call() {
    // No endpoint answers: bad flags must not get that far.
    for args in [
        vec!["--keep", "-1"],
        vec!["--keep", "x"],
        vec!["--region", "mars"],
    ] {
        let r = cli::run(&[&["prune"][..], &args[..]].concat());
        r.assert_code(2);
    }
}
