//! Security properties of jbake, proven on real machines (issue 12):
//!
//! - hostile variable values: every variable of every shipped recipe, given each hostile value
//!   (`$(…)`, backquotes, `;`, a newline, quotes, options, a glob, a very long value, ...), is
//!   refused by `jbake validate` (exit 2) or lands verbatim as data on a real machine, where a
//!   canary file the value would create never appears;
//! - the agent image's key sync: the agent user (who runs every CI job's code) cannot make the
//!   root key sync write outside its home (symlinks, hard links, a race), the controller still
//!   logs in, a rotation (old + new keys, then the new one) is followed, and a key of the user's
//!   own is not accepted;
//! - secrets of every shape never appear in what apply, build and roll print (text and JSON,
//!   failures, `JBAKE_LOG=debug`), in the manifest, nor in the image's file system;
//! - hostile input files (alias bombs, deep nesting, huge scalars, NUL, invalid UTF-8, folders,
//!   devices, FIFOs) exit 2 with an `error:` line, in bounded memory, and mutated shipped
//!   recipes never make `recipe::load` panic.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::build::{build_cmd, build_id_of, recipe as build_recipe, run as run_cmd};
use crate::support::cli::{jbake, root, write, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto, REGION};
use crate::support::net::Forwarder;
use crate::support::prereq;
use crate::support::sshd::Sshd;

const EFS_ID: &str = "fs-0123456789abcdef0";

// ---------------------------------------------------------------------------------------------
// Hostile variable values.

/// Values a parameterised CI job could pass with `--var`. Those that would run a command
/// create `<canary>-<what>` on the machine.
fn hostile_values(canary: &str) -> Vec<(&'static str, String)> {
    vec![
        ("command substitution", format!("$(touch {canary}-subst)")),
        ("backquotes", format!("`touch {canary}-backquote`")),
        ("semicolon", format!("x; touch {canary}-semicolon")),
        ("pipe", format!("x | touch {canary}-pipe")),
        ("newline", format!("x\ntouch {canary}-newline")),
        ("quotes", format!("a'b\"c'; touch {canary}-quote; echo \"'")),
        ("variable", "$HOME${IFS}$(id)".to_string()),
        ("option", "--allow-unauthenticated".to_string()),
        (
            "apt option",
            "-oAPT::Get::AllowUnauthenticated=true".to_string(),
        ),
        ("end of options", "-- -x".to_string()),
        ("glob", "*".to_string()),
        ("path traversal", "../../../etc/shadow".to_string()),
        ("systemd specifier", "%h/%u".to_string()),
        ("trailing newline", "/var/lib/jenkins\n".to_string()),
        ("very long", format!("{}{canary}", "a".repeat(100_000))),
    ]
}

/// The variables a recipe declares (not the built-ins), from `jbake validate --output json`.
fn declared_vars(recipe: &str, base: &[&str]) -> Vec<String> {
    let out = Run::from_output(
        jbake()
            .args(["validate", recipe, "--output", "json"])
            .args(base)
            .output()
            .expect("run jbake"),
    );
    out.assert_code(0);
    let plan: Value = serde_json::from_str(&out.stdout).expect("the plan is JSON");
    plan["vars"]
        .as_array()
        .expect("vars")
        .iter()
        .filter(|v| v["source"] != "builtin" && v["source"] != "placeholder")
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn security_hostile_values_are_refused_or_land_as_data() {
    let canary = "/run/jbake-canary";
    let values = hostile_values(canary);
    let recipes: [(&str, &[&str]); 3] = [
        (
            "recipes/controller.yaml",
            &["--var", "efs_id=fs-0123456789abcdef0"],
        ),
        ("recipes/agent.yaml", &[]),
        ("recipes/demo.yaml", &[]),
    ];
    let t = Instant::now();
    let mut accepted: Vec<(String, String, &'static str, String)> = Vec::new();
    let mut table = Vec::new();
    for (recipe, base) in recipes {
        for var in declared_vars(recipe, base) {
            let mut refused = 0;
            for (what, value) in &values {
                let out = Run::from_output(
                    jbake()
                        .args(["validate", recipe])
                        .args(base)
                        .arg("--var")
                        .arg(format!("{var}={value}"))
                        .output()
                        .expect("run jbake"),
                );
                match out.code {
                    2 => {
                        assert!(
                            out.stderr.starts_with("error: ")
                                && out.stderr.contains(&format!("variable '{var}'")),
                            "{recipe} {var}={what}: {}",
                            out.stderr
                        );
                        refused += 1;
                    }
                    0 => accepted.push((recipe.to_string(), var.clone(), *what, value.clone())),
                    code => panic!("{recipe} {var}={what}: exit {code}\n{}", out.stderr),
                }
            }
            table.push(format!(
                "{recipe:<24} {var:<26} refused {refused:>2}/{}",
                values.len()
            ));
        }
    }
    eprintln!(
        "hostile values ({} kinds) at validate, in {:.1?}:\n  {}",
        values.len(),
        t.elapsed(),
        table.join("\n  ")
    );
    // Every variable of the controller and agent images has a pattern of safe characters; only
    // the demo's free-text greeting takes anything, and it is data (a file), never code.
    let free: BTreeSet<(String, String)> = accepted
        .iter()
        .map(|(r, v, _, _)| (r.clone(), v.clone()))
        .collect();
    assert_eq!(
        free,
        BTreeSet::from([("recipes/demo.yaml".to_string(), "greeting".to_string())]),
        "values accepted at validate: {:?}",
        accepted
            .iter()
            .map(|(r, v, w, _)| format!("{r} {v} {w}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        accepted.len(),
        values.len(),
        "the greeting takes every value"
    );

    // On a real machine: the demo recipe with the greeting set to all of them at once (one
    // value, a line each), then to the very long one. Each lands verbatim in the file and in
    // what the unit made of it; no canary appears.
    if !prereq::instance_tier() {
        return;
    }
    let vm = Instance::builder("sec-hostile").up();
    let combined: Vec<&str> = values
        .iter()
        .filter(|(w, _)| *w != "very long")
        .map(|(_, v)| v.as_str())
        .collect();
    let long = &values
        .iter()
        .find(|(w, _)| *w == "very long")
        .expect("long")
        .1;
    for greeting in [combined.join("\n"), long.clone()] {
        let t = Instant::now();
        let out = Run::from_output(
            jbake()
                .args(["apply", "recipes/demo.yaml", "--target", &vm.target()])
                .args(["--identity", &vm.identity.display().to_string()])
                .args(["--host-key", &vm.host_key, "--output", "json"])
                .arg("--var")
                .arg(format!("greeting={greeting}"))
                .output()
                .expect("run jbake"),
        );
        out.assert_code(0);
        eprintln!(
            "demo applied with a {}-byte hostile greeting in {:.1?}",
            greeting.len(),
            t.elapsed()
        );
        let file = vm.exec("cat /etc/jbake-demo.greeting");
        assert_eq!(
            String::from_utf8_lossy(&file.stdout),
            format!("{greeting}\n"),
            "the greeting lands verbatim"
        );
        let run = vm.exec("cat /run/jbake-demo");
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            format!("{greeting}\n")
        );
        let canaries = vm.exec_ok(&format!("ls -d {canary}* 2>/dev/null || true"));
        assert_eq!(canaries, "", "a hostile value ran a command");
    }
}

// ---------------------------------------------------------------------------------------------
// The agent image's key sync.

/// A fresh ed25519 key pair: (private key file, public key line).
fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("run ssh-keygen")
        .success();
    assert!(ok, "ssh-keygen failed");
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .expect("public key")
        .trim()
        .to_string();
    (path, public)
}

/// Logs in as `user` with `key` (host key pinned) and runs `id -un`.
fn ssh_as(vm: &Instance, user: &str, key: &Path) -> Option<String> {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", vm.known_hosts().display()))
        .arg(format!("{user}@{}", vm.host))
        .arg("id -un")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs the key sync now and waits until the key file holds `want` (the keys, one a line).
fn sync_until(vm: &Instance, want: &str) {
    let start = Instant::now();
    loop {
        vm.exec("systemctl start jbake-agent-key-sync.service");
        let got = vm.exec("cat /etc/ssh/authorized_keys/jenkins");
        if String::from_utf8_lossy(&got.stdout).trim() == want.trim() {
            return;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let journal = vm.exec("journalctl --no-pager -n 30 -u jbake-agent-key-sync");
            panic!(
                "the key file is not {want:?}: {:?}\n{}",
                String::from_utf8_lossy(&got.stdout),
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Files owned by the agent user outside its home, the folders an attacker would aim at, the
/// key file's owner, mode and link count (not its content, which a rotation changes), and the
/// checksums of root's files.
fn outside_home(vm: &Instance) -> String {
    vm.exec_ok(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /home/jenkins -o -path /run/user \\) \
         -prune -o \\( -user jenkins -o -group jenkins \\) -print | sort; \
         ls -la /etc/update-motd.d /etc/cron.d 2>&1; ls -A /etc/ssh /etc/ssh/authorized_keys; \
         stat -c '%n %U:%G %a links %h' /etc/ssh/authorized_keys/jenkins; \
         sha256sum /etc/shadow /etc/passwd /etc/sudoers 2>&1; true",
    )
}

#[test]
fn security_agent_key_sync_gives_the_agent_user_nothing_as_root() {
    if !prereq::instance_tier() || !prereq::moto() {
        return;
    }
    let total = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start();
    let (key1, pub1) = keypair(work.path(), "controller-1");
    let (key2, pub2) = keypair(work.path(), "controller-2");
    let (own_key, own_pub) = keypair(work.path(), "jobs-own");
    let param = "/devops-tools/jenkins/id_rsa.pub";
    moto.put_parameter(param, &pub1, true);

    // The agent recipe on a fresh Debian (a few packages only: the key sync is what matters).
    let vm = Instance::builder("sec-agent").up();
    let t = Instant::now();
    let out = Run::from_output(
        jbake()
            .args(["apply", "recipes/agent.yaml", "--target", &vm.target()])
            .args(["--identity", &vm.identity.display().to_string()])
            .args(["--host-key", &vm.host_key, "--output", "json"])
            .args([
                "--var",
                "agent_packages=make",
                "--var",
                "key_refresh_interval=2s",
            ])
            .output()
            .expect("run jbake"),
    );
    out.assert_code(0);
    eprintln!("agent recipe applied in {:.1?}", t.elapsed());
    // Boot-time state without a reboot: sshd reads the drop-in, SSM is moto.
    vm.exec_ok("systemctl reload ssh");
    let fwd = Forwarder::start(&vm.gateway, moto.port());
    vm.exec_ok(&format!(
        "printf 'AWS_REGION=us-east-1\\nAWS_ENDPOINT_URL_SSM={}/\\nAWS_ACCESS_KEY_ID=testing\\nAWS_SECRET_ACCESS_KEY=testing\\n' \
         > /etc/default/jbake-ssm && chmod 0600 /etc/default/jbake-ssm",
        fwd.url()
    ));
    sync_until(&vm, &pub1);
    assert_eq!(
        vm.exec_ok("stat -c '%U:%G %a' /etc/ssh/authorized_keys /etc/ssh/authorized_keys/jenkins"),
        "root:root 755\nroot:root 644"
    );
    assert_eq!(
        ssh_as(&vm, "jenkins", &key1).as_deref(),
        Some("jenkins"),
        "the controller logs in"
    );
    let before = outside_home(&vm);

    // The job's code, as the agent user: a key of its own in ~/.ssh/authorized_keys is not
    // accepted (only root decides who logs in as jenkins).
    let as_jenkins = |script: &str| vm.exec(&format!("runuser -u jenkins -- sh -c '{script}'"));
    as_jenkins(&format!(
        "mkdir -p ~/.ssh && echo \"{own_pub}\" > ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys"
    ));
    assert_eq!(
        ssh_as(&vm, "jenkins", &own_key),
        None,
        "a key of the user's own is refused"
    );

    // The symlink attack of the issue: ~/.ssh points at a folder root runs at login.
    as_jenkins("rm -rf ~/.ssh; ln -s /etc/update-motd.d ~/.ssh");
    // Hard links to root's files where root used to write (refused by the kernel's
    // protected_hardlinks, or harmless: root never writes there any more).
    as_jenkins(
        "mkdir -p ~/h; ln /etc/shadow ~/h/authorized_keys 2>/dev/null; \
         ln -s /etc/shadow ~/h/authorized_keys.jbake-tmp 2>/dev/null; true",
    );
    // Writes towards the root-owned key folder: refused.
    let tamper = as_jenkins(&format!(
        "echo \"{own_pub}\" >> /etc/ssh/authorized_keys/jenkins || exit 0; exit 7"
    ));
    assert_eq!(
        tamper.status.code(),
        Some(0),
        "jenkins cannot write its key file"
    );
    // A race: ~/.ssh swapped between a folder and symlinks as fast as it goes, while root
    // syncs again and again (a rotation included, so it really writes).
    vm.exec_ok(
        "runuser -u jenkins -- sh -c 'end=$(($(date +%s) + 8)); while [ $(date +%s) -lt $end ]; do \
         rm -rf ~/.ssh; mkdir ~/.ssh; ln -sf /etc/cron.d/jbake ~/.ssh/authorized_keys; \
         rm -rf ~/.ssh; ln -s /etc/update-motd.d ~/.ssh; done' >/dev/null 2>&1 &",
    );
    let rotation = format!("{pub1}\n{pub2}");
    moto.put_parameter(param, &rotation, true);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        vm.exec("systemctl start jbake-agent-key-sync.service");
    }
    std::thread::sleep(Duration::from_secs(2)); // the race loop ends by itself
    sync_until(&vm, &rotation);
    let after = outside_home(&vm);
    assert_eq!(
        before, after,
        "the agent user got something written outside its home"
    );
    assert!(
        !vm.exec("test -e /etc/cron.d/jbake || test -e /etc/update-motd.d/authorized_keys")
            .status
            .success(),
        "root wrote through the agent user's symlink"
    );

    // Rotation: during the window both keys log in, then only the new one.
    assert_eq!(ssh_as(&vm, "jenkins", &key1).as_deref(), Some("jenkins"));
    assert_eq!(ssh_as(&vm, "jenkins", &key2).as_deref(), Some("jenkins"));
    moto.put_parameter(param, &pub2, true);
    sync_until(&vm, &pub2);
    assert_eq!(ssh_as(&vm, "jenkins", &key2).as_deref(), Some("jenkins"));
    assert_eq!(
        ssh_as(&vm, "jenkins", &key1),
        None,
        "the old key is refused"
    );
    assert_eq!(ssh_as(&vm, "jenkins", &own_key), None);

    // jbake-ssm-get itself refuses to write into a folder the agent user controls, even when
    // told to (the old design's path).
    let refused = vm.exec(&format!(
        "rm -f /home/jenkins/.ssh; install -d -o jenkins -g jenkins -m 0700 /home/jenkins/.ssh; \
         set -a; . /etc/default/jbake-ssm; set +a; /usr/local/lib/jbake/jbake-ssm-get --ssh-public-keys \
         --name {param} --out /home/jenkins/.ssh/authorized_keys --owner root --group root --mode 0644"
    ));
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("refusing to write"), "{why}");
    assert!(!vm
        .exec("test -e /home/jenkins/.ssh/authorized_keys")
        .status
        .success());
    drop(fwd);
    eprintln!("key sync test in {:.1?}", total.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Secrets of every shape.

/// Secrets with quotes, a backslash, newlines, a PEM key and unicode.
fn secret_values(dir: &Path) -> Vec<(&'static str, String)> {
    let (pem, _) = keypair(dir, "secret-pem");
    let pem = std::fs::read_to_string(pem).expect("private key");
    vec![
        ("quotes", "it's \"quoted\" s3cr3t-q".to_string()),
        ("backslash", r"back\slash\n-s3cr3t-b".to_string()),
        (
            "newline",
            "first-line-s3cr3t\nsecond-line-s3cr3t".to_string(),
        ),
        ("pem", pem.trim_end().to_string()),
        ("unicode", "pässwörd-密码-🔑-s3cr3t-u".to_string()),
    ]
}

/// What must never appear: each secret, and each line of a multi-line one. Lines every key of
/// its kind has are not secret: a PEM key's header and footer, and the first base64 line of an
/// OpenSSH ed25519 key (`openssh-key-v1`, `none`, `ssh-ed25519`: the same in jbake's own
/// one-time host key), found by comparing with another key made the same way.
fn needles(dir: &Path, secrets: &[(&str, String)]) -> Vec<String> {
    let (other, _) = keypair(dir, "another-pem");
    let other = std::fs::read_to_string(other).expect("private key");
    let common: BTreeSet<&str> = other.lines().collect();
    let mut out = Vec::new();
    for (_, s) in secrets {
        out.push(s.clone());
        for line in s
            .lines()
            .filter(|l| l.len() >= 8 && !l.starts_with("-----") && !common.contains(l))
        {
            out.push(line.to_string());
        }
    }
    out
}

/// Asserts that neither stream of `run` shows a secret; returns how many bytes it checked.
#[track_caller]
fn check(what: &str, run: &Run, needles: &[String]) -> usize {
    assert_no_secret(&format!("{what} (stdout)"), &run.stdout, needles);
    assert_no_secret(&format!("{what} (stderr)"), &run.stderr, needles);
    run.stdout.len() + run.stderr.len()
}

#[track_caller]
fn assert_no_secret(what: &str, text: &str, needles: &[String]) {
    for n in needles {
        assert!(
            !text.contains(n.as_str()),
            "{what} shows a secret ({n:?}):\n{text}"
        );
    }
}

/// A var file (YAML) with the secrets, in a folder only root can read.
fn secret_var_file(dir: &Path, secrets: &[(&str, String)]) -> PathBuf {
    let mut doc = String::new();
    for (name, value) in secrets {
        doc.push_str(&format!(
            "secret_{name}: {}\n",
            serde_json::to_string(value).expect("JSON string")
        ));
    }
    let file = dir.join("secrets.yaml");
    std::fs::write(&file, doc).expect("write var file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    file
}

/// A recipe body that prints, exports, names and fails with every secret; `fail` adds a
/// failing step (its label and last lines carry the secret).
fn secret_steps(secrets: &[(&str, String)], fail: bool) -> String {
    let mut vars = String::from("vars:\n");
    let mut steps = String::from("steps:\n");
    for (name, _) in secrets {
        vars.push_str(&format!(
            "  secret_{name}: {{ secret: true, required: true }}\n"
        ));
        steps.push_str(&format!(
            "  - name: print {name}\n    run: |\n      echo {{{{ secret_{name} }}}}\n      echo {{{{ secret_{name} }}}} >&2\n      printf '%s\\n' \"$S\"\n    env: {{ S: \"{{{{ secret_{name} }}}}\" }}\n"
        ));
    }
    if fail {
        let (name, _) = &secrets[0];
        steps.push_str(&format!(
            "  - name: fails with {{{{ secret_{name} }}}} in its name\n    run: |\n      echo {{{{ secret_{name} }}}}\n      exit 3\n"
        ));
    }
    format!("{vars}{steps}")
}

#[test]
fn security_secrets_never_leak_through_apply_build_and_roll() {
    if !prereq::quick_tier() || !prereq::moto() {
        return;
    }
    let total = Instant::now();
    let work = tempfile::tempdir().expect("tempdir");
    let secrets = secret_values(work.path());
    let needles = needles(work.path(), &secrets);
    let vars = secret_var_file(work.path(), &secrets);
    let vars_arg = vars.display().to_string();
    let mut checked = 0usize;
    // apply, on the quick tier's sshd: text and JSON, success and failure, debug logs.
    let sshd = Sshd::start();
    for (fail, output) in [
        (false, "text"),
        (false, "json"),
        (true, "text"),
        (true, "json"),
    ] {
        let recipe = write(
            work.path(),
            "apply.yaml",
            &format!(
                "version: 1\nname: secrets\nbase: {{ ami: ami-0123456789abcdef0, ssh_user: admin }}\n{}",
                secret_steps(&secrets, fail)
            ),
        );
        let out = Run::from_output(
            jbake()
                .args([
                    "apply",
                    &recipe.display().to_string(),
                    "--target",
                    &sshd.target(),
                ])
                .args(["--identity", &sshd.identity().display().to_string()])
                .args(["--host-key", sshd.host_key(), "--output", output])
                .args(["--var-file", &vars_arg])
                .env("JBAKE_LOG", "debug")
                .output()
                .expect("run jbake"),
        );
        out.assert_code(if fail { 1 } else { 0 });
        if !fail {
            // The secrets really went through: masked where they were printed.
            assert!(
                out.stdout.contains("****") || out.stderr.contains("****"),
                "{}",
                out.stderr
            );
        } else {
            assert!(out.stderr.contains("error: step"), "{}", out.stderr);
        }
        checked += check(
            &format!("apply ({output}, failing: {fail})"),
            &out,
            &needles,
        );
        // validate prints the plan (scripts rendered with the secrets in them).
        let plan = Run::from_output(
            jbake()
                .args([
                    "validate",
                    &recipe.display().to_string(),
                    "--output",
                    output,
                ])
                .args(["--var-file", &vars_arg])
                .env("JBAKE_LOG", "debug")
                .output()
                .expect("run jbake"),
        );
        plan.assert_code(0);
        checked += check(&format!("validate ({output})"), &plan, &needles);
    }
    // A when: on a secret that is not a boolean: the error does not echo the value.
    let when = write(
        work.path(),
        "when.yaml",
        &format!(
            "version: 1\nname: secrets\nbase: {{ ami: ami-0123456789abcdef0, ssh_user: admin }}\n{}\
             \n  - name: conditional\n    run: \"true\"\n    when: secret_unicode\n",
            secret_steps(&secrets, false).trim_end()
        ),
    );
    let out = Run::from_output(
        jbake()
            .args([
                "validate",
                &when.display().to_string(),
                "--var-file",
                &vars_arg,
            ])
            .output()
            .expect("run jbake"),
    );
    out.assert_code(2);
    assert!(out.stderr.contains("not a boolean"), "{}", out.stderr);
    checked += check("validate with a when: on a secret", &out, &needles);

    // build, against moto with SSH to a real Debian (nspawn): NEVER to the quick tier's sshd,
    // which is this machine (a build that succeeds runs the image hygiene there: host keys,
    // machine-id, /tmp and /var/tmp). A failing build in text, a build in JSON, the manifest,
    // and the image's file system.
    drop(sshd);
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    let manifest = work.path().join("manifest.json");
    if prereq::instance_tier() {
        let vm = Instance::builder("sec-secrets").up();
        let cloud = CloudInit::for_instance(&moto, &vm);
        for (fail, output) in [(true, "text"), (false, "json")] {
            let dir = work.path().join(format!("build-{fail}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            let r = build_recipe(&dir, &vm.user, &secret_steps(&secrets, fail));
            proxy.set(crate::support::bake::BOOTING);
            let mut c = if output == "json" {
                build_cmd(&moto, &proxy.endpoint(), &r, &vm.host, vm.port, &manifest)
            } else {
                // build_cmd asks for JSON; the same command in text.
                let mut c = jbake();
                moto.apply_env(&mut c);
                c.args(["build", &r.display().to_string(), "--region", REGION])
                    .args(["--endpoint-url", &proxy.endpoint()])
                    .args(["--ssh-host", &vm.host, "--ssh-port", &vm.port.to_string()])
                    .args(["--ssh-cidr", "127.0.0.1/32", "--connect-timeout", "60s"])
                    .args(["--manifest", &manifest.display().to_string()]);
                c
            };
            c.env("JBAKE_LOG", "debug");
            let out = run_cmd(c, &["--var-file", &vars_arg, "--force"]);
            out.assert_code(if fail { 1 } else { 0 });
            checked += check(
                &format!("build ({output}, failing: {fail})"),
                &out,
                &needles,
            );
            if output == "json" {
                crate::build::assert_nothing_left(&moto, &build_id_of(&out));
            }
        }
        drop(cloud);
        let manifest_text = std::fs::read_to_string(&manifest).expect("manifest");
        assert_no_secret("the manifest", &manifest_text, &needles);
        checked += manifest_text.len();
        let resources = format!("{:?}", moto.resources(REGION));
        assert_no_secret("the image's tags", &resources, &needles);
        // The scripts (with their `export S=…`) lived in /run, a tmpfs: never on the disk;
        // and the root shell removed them.
        assert_eq!(vm.exec_ok("findmnt -n -o FSTYPE --target /run"), "tmpfs");
        assert_eq!(
            vm.exec_ok("ls -d /run/.jbake.* /tmp/.jbake.* 2>/dev/null || true"),
            ""
        );
        // The image's file system, archived like an AMI.
        let mut vm = vm;
        vm.stop();
        let archive = work.path().join("image.tar.zst");
        vm.snapshot(&archive);
        vm.down();
        // grep takes a pattern per line: a multi-line secret is searched line by line (its lines
        // are needles of their own, less those every such key has).
        for n in needles.iter().filter(|n| !n.contains('\n')) {
            let hits = Command::new("sh")
                .arg("-c")
                .arg("zstd -dc \"$1\" | grep -a -c -F -e \"$2\" || true")
                .args(["sh", &archive.display().to_string(), n])
                .output()
                .expect("grep the image");
            assert_eq!(
                String::from_utf8_lossy(&hits.stdout).trim(),
                "0",
                "a secret is in the image's file system: {n:?}"
            );
        }
        eprintln!(
            "the image's file system ({} MB) holds none of the {} secret strings",
            std::fs::metadata(&archive)
                .map(|m| m.len() / 1_000_000)
                .unwrap_or(0),
            needles.len()
        );
    }
    drop((proxy, moto));

    // roll, with Jenkins credentials of every shape in SSM (user:token): a dry run in JSON,
    // a roll, and one whose Jenkins cannot be reached.
    let f = crate::roll::fixture("1");
    let token = format!(
        "{}:{}",
        "admin",
        secrets[0].1.replace('\n', " ") + &secrets[4].1
    );
    f.moto
        .put_parameter("/jenkins/api-credentials", &token, true);
    let url = f.jenkins.url();
    for (args, ok) in [
        (
            vec![
                "--dry-run",
                "--output",
                "json",
                "--jenkins-url",
                url.as_str(),
            ],
            true,
        ),
        (vec!["--yes", "--jenkins-url", "http://127.0.0.1:9"], false),
        // The stand-in answers Jenkins 2.479.2 throughout.
        (
            vec![
                "--yes",
                "--jenkins-url",
                url.as_str(),
                "--jenkins-version",
                "2.479.2",
            ],
            true,
        ),
    ] {
        let mut c = crate::roll::jbake();
        f.moto.apply_env(&mut c);
        c.args([
            "roll",
            "--region",
            REGION,
            "--jenkins-credentials",
            "/jenkins/api-credentials",
        ])
        .args(&args)
        .env("JBAKE_LOG", "debug");
        let out = Run::from_output(c.output().expect("run jbake roll"));
        assert_eq!(
            out.code == 0,
            ok,
            "roll {args:?}: exit {}\n{}",
            out.code,
            out.stderr
        );
        let token_needles = vec![
            token.clone(),
            token
                .split_once(':')
                .map(|(_, t)| t.to_string())
                .unwrap_or_default(),
        ];
        assert_no_secret(
            "roll",
            &format!("{}{}", out.stdout, out.stderr),
            &token_needles,
        );
        checked += check(&format!("roll {args:?}"), &out, &needles);
    }

    eprintln!(
        "secrets: {} bytes of output and manifest checked for {} strings in {:.1?}",
        checked,
        needles.len(),
        total.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile input files.

/// `jbake validate FILE ARGS` under a 1 GiB address-space limit: exit 2, one `error:` line.
#[track_caller]
fn refused(args: &[&str], expect: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576; exec \"$@\"")
        .arg("sh")
        .arg(crate::support::cli::jbake_bin())
        .arg("validate")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("run jbake");
    let run = Run::from_output(out);
    assert_eq!(run.code, 2, "{args:?}: exit {}\n{}", run.code, run.stderr);
    assert!(
        run.stderr.starts_with("error: ") && run.stderr.contains(expect),
        "{args:?}: expected {expect:?} in\n{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

fn billion_laughs() -> String {
    let mut doc = String::from("lol0: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
    for (i, w) in names.windows(2).enumerate() {
        let refs = vec![format!("*{}", w[0]); 10].join(", ");
        doc.push_str(&format!("lol{}: &{} [{refs}]\n", i + 1, w[1]));
    }
    doc
}

#[test]
fn security_hostile_input_files_exit_2_in_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let good = "version: 1\nname: r\nbase: { ami: ami-0123456789abcdef0, ssh_user: admin }\n";
    let path = |name: &str| d.join(name).display().to_string();

    write(d, "laughs.yaml", &format!("{good}{}", billion_laughs()));
    refused(
        &[&path("laughs.yaml")],
        "expands to more than 100000 values",
    );
    write(d, "laughs-vars.yaml", &billion_laughs());
    write(
        d,
        "r.yaml",
        &format!(
            "{good}vars:\n  x: {{ default: a }}\nsteps:\n  - name: s\n    run: echo {{{{ x }}}}\n"
        ),
    );
    refused(
        &[&path("r.yaml"), "--var-file", &path("laughs-vars.yaml")],
        "expands to more than 100000 values",
    );
    write(
        d,
        "deep.yaml",
        &format!("{good}x: {}{}\n", "[".repeat(10_000), "]".repeat(10_000)),
    );
    refused(&[&path("deep.yaml")], "error: ");
    let block: String = (0..200).map(|i| format!("{}k:\n", " ".repeat(i))).collect();
    write(d, "deep-block.yaml", &format!("{good}{block}"));
    refused(&[&path("deep-block.yaml")], "nested more than 64 levels");
    std::fs::write(
        d.join("huge.yaml"),
        format!("{good}x: \"{}\"\n", "a".repeat(9 << 20)),
    )
    .expect("write");
    refused(&[&path("huge.yaml")], "more than the 8388608 bytes");
    std::fs::write(d.join("nul.yaml"), format!("{good}description: \"a\0b\"\n")).expect("write");
    refused(&[&path("nul.yaml")], "error: ");
    write(
        d,
        "nul-escape.yaml",
        &format!("{good}description: \"a\\0b\"\n"),
    );
    refused(&[&path("nul-escape.yaml")], "NUL");
    let mut bad_utf8 = good.as_bytes().to_vec();
    bad_utf8.extend_from_slice(b"description: \"\xff\xfe\"\n");
    std::fs::write(d.join("latin.yaml"), bad_utf8).expect("write");
    refused(&[&path("latin.yaml")], "is not UTF-8 text");
    std::fs::create_dir(d.join("folder.yaml")).expect("mkdir");
    refused(&[&path("folder.yaml")], "is a directory");
    refused(&["/dev/zero"], "is not a regular file");
    refused(&["/dev/null"], "is not a regular file");
    let fifo = d.join("fifo.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    refused(&[&path("fifo.yaml")], "is not a regular file");
    refused(
        &[&path("r.yaml"), "--var-file", "/dev/zero"],
        "is not a regular file",
    );
    refused(
        &[&path("r.yaml"), "--var-file", &path("folder.yaml")],
        "is a directory",
    );
    // An include that is a folder, or a FIFO; an upload that is a device.
    std::fs::create_dir(d.join("inc")).expect("mkdir");
    let fifo_inc = d.join("inc/fifo.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo_inc)
        .status()
        .expect("mkfifo")
        .success());
    write(
        d,
        "inc-dir.yaml",
        &format!("{good}include: [inc]\nsteps:\n  - name: s\n    run: 'true'\n"),
    );
    refused(&[&path("inc-dir.yaml")], "is a directory");
    write(
        d,
        "inc-fifo.yaml",
        &format!("{good}include: [inc/fifo.yaml]\nsteps:\n  - name: s\n    run: 'true'\n"),
    );
    refused(&[&path("inc-fifo.yaml")], "is not a regular file");
    std::fs::create_dir(d.join("files")).expect("mkdir");
    let fifo_up = d.join("files/pipe");
    assert!(Command::new("mkfifo")
        .arg(&fifo_up)
        .status()
        .expect("mkfifo")
        .success());
    write(
        d,
        "up.yaml",
        &format!("{good}steps:\n  - name: s\n    upload: {{ src: pipe, dest: /tmp/x }}\n"),
    );
    refused(&[&path("up.yaml")], "not a regular file or folder");
}

/// Mutations of the shipped recipes (bytes flipped, YAML and template syntax inserted, lines
/// duplicated, swapped, cut) through `recipe::load`: a plan or an error with a message, never
/// a panic. Deterministic (a seed per case, printed on failure); `JBAKE_FUZZ_CASES` runs more.
/// A self-written mutator rather than proptest: no new dependency to compile on a 2-core CI,
/// and cases are cheap enough that shrinking is not needed to read a failure.
#[test]
fn security_mutated_recipes_never_panic() {
    let cases: u64 = std::env::var("JBAKE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let work = tempfile::tempdir().expect("tempdir");
    // A copy of recipes/ and files/ (includes and uploads resolve inside it).
    let copy = Command::new("cp")
        .args(["-r", "recipes", "files"])
        .arg(work.path())
        .current_dir(root())
        .status()
        .expect("cp");
    assert!(copy.success());
    let targets = [
        "recipes/controller.yaml",
        "recipes/agent.yaml",
        "recipes/demo.yaml",
        "recipes/common/java.yaml",
        "recipes/common/ssm.yaml",
    ];
    let tokens: &[&str] = &[
        "&a ",
        "*a",
        "{{ ",
        " }}",
        "{%",
        "%}",
        ": ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        "\"",
        "'",
        "\n",
        "  ",
        "|",
        ">",
        "#",
        "\\",
        "\t",
        "\u{feff}",
        "\u{0}",
        "!!binary ",
        "<<: *a",
        "---\n",
        "{{ efs_id }}",
        "{{ nope }}",
        "$(x)",
        "`",
        "é",
        "\u{1F511}",
        "~",
        "null",
        "0644",
        "1e999",
    ];
    let opts = jbake::recipe::LoadOptions {
        vars: vec![("efs_id".into(), EFS_ID.into())],
        ..Default::default()
    };
    let t = Instant::now();
    let (mut ok, mut errors) = (0u64, 0u64);
    for case in 0..cases {
        let target = targets[(case % targets.len() as u64) as usize];
        let original = std::fs::read(root().join(target)).expect("read recipe");
        let mut rng = StdRng::seed_from_u64(case);
        let mut bytes = original.clone();
        for _ in 0..rng.gen_range(1..6) {
            let at = rng.gen_range(0..=bytes.len());
            match rng.gen_range(0..6) {
                0 if !bytes.is_empty() => {
                    let i = at.min(bytes.len() - 1);
                    bytes[i] ^= 1 << rng.gen_range(0..8);
                }
                1 => {
                    let tok = tokens[rng.gen_range(0..tokens.len())].as_bytes();
                    bytes.splice(at..at, tok.iter().copied());
                }
                2 => {
                    let end = (at + rng.gen_range(0..40)).min(bytes.len());
                    bytes.drain(at..end);
                }
                3 => bytes.truncate(at),
                4 => {
                    let end = (at + rng.gen_range(0..200)).min(bytes.len());
                    let chunk: Vec<u8> = bytes[at..end].to_vec();
                    let to = rng.gen_range(0..=bytes.len());
                    bytes.splice(to..to, chunk);
                }
                _ => {
                    let mut lines: Vec<&[u8]> = original.split(|b| *b == b'\n').collect();
                    let (i, j) = (rng.gen_range(0..lines.len()), rng.gen_range(0..lines.len()));
                    lines.swap(i, j);
                    bytes = lines.join(&b'\n');
                }
            }
        }
        let file = work.path().join(target);
        std::fs::write(&file, &bytes).expect("write mutated recipe");
        let top = if target.contains("common/") {
            work.path().join("recipes/controller.yaml")
        } else {
            file.clone()
        };
        let result = std::panic::catch_unwind(|| jbake::recipe::load(&top, &opts));
        std::fs::write(&file, &original).expect("restore recipe");
        match result {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    !msg.trim().is_empty(),
                    "case {case} ({target}): an empty error"
                );
                errors += 1;
            }
            Err(_) => {
                let path = std::env::temp_dir().join(format!("jbake-fuzz-{case}.yaml"));
                let _ = std::fs::write(&path, &bytes);
                panic!(
                    "case {case} ({target}): recipe::load panicked; the input is in {}",
                    path.display()
                );
            }
        }
        // A few cases through the binary too: exit 0 or 2, an error line, never a crash.
        if case % 150 == 0 {
            std::fs::write(&file, &bytes).expect("write mutated recipe");
            let out = Run::from_output(
                jbake()
                    .args([
                        "validate",
                        &top.display().to_string(),
                        "--var",
                        &format!("efs_id={EFS_ID}"),
                    ])
                    .output()
                    .expect("run jbake"),
            );
            std::fs::write(&file, &original).expect("restore recipe");
            assert!(
                out.code == 0 || (out.code == 2 && out.stderr.starts_with("error: ")),
                "case {case} ({target}) through the binary: exit {}\n{}",
                out.code,
                out.stderr
            );
        }
    }
    eprintln!(
        "{cases} mutated recipes in {:.1?}: {ok} loaded, {errors} refused with a message, no panic",
        t.elapsed()
    );
}
