//! `jbake keys` against moto: the key pair made locally and stored in SSM (private half only
//! there, as a SecureString), a rotation that agents and the controller follow without
//! downtime, its refusals, and an interrupted rotation that resumes with the same key.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::support::cli::{self, Run};
use crate::support::moto::{Moto, REGION};

const PREFIX: &str = "/test/jenkins";

fn keys(moto: &Moto, args: &[&str]) -> Run {
    Run::from_output(keys_cmd(moto, args).output().expect("run jbake keys"))
}

fn keys_cmd(moto: &Moto, args: &[&str]) -> Command {
    let mut cmd = cli::jbake();
    moto.apply_env(&mut cmd);
    cmd.arg("keys")
        .args(args)
        .args(["--region", REGION, "--prefix", PREFIX]);
    cmd
}

fn state(moto: &Moto) -> Value {
    let r = keys(moto, &["show", "--output", "json"]);
    r.assert_code(0);
    serde_json::from_str(r.stdout.trim()).unwrap()
}

/// `(type, value)` of an SSM parameter, or None.
fn parameter(moto: &Moto, name: &str) -> Option<(String, String)> {
    let code = format!(
        "import boto3, json\nssm = boto3.client('ssm')\ntry:\n    p = ssm.get_parameter(Name={name:?}, WithDecryption=True)['Parameter']\n    print(json.dumps([p['Type'], p['Value']]))\nexcept ssm.exceptions.ParameterNotFound:\n    print('null')\n"
    );
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(code).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(moto.harness_env());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every output of a run must be free of private key material.
fn no_private_key(r: &Run, private_values: &[String]) {
    for text in [&r.stdout, &r.stderr] {
        assert!(
            !text.contains("PRIVATE KEY"),
            "a private key was printed:\n{text}"
        );
        for v in private_values {
            for line in v
                .lines()
                .filter(|l| l.len() > 20 && !l.starts_with("-----"))
            {
                assert!(
                    !text.contains(line),
                    "private key material was printed:\n{text}"
                );
            }
        }
    }
}

fn fingerprints(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["fingerprint"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn keys_init_rotate_finish_keep_the_private_key_in_ssm_only() {
    let moto = Moto::start();
    let mut runs = Vec::new();
    assert_eq!(state(&moto)["phase"], "not-initialised");

    let init = keys(&moto, &["init"]);
    init.assert_code(0);
    assert!(
        init.stdout.contains("ssh-ed25519 SHA256:"),
        "{}",
        init.stdout
    );
    let (kind, first_private) = parameter(&moto, &format!("{PREFIX}/id_rsa")).unwrap();
    assert_eq!(kind, "SecureString");
    assert!(first_private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let (kind, public) = parameter(&moto, &format!("{PREFIX}/id_rsa.pub")).unwrap();
    assert_eq!(kind, "String");
    assert_eq!(public.lines().count(), 1);
    assert!(public.starts_with("ssh-ed25519 "));
    let s = state(&moto);
    assert_eq!(s["phase"], "steady");
    let first = s["controller"]["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fingerprints(&s, "accepted"), [first.as_str()]);
    runs.push(init);

    // Never twice: the existing key pair is not replaced by accident.
    let again = keys(&moto, &["init"]);
    again.assert_code(2);
    assert!(
        again
            .stderr
            .contains(&format!("{PREFIX}/id_rsa already exists")),
        "{}",
        again.stderr
    );

    // A rotation: agents accept both, the controller gets the new key.
    let rotate = keys(&moto, &["rotate", "--agent-sync", "0s"]);
    rotate.assert_code(0);
    let s = state(&moto);
    assert_eq!(s["phase"], "window-open");
    let second = s["controller"]["fingerprint"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    assert_eq!(
        fingerprints(&s, "accepted"),
        [first.clone(), second.clone()]
    );
    assert!(parameter(&moto, &format!("{PREFIX}/id_rsa.next")).is_none());
    let (_, second_private) = parameter(&moto, &format!("{PREFIX}/id_rsa")).unwrap();
    runs.push(rotate);

    // A second rotation before the window is closed is refused.
    let twice = keys(&moto, &["rotate", "--agent-sync", "0s"]);
    twice.assert_code(2);
    assert!(twice.stderr.contains("window is open"), "{}", twice.stderr);
    // finish refuses while the controller may still use the old key...
    let early = keys(&moto, &["finish"]);
    early.assert_code(2);
    assert!(
        early.stderr.contains("may still use the old one"),
        "{}",
        early.stderr
    );
    assert_eq!(state(&moto)["phase"], "window-open");
    // ...and closes the window once it has had the time.
    let finish = keys(&moto, &["finish", "--controller-sync", "0s"]);
    finish.assert_code(0);
    let s = state(&moto);
    assert_eq!(s["phase"], "steady");
    assert_eq!(fingerprints(&s, "accepted"), [second.as_str()]);
    runs.push(finish);
    let noop = keys(&moto, &["finish", "--controller-sync", "0s"]);
    noop.assert_code(0);

    for r in runs.iter().chain([&again, &twice, &early, &noop]) {
        no_private_key(r, &[first_private.clone(), second_private.clone()]);
    }
}

#[test]
fn keys_an_interrupted_rotation_resumes_with_the_same_key() {
    let moto = Moto::start();
    keys(&moto, &["init"]).assert_code(0);
    let before = state(&moto);
    let mut child = keys_cmd(&moto, &["rotate", "--agent-sync", "10m"])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("waiting") {
            break;
        }
    }
    assert!(seen.contains("waiting 10m00s for every agent"), "{seen}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{seen}");
    assert!(seen.contains("`jbake keys rotate` resumes it"), "{seen}");
    // Agents already accept the new key; the controller still has the old one.
    let s = state(&moto);
    assert_eq!(s["phase"], "rotation-pending");
    assert_eq!(s["controller"], before["controller"]);
    let pending = s["pending"]["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fingerprints(&s, "accepted").last(), Some(&pending));
    // finish refuses a rotation in the middle; rotate completes it with the same key.
    let f = keys(&moto, &["finish", "--controller-sync", "0s"]);
    f.assert_code(2);
    assert!(
        f.stderr.contains("rotation is not complete"),
        "{}",
        f.stderr
    );
    let resume = keys(&moto, &["rotate", "--agent-sync", "0s"]);
    resume.assert_code(0);
    assert!(
        resume.stderr.contains("resuming the rotation"),
        "{}",
        resume.stderr
    );
    let s = state(&moto);
    assert_eq!(s["phase"], "window-open");
    assert_eq!(
        s["controller"]["fingerprint"].as_str(),
        Some(pending.as_str())
    );
}

#[test]
fn keys_bad_input_exits_2_before_any_aws_call() {
    for args in [
        vec!["keys", "show", "--prefix", "relative/path"],
        vec!["keys", "show", "--prefix", "/aws/service/x"],
        vec!["keys", "rotate", "--agent-sync", "soon"],
        vec!["keys", "launch"],
    ] {
        let r = cli::run(&[&args[..], &["--region", REGION][..]].concat());
        r.assert_code(2);
    }
}
