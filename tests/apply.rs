//! `jbake apply` against a real OpenSSH server on 127.0.0.1 (quick tier): every step kind,
//! sudo and `user:`, templates, retries, timeouts, failures, host keys, lost connections.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::cli::{jbake, write, Run};
use crate::support::prereq;
use crate::support::sshd::Sshd;

/// `jbake apply RECIPE` against `sshd` with the pinned host key and JSON events.
fn apply(sshd: &Sshd, recipe: &Path, extra: &[&str]) -> Run {
    let mut c = jbake();
    c.args([
        "apply",
        &recipe.display().to_string(),
        "--target",
        &sshd.target(),
    ])
    .args(["--identity", &sshd.identity().display().to_string()])
    .args(["--host-key", sshd.host_key(), "--output", "json"])
    .args(extra);
    Run::from_output(c.output().expect("run jbake"))
}

fn recipe(dir: &Path, steps: &str) -> std::path::PathBuf {
    write(
        dir,
        "recipe.yaml",
        &format!(
            "version: 1\nname: quick\nbase: {{ ami: ami-0123456789abcdef0, ssh_user: admin }}\n{steps}"
        ),
    )
}

#[test]
fn every_step_kind_runs_and_is_idempotent() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let w = sshd.workdir();
    let w = w.display();
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "files/app.conf",
        "port={{ port }}\nregion={{ region }}\n",
    );
    write(dir.path(), "files/tree/a.txt", "a\n");
    write(dir.path(), "files/tree/sub/b.sh", "#!/bin/sh\necho b\n");
    std::fs::set_permissions(
        dir.path().join("files/tree/sub/b.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let r = recipe(
        dir.path(),
        &format!(
            r#"vars:
  port: {{ default: "8080" }}
  token: {{ secret: true, required: true }}
  extra: {{ default: "no" }}
steps:
  - name: as root
    run: id -u > {w}/root-uid; echo "from $GREETING"
    env: {{ GREETING: "jbake {{{{ port }}}}" }}
  - name: as the login user
    run: id -un > {w}/user-name; pwd > {w}/user-pwd
    user: jbake-test
  - name: a file
    file: {{ path: "{w}/conf/env", content: "TOKEN={{{{ token }}}}\n", mode: "0600", owner: jbake-test }}
  - name: a line
    line: {{ path: "{w}/fstab", line: "fs-1 /data nfs4 new 0 0", regexp: "^fs-1 " }}
  - name: a template
    upload: {{ src: app.conf, dest: "{w}/app.conf", mode: "0640", template: true }}
  - name: a folder
    upload: {{ src: tree, dest: "{w}/tree" }}
  - name: skipped by when
    run: touch {w}/never
    when: extra == "yes"
  - name: skipped by creates
    run: touch {w}/never2
    creates: "{w}/root-uid"
  - name: leaks nothing
    run: echo the token is {{{{ token }}}}
validate:
  - name: files are there
    run: test -s {w}/app.conf && test -x {w}/tree/sub/b.sh
"#
        ),
    );
    std::fs::write(
        sshd.workdir().join("fstab"),
        "proc /proc proc 0 0\nfs-1 /data nfs4 old 0 0\n",
    )
    .expect("seed fstab");
    let secret = "tok-3f9a7c1e55";
    let region = ["--region", "eu-west-1", "--var", &format!("token={secret}")];
    let first = apply(&sshd, &r, &region);
    first.assert_code(0);
    let read = |name: &str| std::fs::read_to_string(sshd.workdir().join(name)).unwrap_or_default();
    assert_eq!(
        read("root-uid").trim(),
        "0",
        "steps run as root through sudo"
    );
    assert_eq!(
        read("user-name").trim(),
        "jbake-test",
        "user: runs as that user"
    );
    assert_eq!(read("conf/env"), format!("TOKEN={secret}\n"));
    let meta = std::fs::metadata(sshd.workdir().join("conf/env")).expect("env file");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(
        read("fstab"),
        "proc /proc proc 0 0\nfs-1 /data nfs4 new 0 0\n"
    );
    assert_eq!(read("app.conf"), "port=8080\nregion=eu-west-1\n");
    assert_eq!(
        std::fs::metadata(sshd.workdir().join("app.conf"))
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0),
        0o640
    );
    assert_eq!(read("tree/a.txt"), "a\n");
    assert_eq!(
        std::fs::metadata(sshd.workdir().join("tree/sub/b.sh"))
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0),
        0o755,
        "an uploaded file keeps its local mode"
    );
    assert!(!sshd.workdir().join("never").exists());
    assert!(!sshd.workdir().join("never2").exists());
    let statuses: Vec<String> = first.statuses().into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        statuses,
        [
            "changed", "changed", "changed", "changed", "changed", "changed", "skipped", "skipped",
            "changed", "ok"
        ]
    );
    assert!(
        first.stdout.contains("from jbake 8080"),
        "env reaches the step"
    );
    assert!(
        !first.stdout.contains(secret) && !first.stderr.contains(secret),
        "secret leaked:\n{}",
        first.stdout
    );
    assert!(first.stdout.contains("the token is ****"));

    // Second run: the file steps find nothing to change.
    let second = apply(&sshd, &r, &region);
    second.assert_code(0);
    let statuses: Vec<String> = second.statuses().into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        &statuses[2..6],
        ["ok", "ok", "ok", "ok"],
        "file/line/upload are idempotent"
    );
    assert_eq!(read("fstab").matches("fs-1").count(), 1);
}

#[test]
fn a_failing_step_reports_where_what_and_its_last_lines() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(
        dir.path(),
        "steps:\n  - name: fine\n    run: 'true'\n  - name: Install Java\n    run: |\n      for i in $(seq 1 30); do echo line $i; done\n      echo 'E: Unable to locate package nope' >&2\n      exit 100\n  - name: never reached\n    run: 'true'\n",
    );
    let out = apply(&sshd, &r, &[]);
    out.assert_code(1);
    let err = &out.stderr;
    assert!(
        err.contains("step 2 'Install Java' (")
            && err.contains("recipe.yaml:7:5) exited 100 on jbake-test@127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("| E: Unable to locate package nope"), "{err}");
    assert!(
        err.contains("| line 30") && !err.contains("| line 5\n"),
        "keeps the last lines only:\n{err}"
    );
    assert_eq!(out.statuses().len(), 2, "stops at the first failure");
}

#[test]
fn retries_until_success() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = sshd.workdir().join("count");
    let r = recipe(
        dir.path(),
        &format!(
            "steps:\n  - name: flaky\n    run: |\n      n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n      [ $n -ge 3 ]\n    retries: 3\n    delay: 100ms\n",
            c = counter.display()
        ),
    );
    let out = apply(&sshd, &r, &[]);
    out.assert_code(0);
    let retries = out
        .events()
        .iter()
        .filter(|e| e["event"] == "step_retry")
        .count();
    assert_eq!(retries, 2);
    assert_eq!(
        std::fs::read_to_string(&counter).unwrap_or_default().trim(),
        "3"
    );

    let r = recipe(
        dir.path(),
        "steps:\n  - name: always fails\n    run: exit 4\n    retries: 1\n    delay: 50ms\n",
    );
    let out = apply(&sshd, &r, &[]);
    out.assert_code(1);
    assert!(
        out.stderr.contains("exited 4 (attempt 2 of 2)"),
        "{}",
        out.stderr
    );
}

fn pgrep(pattern: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", pattern])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn a_timeout_kills_the_remote_command() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // A child of the step's shell: the whole process group must die, not just `sh`.
    let r = recipe(
        dir.path(),
        "steps:\n  - name: hangs\n    run: sleep 4242 & sleep 4243\n    timeout: 1s\n",
    );
    let t = Instant::now();
    let out = apply(&sshd, &r, &[]);
    out.assert_code(1);
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(
        out.stderr
            .contains("timed out after 1.0s (the remote command was killed)"),
        "{}",
        out.stderr
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!pgrep("sleep 4243"), "the step's command still runs");
    assert!(
        !pgrep("sleep 4242"),
        "the step's background child still runs"
    );
}

#[test]
fn host_key_is_verified() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let other = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(
        dir.path(),
        &format!(
            "steps:\n  - name: x\n    run: touch {}/ran\n",
            sshd.workdir().display()
        ),
    );
    let identity = sshd.identity().display().to_string();
    let base = |extra: &[&str]| {
        let mut c = jbake();
        c.args([
            "apply",
            &r.display().to_string(),
            "--target",
            &sshd.target(),
            "--identity",
            &identity,
        ])
        .args(extra);
        Run::from_output(c.output().expect("run"))
    };
    // Pinned to another server's key: refused, and nothing ran.
    let out = base(&["--host-key", other.host_key()]);
    out.assert_code(1);
    assert!(
        out.stderr.contains("host key verification failed"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--host-key pins"), "{}", out.stderr);
    // known_hosts with a different key for this host: "CHANGED".
    let kh = dir.path().join("kh");
    let other_key = other.host_key().to_string();
    std::fs::write(&kh, format!("[127.0.0.1]:{} {other_key}\n", sshd.port())).expect("write kh");
    let out = base(&["--known-hosts", &kh.display().to_string()]);
    out.assert_code(1);
    assert!(out.stderr.contains("CHANGED"), "{}", out.stderr);
    // known_hosts without this host.
    std::fs::write(&kh, "[127.0.0.1]:1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n").expect("write kh");
    let out = base(&["--known-hosts", &kh.display().to_string()]);
    out.assert_code(1);
    assert!(out.stderr.contains("is not in"), "{}", out.stderr);
    assert!(!sshd.workdir().join("ran").exists());
    // The right known_hosts works; the insecure flag works and says so.
    let out = base(&["--known-hosts", &sshd.known_hosts().display().to_string()]);
    out.assert_code(0);
    let out = base(&["--insecure-ignore-host-key"]);
    out.assert_code(0);
    assert!(out.stderr.contains("without checking it"), "{}", out.stderr);
}

#[test]
fn connection_refused_is_retried_until_the_deadline() {
    if !prereq::quick_tier() {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().map(|a| a.port()).unwrap_or(1)
    }; // closed again: nothing listens there now
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(dir.path(), "steps:\n  - name: x\n    run: 'true'\n");
    let key = write(dir.path(), "key", "not used");
    let t = Instant::now();
    let out = Run::from_output(
        jbake()
            .args([
                "apply",
                &r.display().to_string(),
                "--target",
                &format!("u@127.0.0.1:{port}"),
            ])
            .args([
                "--identity",
                &key.display().to_string(),
                "--insecure-ignore-host-key",
            ])
            .args(["--connect-timeout", "1500ms"])
            .output()
            .expect("run"),
    );
    // The identity is checked before connecting: this one is not a key.
    out.assert_code(1);
    assert!(out.stderr.contains("cannot use identity"), "{}", out.stderr);

    let sshd = Sshd::start();
    let t2 = Instant::now();
    let out = Run::from_output(
        jbake()
            .args([
                "apply",
                &r.display().to_string(),
                "--target",
                &format!("u@127.0.0.1:{port}"),
            ])
            .args([
                "--identity",
                &sshd.identity().display().to_string(),
                "--insecure-ignore-host-key",
            ])
            .args(["--connect-timeout", "1500ms"])
            .output()
            .expect("run"),
    );
    out.assert_code(1);
    assert!(
        out.stderr.contains("could not connect to 127.0.0.1:"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("connection refused"), "{}", out.stderr);
    assert!(
        t2.elapsed() >= Duration::from_millis(1000),
        "it retried until the deadline"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_dropped_connection_mid_step_fails_clearly() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(
        dir.path(),
        "steps:\n  - name: long\n    run: echo started; sleep 30\n",
    );
    let mut child = jbake()
        .args([
            "apply",
            &r.display().to_string(),
            "--target",
            &sshd.target(),
        ])
        .args([
            "--identity",
            &sshd.identity().display().to_string(),
            "--host-key",
            sshd.host_key(),
        ])
        .args(["--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for_output(&mut child, "started");
    sshd.drop_connections();
    let out = Run::from_output(child.wait_with_output().expect("wait"));
    out.assert_code(1);
    assert!(
        out.stderr.contains("step 1 'long'") && out.stderr.contains("lost"),
        "{}",
        out.stderr
    );
}

#[test]
fn interrupt_exits_130() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(
        dir.path(),
        "steps:\n  - name: long\n    run: echo started; sleep 30\n",
    );
    for signal in ["-INT", "-TERM"] {
        let mut child = jbake()
            .args([
                "apply",
                &r.display().to_string(),
                "--target",
                &sshd.target(),
            ])
            .args([
                "--identity",
                &sshd.identity().display().to_string(),
                "--host-key",
                sshd.host_key(),
            ])
            .args(["--output", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        wait_for_output(&mut child, "started");
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let out = Run::from_output(child.wait_with_output().expect("wait"));
        out.assert_code(130);
        assert!(out.stderr.contains("interrupted"), "{}", out.stderr);
        assert!(
            out.stderr.contains("stopping the running step"),
            "{}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !pgrep("sleep 31415"),
            "the interrupted step still runs on the machine"
        );
    }
}

/// Reads the child's stdout until `needle` appears (then leaves the rest for wait_with_output).
fn wait_for_output(child: &mut std::process::Child, needle: &str) {
    use std::io::Read;
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {needle:?} in {:?}",
            String::from_utf8_lossy(&seen)
        );
        match stdout.read(&mut buf) {
            Ok(0) => panic!(
                "stdout closed before {needle:?}: {:?}",
                String::from_utf8_lossy(&seen)
            ),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn through_a_bastion_both_host_keys_are_checked() {
    if !prereq::quick_tier() {
        return;
    }
    let target = Sshd::start();
    let bastion = Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recipe(
        dir.path(),
        &format!(
            "steps:\n  - name: x\n    run: touch {}/ran\n",
            target.workdir().display()
        ),
    );
    let via = |bastion_key: &str| {
        apply(
            &target,
            &r,
            &[
                "--bastion",
                &bastion.target(),
                "--bastion-identity",
                &bastion.identity().display().to_string(),
                "--bastion-host-key",
                bastion_key,
            ],
        )
    };
    // The bastion presents another key than the pinned one: refused before the tunnel.
    let out = via(target.host_key());
    out.assert_code(1);
    assert!(
        out.stderr.contains(&format!(
            "host key verification failed for {}",
            bastion.target().split('@').nth(1).unwrap_or_default()
        )),
        "{}",
        out.stderr
    );
    assert!(!target.workdir().join("ran").exists());
    // The right keys: the step runs on the target, and the bastion saw the login.
    via(bastion.host_key()).assert_code(0);
    assert!(target.workdir().join("ran").exists());
    assert!(
        bastion.log_text().contains("Accepted publickey for"),
        "{}",
        bastion.log_text()
    );
    // A jump host that rejects the key fails at once (no retrying until the deadline).
    let out = apply(
        &target,
        &r,
        &[
            "--bastion",
            &bastion.target(),
            "--bastion-identity",
            &target.identity().display().to_string(),
            "--bastion-host-key",
            bastion.host_key(),
            "--connect-timeout",
            "5m",
        ],
    );
    out.assert_code(1);
    assert!(
        out.stderr.contains("did not accept the key"),
        "{}",
        out.stderr
    );
    // A bastion key file that does not exist is bad input (exit 2), before any connection.
    let out = apply(
        &target,
        &r,
        &[
            "--bastion",
            &bastion.target(),
            "--bastion-identity",
            "/nonexistent/key",
        ],
    );
    out.assert_code(2);
    assert!(out.stderr.contains("--bastion-identity"), "{}", out.stderr);
}
