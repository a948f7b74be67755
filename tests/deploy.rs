//! What `deploy/nightly/` ships to run `jbake nightly` unattended, tested as far as this machine
//! allows: the systemd service and timer on a booted Debian (`systemd-analyze verify` clean;
//! the timer enabled and scheduled; the service really runs jbake under its sandbox and its
//! failure shows in its status and journal); the crontab line and the Jenkinsfile's script run
//! with a stand-in `jbake` that records its arguments, which the real jbake then parses.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::cli::{self, jbake_bin, Run};
use crate::support::instance::Instance;
use crate::support::prereq;

fn deploy(file: &str) -> PathBuf {
    cli::root().join("deploy/nightly").join(file)
}

/// A stand-in `jbake` in `dir/bin`: writes its arguments (one per line) to `dir/argv` and
/// exits with the status in `dir/status` (0 if absent).
fn fake_jbake(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("jbake");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {0}/argv\nexit $(cat {0}/status 2>/dev/null || echo 0)\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// The arguments the stand-in recorded, given to the real jbake with an invalid `--max-age`
/// last: clap reads them all in order, so the only error must be that one (exit 2, before any
/// AWS call), which proves every other flag is one jbake takes.
fn assert_jbake_takes(dir: &Path) -> Vec<String> {
    let argv: Vec<String> = std::fs::read_to_string(dir.join("argv"))
        .expect("the stand-in jbake ran")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        argv.first().map(String::as_str),
        Some("nightly"),
        "{argv:?}"
    );
    let out = Command::new(jbake_bin())
        .args(&argv)
        .args(["--max-age", "1s"])
        .env_remove("AWS_REGION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let run = Run::from_output(out);
    run.assert_code(2);
    assert!(
        run.stderr.contains("--max-age 1s is under an hour"),
        "jbake did not take {argv:?}:\n{}",
        run.stderr
    );
    argv
}

#[test]
fn deploy_the_crontab_line_runs_a_quiet_nightly_jbake_accepts() {
    let text = std::fs::read_to_string(deploy("jbake-nightly.cron")).unwrap();
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.contains('='))
        .expect("a crontab line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() > 7, "{line}");
    // minute hour day month weekday user command (an /etc/cron.d line).
    for (f, max) in fields[..2].iter().zip([59u32, 23]) {
        let n: u32 = f.parse().unwrap_or_else(|_| panic!("{f} in {line}"));
        assert!(n <= max, "{line}");
    }
    assert_eq!(&fields[2..5], ["*", "*", "*"], "{line}");
    assert_eq!(fields[5], "root");
    let command = fields[6..].join(" ");
    assert!(command.contains("jbake nightly --quiet"), "{command}");
    assert!(
        text.contains("MAILTO="),
        "cron mails what it prints: MAILTO must be set"
    );
    let d = tempfile::tempdir().unwrap();
    let bin = fake_jbake(d.path());
    let state = d.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let command = command.replace("cd /var/lib/jbake", &format!("cd {}", state.display()));
    let status = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let argv = assert_jbake_takes(d.path());
    assert!(argv.contains(&"--roll".to_string()), "{argv:?}");
}

/// The `sh '''…'''` script of the Jenkinsfile's nightly stage.
fn jenkinsfile_script() -> String {
    let text = std::fs::read_to_string(deploy("Jenkinsfile")).unwrap();
    let start = text.find("sh '''").expect("an sh ''' step") + "sh '''".len();
    let end = start + text[start..].find("'''").expect("its end");
    text[start..end].to_string()
}

#[test]
fn deploy_the_jenkinsfile_runs_the_nightly_and_passes_on_its_status() {
    let script = jenkinsfile_script();
    let d = tempfile::tempdir().unwrap();
    let bin = fake_jbake(d.path());
    let run = |roll: &str, force: &str, status: u8| {
        std::fs::write(d.path().join("status"), status.to_string()).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("AWS_REGION", "eu-west-1")
            .env("EFS_ID", "fs-0123456789abcdef0")
            .env("JENKINS_CREDENTIALS", "/jenkins/api-credentials")
            .env("JBAKE_STATE", d.path().join("state"))
            .env("ROLL", roll)
            .env("FORCE", force)
            .env(
                "BUILD_URL",
                "https://jenkins.example.com/job/jbake-nightly/7/",
            )
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    assert_eq!(run("true", "false", 0).0, Some(0));
    let argv = assert_jbake_takes(d.path());
    assert!(
        argv.contains(&"--roll".to_string()) && !argv.contains(&"--force".to_string()),
        "{argv:?}"
    );
    assert_eq!(run("false", "true", 0).0, Some(0));
    let argv = assert_jbake_takes(d.path());
    assert!(
        !argv.contains(&"--roll".to_string()) && argv.contains(&"--force".to_string()),
        "{argv:?}"
    );
    // Another run holds the lock: not this build's failure; anything else is.
    let (code, out) = run("true", "false", 75);
    assert_eq!(code, Some(0));
    assert!(out.contains("another jbake nightly still runs"), "{out}");
    assert_eq!(run("true", "false", 1).0, Some(1));
    assert_eq!(run("true", "false", 130).0, Some(130));
}

#[test]
fn deploy_the_systemd_units_verify_and_run_jbake_on_a_real_systemd() {
    if !prereq::instance_tier() {
        return;
    }
    let vm = Instance::builder("deploy").up();
    let root = &vm.root;
    let put = |dest: &str, src: &Path, mode: u32| {
        let to = root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    put("/usr/local/bin/jbake", &jbake_bin(), 0o755);
    for unit in ["jbake-nightly.service", "jbake-nightly.timer"] {
        put(&format!("/etc/systemd/system/{unit}"), &deploy(unit), 0o644);
    }
    // An EFS id jbake refuses: the service runs jbake for real and fails before any AWS call.
    let env = root.join("etc/default/jbake-nightly");
    std::fs::write(
        &env,
        "JBAKE_NIGHTLY_ARGS=--region eu-west-1 --efs-id fs-notanid\n",
    )
    .unwrap();
    let verify = vm.exec(
        "systemd-analyze verify /etc/systemd/system/jbake-nightly.service /etc/systemd/system/jbake-nightly.timer",
    );
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    vm.exec_ok("systemctl daemon-reload && systemctl enable --now jbake-nightly.timer");
    let timers = vm.exec_ok("systemctl list-timers --all --no-pager jbake-nightly.timer");
    assert!(
        timers.contains("jbake-nightly.timer") && timers.contains("jbake-nightly.service"),
        "{timers}"
    );
    let props =
        vm.exec_ok("systemctl show -p Persistent -p RandomizedDelayUSec jbake-nightly.timer");
    assert!(
        props.contains("Persistent=yes") && props.contains("RandomizedDelayUSec=45min"),
        "{props}"
    );
    // Started now: jbake runs as a dynamic user in its sandbox, refuses the bad input (exit 2).
    let _ = vm.exec("systemctl start jbake-nightly.service");
    let show = vm
        .exec_ok("systemctl show -p Result -p ExecMainStatus -p ActiveState jbake-nightly.service");
    assert!(
        show.contains("ExecMainStatus=2") && show.contains("Result=exit-code"),
        "{show}"
    );
    let journal = vm.exec_ok("journalctl -u jbake-nightly.service --no-pager -o cat");
    assert!(
        journal.contains("'fs-notanid' is not an EFS file system id"),
        "{journal}"
    );
    // The state folder exists, private to the service.
    vm.exec_ok("test -d /var/lib/private/jbake");
}
