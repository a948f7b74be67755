//! `jbake nightly`, the whole story against moto, two booted Debian instances (one per bake,
//! the two bakes run at once) and the controllers' world of the roll tests: the first night
//! bakes both images and rolls the controller; the second has nothing to do (quiet: prints
//! nothing, exit 0, launches nothing); a changed variable bakes the controller again and rolls
//! it; an overlapping run is refused at once (exit 75); a failed bake exits 1 and rolls nothing.
//! Every night ends with nothing temporary left in moto (instances, key pairs, security groups,
//! half-made images, snapshots).

use std::path::Path;
use std::time::Instant;

use crate::roll::{fixture, ImageModel, EFS};
use crate::support::cli::{self, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto, REGION};
use crate::support::{bake::BASE_PARAM, bake::BOOTS_LIKE_EC2, prereq};

/// A tiny controller recipe: the tags a controller image needs to be rollable (the fixture's
/// EFS, the lease), one step writing `marker`, and an optional failing step.
fn controller_recipe(dir: &Path) -> std::path::PathBuf {
    cli::write(
        dir,
        "recipes/controller.yaml",
        &format!(
            "version: 1\nname: jenkins-controller\n\
             base: {{ ssm_parameter: {BASE_PARAM}, ssh_user: admin }}\n\
             instance: {{ type: t3.small, volume_gb: 8 }}\n\
             vars:\n  efs_id: {{ required: true }}\n  marker: {{ default: one }}\n\
             tags:\n  jbake:efs-id: \"{{{{ efs_id }}}}\"\n  jbake:efs-path: /\n  jbake:home-lease: \"1\"\n  jbake:home-init: \"false\"\n  jbake:jenkins-version: 2.479.3\n\
             steps:\n  - name: the marker\n    file: {{ path: /etc/nightly-marker, content: \"{{{{ marker }}}}\\n\" }}\n"
        ),
    )
}

fn agent_recipe(dir: &Path) -> std::path::PathBuf {
    cli::write(
        dir,
        "recipes/agent.yaml",
        &format!(
            "version: 1\nname: jenkins-agent\n\
             base: {{ ssm_parameter: {BASE_PARAM}, ssh_user: admin }}\n\
             instance: {{ type: t3.medium, volume_gb: 8 }}\n\
             vars:\n  fail: {{ default: \"false\", pattern: '^(true|false)$' }}\n\
             steps:\n  - name: the agent marker\n    file: {{ path: /etc/nightly-agent, content: agent }}\n\
             \x20 - name: a step that fails when asked\n    when: fail == \"true\"\n    run: \"false\"\n"
        ),
    )
}

/// Nothing temporary of any bake is left: no build instance alive, no jbake key pair or
/// security group, no half-made image, no snapshot of one.
/// The disaster-recovery region the nights copy both images to.
const DR: &str = "us-west-2";

fn assert_nothing_left(moto: &Moto) {
    for region in [REGION, DR] {
        let left = moto.resources(region).leftovers_of(None);
        assert!(left.is_empty(), "left behind in {region}: {left:?}");
    }
}

/// The available copies of `ami` in the DR region.
fn copies_in_dr(moto: &Moto, ami: &str) -> Vec<String> {
    moto.resources(DR)
        .images
        .into_iter()
        .filter(|i| {
            i.tags.get("jbake:copy-of").map(String::as_str) == Some(ami)
                && i.state.as_deref() == Some("available")
        })
        .map(|i| i.id)
        .collect()
}

#[test]
fn nightly_bakes_both_at_once_rolls_when_needed_and_is_silent_when_nothing_changed() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let f = fixture("1");
    let proxy = FaultProxy::start(&f.moto.endpoint());
    proxy.world(BOOTS_LIKE_EC2);
    // The bakes' build instances are not controllers; the images they make behave as a
    // controller image of the fixture's Jenkins, on its JENKINS_HOME.
    f.jenkins.not_controllers_from(
        &f.moto
            .parameter(REGION, BASE_PARAM)
            .expect("the base image parameter")
            .value,
    );
    f.jenkins.default_image(ImageModel::new("2.479.3"));
    let vm_c = Instance::builder("nightly-c").up();
    let vm_a = Instance::builder("nightly-a").up();
    let ci_c = CloudInit::for_instance_of_type(&f.moto, &vm_c, "t3.small");
    let ci_a = CloudInit::for_instance_of_type(&f.moto, &vm_a, "t3.medium");
    ci_c.report_to(&proxy);
    ci_a.report_to(&proxy);
    // Where SSH to each bake's build instance goes: a boot test makes an image of its build
    // machine (the stand-in stops and archives it, as CreateImage snapshots an instance), so
    // every bake after the first gets a new one.
    let via = |vm: &Instance| format!("{}:{}", vm.host, vm.port);
    let c_via = std::cell::RefCell::new(via(&vm_c));
    let a_via = std::cell::RefCell::new(via(&vm_a));
    let fresh = |name: &str, instance_type: &str| {
        let vm = Instance::builder(name).up();
        let ci = CloudInit::for_instance_of_type(&f.moto, &vm, instance_type);
        ci.report_to(&proxy);
        (vm, ci)
    };
    let dir = tempfile::tempdir().unwrap();
    let (c_recipe, a_recipe) = (controller_recipe(dir.path()), agent_recipe(dir.path()));
    let manifest = dir.path().join("jbake-manifest.json");
    let night = |extra: &[&str]| -> (Run, std::time::Duration) {
        let mut cmd = cli::jbake();
        f.moto.apply_env(&mut cmd);
        cmd.env("AWS_ENDPOINT_URL", proxy.endpoint())
            .env_remove("BUILD_URL")
            .args(["nightly", "--region", REGION, "--efs-id", EFS, "--roll"])
            .arg("--controller-recipe")
            .arg(&c_recipe)
            .arg("--agent-recipe")
            .arg(&a_recipe)
            .args(["--controller-ssh-via", &c_via.borrow()])
            .args(["--agent-ssh-via", &a_via.borrow()])
            .args(["--ssh-cidr", "169.254.0.0/16", "--connect-timeout", "60s"])
            .args(["--jenkins-url", &f.jenkins.url(), "--health-timeout", "60s"])
            .args(["--copy-to", DR])
            .arg("--manifest")
            .arg(&manifest)
            .args(extra);
        let t = Instant::now();
        let run = Run::from_output(cmd.output().expect("run jbake nightly"));
        (run, t.elapsed())
    };

    // Night 1: both images are new; the controller is rolled to its image.
    let (first, took) = night(&["--output", "json"]);
    first.assert_code(0);
    let events = first.events();
    let summary = &events
        .iter()
        .find(|e| e["event"] == "nightly_finished")
        .unwrap_or_else(|| panic!("no summary:\n{}", first.stdout))["result"];
    assert_eq!(summary["controller"]["status"], "built", "{summary}");
    assert_eq!(summary["agent"]["status"], "built", "{summary}");
    assert_eq!(summary["roll"]["status"], "rolled", "{summary}");
    let controller_ami = summary["controller"]["ami"].as_str().unwrap().to_string();
    // Both bakes ran at once: each one's events are labelled, and they interleave.
    let labels: Vec<&str> = events.iter().filter_map(|e| e["bake"].as_str()).collect();
    let first_agent = labels.iter().position(|l| *l == "agent").unwrap();
    let last_controller = labels.iter().rposition(|l| *l == "controller").unwrap();
    assert!(
        first_agent < last_controller,
        "the bakes ran one after the other"
    );
    let running: Vec<String> = f.running().into_iter().map(|(_, ami)| ami).collect();
    assert_eq!(running, [controller_ami.as_str()]);
    // Both images copied to the DR region once their boot tests passed.
    let agent_ami = summary["agent"]["ami"].as_str().unwrap().to_string();
    for ami in [&controller_ami, &agent_ami] {
        assert_eq!(
            copies_in_dr(&f.moto, ami).len(),
            1,
            "a copy of {ami} in {DR}"
        );
    }
    assert_nothing_left(&f.moto);
    eprintln!("night 1 (two bakes at once, a roll): {took:?}");
    println!("bench: full-night {:.3}", took.as_secs_f64());

    // Night 2: nothing changed: quiet prints nothing, exit 0, nothing launched or written.
    f.moto.start_recording();
    let (second, took) = night(&["--quiet"]);
    f.moto.stop_recording();
    second.assert_code(0);
    assert_eq!((second.stdout.as_str(), second.stderr.as_str()), ("", ""));
    let writes: Vec<String> = f
        .moto
        .recorded_actions()
        .into_iter()
        .filter(|a| !a.starts_with("Describe") && !a.starts_with("Get") && !a.starts_with("List"))
        .filter(|a| !a.starts_with("PutParameter") && !a.starts_with("DeleteParameter"))
        .collect();
    assert!(
        writes.is_empty(),
        "a night with nothing to do wrote: {writes:?}"
    );
    eprintln!("night 2 (nothing to do): {took:?}");
    println!("bench: noop-night {:.3}", took.as_secs_f64());
    // bench/nightly asks for more of them (JBAKE_NIGHTLY_NOOP_RUNS) to time them.
    let runs: u32 = std::env::var("JBAKE_NIGHTLY_NOOP_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 1..runs {
        let (again, took) = night(&["--quiet"]);
        again.assert_code(0);
        assert_eq!(again.stdout, "");
        println!("bench: noop-night {:.3}", took.as_secs_f64());
    }

    // Night 3: a controller variable changed: its image is baked again (on a new build
    // machine) and rolled; the agent's is unchanged. Quiet: the roll's result line and the
    // summary, nothing else.
    drop((ci_c, vm_c));
    let (vm_c, ci_c) = fresh("nightly-c3", "t3.small");
    *c_via.borrow_mut() = via(&vm_c);
    let (third, _) = night(&["--quiet", "--controller-var", "marker=two"]);
    eprintln!(
        "night 3, as cron mails it:\n{}{}",
        third.stdout, third.stderr
    );
    third.assert_code(0);
    let lines: Vec<&str> = third.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", third.stdout);
    assert!(
        lines[0].starts_with("rolled group jenkins to "),
        "{}",
        third.stdout
    );
    assert!(third.stderr.is_empty(), "{}", third.stderr);
    assert!(
        third.stdout.contains(": done: controller built ")
            && third.stdout.contains("agent unchanged")
            && third.stdout.contains("rolled the controller to "),
        "{}",
        third.stdout
    );
    let running: Vec<String> = f.running().into_iter().map(|(_, a)| a).collect();
    assert_eq!(running.len(), 1);
    assert_ne!(
        running[0], controller_ami,
        "the new image was not rolled out"
    );
    assert_nothing_left(&f.moto);

    // An overlapping run is refused at once, naming the one that runs.
    let lock_path = dir.path().join(".jbake-nightly.lock");
    let (held, _) = jbake::nightly::NightlyLock::acquire(&lock_path).unwrap();
    let t = Instant::now();
    let (overlap, _) = night(&["--quiet"]);
    overlap.assert_code(75);
    assert!(
        overlap.stderr.contains(&format!(
            "another jbake nightly is running (pid {}",
            std::process::id()
        )),
        "{}",
        overlap.stderr
    );
    eprintln!("an overlapping run was refused in {:?}", t.elapsed());
    held.finish().unwrap();

    // A failed bake: exit 1, the failure said, nothing rolled (the controller image is new
    // again, but the night failed), nothing left.
    let before: Vec<String> = f.running().into_iter().map(|(_, a)| a).collect();
    drop((ci_c, vm_c, ci_a, vm_a));
    let (vm_c, ci_c) = fresh("nightly-c4", "t3.small");
    let (vm_a, ci_a) = fresh("nightly-a4", "t3.medium");
    *c_via.borrow_mut() = via(&vm_c);
    *a_via.borrow_mut() = via(&vm_a);
    let (failed, _) = night(&[
        "--quiet",
        "--controller-var",
        "marker=three",
        "--agent-var",
        "fail=true",
    ]);
    eprintln!(
        "the failed night, as cron mails it:\n{}{}",
        failed.stdout, failed.stderr
    );
    failed.assert_code(1);
    assert!(failed.stdout.contains(": FAILED: "), "{}", failed.stdout);
    assert!(
        failed
            .stdout
            .contains("nothing rolled (the agent bake did not succeed)"),
        "{}",
        failed.stdout
    );
    assert!(
        failed.stderr.contains("the agent bake")
            && failed.stderr.contains("a step that fails when asked"),
        "{}",
        failed.stderr
    );
    let after: Vec<String> = f.running().into_iter().map(|(_, a)| a).collect();
    assert_eq!(after, before, "a failed night rolled");
    assert_nothing_left(&f.moto);
    drop((ci_c, vm_c, ci_a, vm_a));
}
