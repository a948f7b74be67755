//! `jbake keys` on the instance tier: a rotation driven against moto reaches a booted agent and
//! a booted controller (real Debian bookworm, systemd-nspawn, each from the image `jbake agent`
//! / `jbake controller` baked, with short refresh intervals through the recipes'
//! `key_refresh_interval`), and the controller's running Jenkins switches to the new key without
//! a restart.
//!
//! The instances read SSM as they do on EC2: region and role credentials from an IMDSv2
//! stand-in; the roles are moto IAM users with the shipped instance-role policies
//! (iam/instance-roles/), `jbake keys` runs with iam/jbake-keys-policy.json, and moto checks
//! every request's signature and permissions. The controller reaches the agent's sshd through a
//! forwarder on its gateway (the only way between the two network namespaces) and logs in as
//! `jenkins` with the very file Jenkins uses, `/run/jenkins-secrets/agent-ssh-key`. Jenkins is
//! the stand-in (tests/fixtures/jenkins-standin), which applies Configuration as Code like the
//! plugin (at start and at a token reload, reading `${readFile:...}` of
//! files/jenkins-casc-agents.yaml installed as JENKINS_HOME/jenkins.yaml) and logs the SHA-256 of
//! each file it read: which key Jenkins took, and when.
//!
//! Proven: agents accept the old and the new key during the window (each logs in) and only the
//! new after `finish`; the agents accepted the new key before the controller got it; the
//! controller's Jenkins reloads the new key (same process, no restart) and the controller logs
//! in with it; `finish` is refused before --controller-sync; a changed key while Jenkins is
//! stopped, waiting for the JENKINS_HOME lease, or starting is taken at its start or reloaded
//! once it answers, and the refresh neither starts nor breaks it; a wrong reload token is
//! refused; no private key line is on either instance's disk (their root file systems outside
//! the tmpfs /run) or on the EFS, nor in any output or journal; the reload token is on no
//! command line and in no journal.
//!
//! Not proven here: real Jenkins with the configuration-as-code plugin (not downloadable);
//! what the real plugin does with the credential is in docs/images.md (it keeps an encrypted copy
//! in JENKINS_HOME/credentials.xml).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::support::bake::{bake_command, build_standin, controller_vars, prerequisites, EFS_ID};
use crate::support::cli::{self, Run};
use crate::support::instance::Instance;
use crate::support::moto::{CloudInit, FaultProxy, Moto, REGION};
use crate::support::net::{http, FileServer, Forwarder, Imds};

/// The recipes' refresh interval in this test (the default is 5min).
const REFRESH: &str = "3s";
/// `--agent-sync` / `--controller-sync`: a little more than two intervals, as the defaults are.
const SYNC: &str = "8s";
const SYNC_SECS: u64 = 8;
const PRIVATE: &str = "/devops-tools/jenkins/id_rsa";
const PUBLIC: &str = "/devops-tools/jenkins/id_rsa.pub";
const KEY_FILE: &str = "/run/jenkins-secrets/agent-ssh-key";
const MARKER: &str = "/run/jbake/agent-ssh-key.changed";
const TOKEN_FILE: &str = "/run/jbake/jenkins-casc-reload.env";
const WAIT: Duration = Duration::from_secs(60);

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The file fetched from a private key parameter's value (jbake-ssm-get: one final newline).
fn key_file_sha(value: &str) -> String {
    sha256_hex(format!("{}\n", value.trim_end_matches('\n')).as_bytes())
}

/// The lines of a private key that identify it (its base64 body, without the armour).
fn key_lines(value: &str) -> Vec<String> {
    value
        .lines()
        .map(str::trim)
        .filter(|l| l.len() >= 20 && !l.starts_with("-----"))
        .map(str::to_string)
        .collect()
}

/// Polls `f` until it is true; panics with `diag()` after `timeout`. How long it took.
#[track_caller]
fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
    diag: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// A scoped thread's result, its panic passed on.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Bakes the image of `kind` (`agent` or `controller`) with `jbake KIND` against a moto of its
/// own, SSH going to a fresh instance; stops the instance and archives it (the "AMI").
fn bake(kind: &str, work: &Path, vars: Vec<String>) -> PathBuf {
    let t = Instant::now();
    let moto = Moto::start();
    let vm = Instance::builder(&format!("ki-bake-{kind}")).up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    let proxy = FaultProxy::start(&moto.endpoint());
    let www = FileServer::start(&vm.gateway, work.join("www"));
    let mut vars = vars;
    if kind == "controller" {
        vars.splice(0..0, controller_vars(&www.url(), &standin_sha(work)));
        // An image for an existing JENKINS_HOME (the default), not a first installation's.
        vars.retain(|v| v != "jenkins_home_init=true");
    }
    let args: Vec<&str> = if kind == "controller" {
        vec!["controller", "--efs-id", EFS_ID]
    } else {
        vec!["agent"]
    };
    let manifest = work.join(format!("{kind}-manifest.json"));
    let mut cmd = bake_command(&args, &moto, &proxy, &cloud, &vm, &vars, &manifest);
    // The rotation is tested on the archived machine below; the boot test is tests/boot_test.rs'.
    cmd.args(["--output", "json", "--skip-test"]);
    let run = Run::from_output(cmd.output().expect("run jbake"));
    run.assert_code(0);
    let result = crate::build::finished(&run);
    assert!(result["ami_id"].is_string(), "{result}");
    drop((www, proxy, cloud));
    let mut vm = vm;
    vm.stop();
    let archive = work.join(format!("{kind}.tar.zst"));
    vm.snapshot(&archive);
    vm.down();
    eprintln!(
        "keys_instance: jbake {kind} baked and archived in {:.1?}",
        t.elapsed()
    );
    archive
}

fn standin_sha(work: &Path) -> String {
    std::fs::read_to_string(work.join("standin.sha256")).expect("the stand-in's SHA-256")
}

/// `jbake keys ARGS --region R` against `moto` as the IAM user `who`.
fn keys_cmd(moto: &Moto, who: &(String, String), args: &[&str]) -> Command {
    let mut cmd = cli::jbake();
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(moto.env_with(&moto.endpoint(), &who.0, &who.1));
    cmd.arg("keys").args(args).args(["--region", REGION]);
    cmd
}

/// An SSM parameter's value as the harness reads it (boto3, the admin user), or None.
fn ssm_value(moto: &Moto, name: &str) -> Option<String> {
    let code = format!(
        "import boto3, json\nssm = boto3.client('ssm')\ntry:\n    print(json.dumps(ssm.get_parameter(Name={name:?}, WithDecryption=True)['Parameter']['Value']))\nexcept ssm.exceptions.ParameterNotFound:\n    print('null')\n"
    );
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(code).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(moto.harness_env());
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The instance reads SSM the way an EC2 instance does: region and role credentials (the IAM
/// user `role`) from an IMDSv2 stand-in on its gateway; only the SSM endpoint is overridden
/// (a forwarder to moto, the one loopback service it may reach).
fn point_ssm_at(vm: &Instance, moto: &Moto, role: &(String, String)) -> (Forwarder, Imds) {
    let fwd = Forwarder::start(&vm.gateway, moto.port());
    let imds = Imds::start(&vm.gateway, REGION, &role.0, &role.1);
    vm.exec_ok(&format!(
        "printf 'AWS_ENDPOINT_URL_SSM={}/\\nAWS_EC2_METADATA_SERVICE_ENDPOINT={}\\n' > /etc/default/jbake-ssm",
        fwd.url(),
        imds.url()
    ));
    (fwd, imds)
}

/// A moto IAM user whose only policy is the repository's file `policy`.
fn user_with(moto: &Moto, policy: &str) -> (String, String) {
    let doc = std::fs::read_to_string(cli::root().join(policy)).expect("read the policy");
    moto.iam_user(&doc)
}

/// Logs in to `agent` as jenkins from this host with the private key file `key`.
fn login_from_host(agent: &Instance, key: &Path) -> bool {
    Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            agent.known_hosts().display()
        ))
        .arg(format!("jenkins@{}", agent.host))
        .arg("id -un")
        .stdin(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "jenkins")
        .unwrap_or(false)
}

/// The controller logs in to the agent (through `fwd` on its gateway) as jenkins, running ssh
/// as the jenkins user with the key file Jenkins reads.
fn login_from_controller(ctl: &Instance, fwd: &Forwarder) -> bool {
    let out = ctl.exec(&format!(
        "runuser -u jenkins -- ssh -F /dev/null -i {KEY_FILE} -o IdentitiesOnly=yes -o BatchMode=yes \
         -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/run/keys-test/known_hosts \
         -o ConnectTimeout=10 -p {} jenkins@{} 'id -un'",
        fwd.port(),
        ctl.gateway
    ));
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "jenkins"
}

/// The SHA-256 of a file in the guest, or None if it is missing.
fn guest_sha(vm: &Instance, path: &str) -> Option<String> {
    let out = vm.exec(&format!("sha256sum {path}"));
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

fn guest_has(vm: &Instance, path: &str) -> bool {
    vm.exec(&format!("test -e {path}")).status.success()
}

fn journal(vm: &Instance, unit: &str) -> String {
    vm.exec_ok(&format!("journalctl --no-pager -o cat -u {unit}"))
}

/// What the stand-in's Configuration as Code read: `(event, path, sha256=… | missing)` lines.
fn casc_log(efs: &Path) -> Vec<String> {
    std::fs::read_to_string(efs.join("standin-casc.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn casc_line(event: &str, sha: &str) -> String {
    format!("{event} {KEY_FILE} sha256={sha}")
}

/// The key Jenkins applied last is the one with this SHA-256.
fn jenkins_uses(efs: &Path, sha: &str) -> bool {
    casc_log(efs)
        .last()
        .is_some_and(|l| l.ends_with(&format!("{KEY_FILE} sha256={sha}")))
}

/// `NRestarts ExecMainPID` of jenkins.service.
fn jenkins_process(ctl: &Instance) -> String {
    ctl.exec_ok("systemctl show -p NRestarts -p ExecMainPID --value jenkins.service | tr '\\n' ' '")
}

fn diag(ctl: &Instance, efs: &Path) -> String {
    format!(
        "key refresh journal:\n{}\njenkins journal (tail):\n{}\nstand-in JCasC log: {:?}",
        journal(ctl, "jbake-jenkins-agent-key.service"),
        ctl.exec_ok("journalctl --no-pager -o cat -u jenkins.service | tail -20"),
        casc_log(efs)
    )
}

/// One `jbake keys rotate --agent-sync 0s` and `finish --controller-sync 0s`: a new controller
/// key at once (for the cases below that watch the controller only). Returns its value.
fn rotate_now(moto: &Moto, who: &(String, String), outputs: &mut Vec<String>) -> String {
    for args in [
        ["rotate", "--agent-sync", "0s"],
        ["finish", "--controller-sync", "0s"],
    ] {
        let r = Run::from_output(keys_cmd(moto, who, &args).output().expect("run jbake keys"));
        r.assert_code(0);
        outputs.extend([r.stdout, r.stderr]);
    }
    ssm_value(moto, PRIVATE).expect("the controller's key")
}

/// A stand-in for what else can answer the reload: every POST gets the status in argv[2].
const ANSWER_PY: &str = "import http.server, sys\nclass H(http.server.BaseHTTPRequestHandler):\n    def do_POST(self):\n        self.send_response(int(sys.argv[2]))\n        self.send_header('Content-Length', '0')\n        self.end_headers()\n    def log_message(self, *a):\n        pass\nhttp.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n";

/// Runs `jbake-casc-reload --pending P ARGS` by hand on the controller with a reload pending
/// (and, with `answer`, a server on 127.0.0.1:18081 answering every POST with that status):
/// its exit code, its stderr, and whether the reload is still pending.
fn reload_by_hand(ctl: &Instance, args: &str, answer: Option<u16>) -> (i32, String, bool) {
    let pending = "/run/keys-test/pending";
    let server = match answer {
        Some(code) => format!(
            "python3 /root/answer.py 18081 {code} & srv=$!; \
             for i in $(seq 50); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 18081))' 2>/dev/null && break; sleep 0.1; done; "
        ),
        None => String::new(),
    };
    let stop = if answer.is_some() { "; kill $srv" } else { "" };
    let out = ctl.exec(&format!(
        "touch {pending}; {server}/usr/local/lib/jbake/jbake-casc-reload --pending {pending} {args}; rc=$?{stop}; exit $rc"
    ));
    let left = guest_has(ctl, pending);
    let _ = ctl.exec(&format!("rm -f {pending}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        left,
    )
}

/// Holds an exclusive flock on `file` (another controller holding the JENKINS_HOME lease)
/// until dropped: a Python process of its own (no child that could keep the lock), killed by PID.
struct LeaseHolder(Child);

const HOLD: &str = "import fcntl, sys\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('held', flush=True)\nsys.stdin.read()\n";

impl LeaseHolder {
    fn take(file: &Path) -> LeaseHolder {
        let mut child = Command::new("python3")
            .args(["-c", HOLD])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read");
        let mut holder = LeaseHolder(child);
        assert_eq!(line.trim(), "held", "cannot lock {}", file.display());
        assert!(holder.0.try_wait().expect("wait").is_none());
        holder
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn keys_instance_rotation_reaches_the_agents_and_the_running_controller_without_a_restart() {
    if !prerequisites() {
        return;
    }
    let total = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("jbake-keys-instance-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let w = work.path();
    // The EFS stand-in, populated like a running installation's: owned by jenkins, with the
    // shipped JCasC snippet as JENKINS_HOME/jenkins.yaml (JCasC's default source).
    let efs = w.join("efs");
    std::fs::create_dir(&efs).expect("mkdir efs");
    std::fs::copy(
        cli::root().join("files/jenkins-casc-agents.yaml"),
        efs.join("jenkins.yaml"),
    )
    .expect("copy the JCasC snippet");
    let ok = Command::new("sh")
        .arg("-c")
        .arg("chown -R 3000:3000 \"$1\" && chmod 0750 \"$1\"")
        .args(["sh", &efs.display().to_string()])
        .status()
        .expect("chown")
        .success();
    assert!(ok);
    let fstype = String::from_utf8_lossy(
        &Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE", "--target"])
            .arg(&efs)
            .output()
            .expect("findmnt")
            .stdout,
    )
    .trim()
    .to_string();

    // The two images, baked at the same time (each its own moto and build instance), and
    // meanwhile the account's SSM: a moto with IAM authorization, where jbake keys and each
    // instance role get only what their shipped policy allows; `jbake keys init`.
    std::fs::write(w.join("standin.sha256"), build_standin(w)).expect("write");
    let refresh = format!("key_refresh_interval={REFRESH}");
    let (agent_image, controller_image, (moto, init)) = std::thread::scope(|s| {
        let account = s.spawn(|| {
            let moto = Moto::start();
            let users = [
                "iam/jbake-keys-policy.json",
                "iam/instance-roles/jbake-controller.json",
                "iam/instance-roles/jbake-agent.json",
            ]
            .map(|p| user_with(&moto, p));
            moto.enable_iam_auth();
            let init = Run::from_output(
                keys_cmd(&moto, &users[0], &["init"])
                    .output()
                    .expect("run jbake keys init"),
            );
            (moto, (users, init))
        });
        let agent = s.spawn(|| {
            bake(
                "agent",
                w,
                // git is always there; the default tool list only costs apt time here.
                vec![refresh.clone(), "agent_packages=make".to_string()],
            )
        });
        let controller = s.spawn(|| {
            bake(
                "controller",
                w,
                vec![
                    refresh.clone(),
                    format!("jenkins_home_fstypes=nfs4 {fstype}"),
                ],
            )
        });
        (join(agent), join(controller), join(account))
    });
    let baked = total.elapsed();
    let ([operator, controller_role, agent_role], init) = init;
    let t = Instant::now();
    let mut outputs: Vec<String> = Vec::new();
    init.assert_code(0);
    outputs.extend([init.stdout.clone(), init.stderr.clone()]);
    let key1 = ssm_value(&moto, PRIVATE).expect("the private key");
    let pub1 = ssm_value(&moto, PUBLIC).expect("the public key");
    let mut all_keys = vec![key1.clone()];
    // The test's own copy of the old key (in memory: /dev/shm), to show agents still take it.
    let shm = tempfile::Builder::new()
        .prefix("jbake-keys-instance-")
        .tempdir_in("/dev/shm")
        .expect("tempdir in /dev/shm");
    let key1_file = shm.path().join("key1");
    crate::support::sshd::write_private(&key1_file, &key1);

    // The agent and the controller boot from their images (at the same time).
    let (agent, ctl) = std::thread::scope(|s| {
        let agent = s.spawn(|| Instance::builder("ki-agent").image(&agent_image).up());
        let ctl = s.spawn(|| {
            Instance::builder("ki-ctl")
                .image(&controller_image)
                .bind(&efs, "/var/lib/jenkins")
                .up()
        });
        (join(agent), join(ctl))
    });
    let _agent_ssm = point_ssm_at(&agent, &moto, &agent_role);
    let _ctl_ssm = point_ssm_at(&ctl, &moto, &controller_role);
    let agent_ssh: SocketAddr = format!("{}:{}", agent.host, agent.port)
        .parse()
        .expect("agent address");
    let to_agent = Forwarder::start_to(&ctl.gateway, agent_ssh);
    ctl.exec_ok(&format!(
        "install -d -m 0755 /run/keys-test && echo '[{}]:{} {}' > /run/keys-test/known_hosts",
        ctl.gateway,
        to_agent.port(),
        agent.host_key
    ));
    let authorized = "/etc/ssh/authorized_keys/jenkins";
    wait_until(
        "the agent accepts the controller's key",
        WAIT,
        || agent.exec(&format!("cat {authorized}")).stdout == pub1.as_bytes(),
        || journal(&agent, "jbake-agent-key-sync.service"),
    );
    // SSM was not reachable at boot (its endpoint is set now): the refresh fetches the key,
    // and Jenkins takes it at its start or, if it started without it, by a reload.
    let sha1 = key_file_sha(&key1);
    wait_until(
        "Jenkins uses the key from SSM",
        WAIT,
        || jenkins_uses(&efs, &sha1),
        || diag(&ctl, &efs),
    );
    assert_eq!(guest_sha(&ctl, KEY_FILE).as_deref(), Some(sha1.as_str()));
    assert!(
        casc_log(&efs)[0].starts_with(&format!("start {KEY_FILE} ")),
        "{:?}",
        casc_log(&efs)
    );
    assert!(
        login_from_controller(&ctl, &to_agent),
        "{}",
        diag(&ctl, &efs)
    );
    assert!(login_from_host(&agent, &key1_file));
    eprintln!(
        "keys_instance: instances up, key in place and Jenkins reloaded in {:.1?}",
        t.elapsed()
    );
    // The reload token: made at boot, root's alone, in memory.
    assert_eq!(
        ctl.exec_ok(&format!(
            "stat -c '%U:%G %a' /run/jbake {TOKEN_FILE} {KEY_FILE}"
        )),
        "root:root 700\nroot:root 600\nroot:jenkins 440"
    );
    for dir in ["/run/jbake", "/run/jenkins-secrets"] {
        assert_eq!(
            ctl.exec_ok(&format!("findmnt -n -o FSTYPE --target {dir}")),
            "tmpfs"
        );
    }
    let token = ctl
        .exec_ok(&format!("cat {TOKEN_FILE}"))
        .strip_prefix("CASC_RELOAD_TOKEN=")
        .expect("a token line")
        .to_string();
    assert_eq!(token.len(), 64);
    let before = jenkins_process(&ctl);

    // The rotation: agents accept both keys, then (after --agent-sync) the controller gets the
    // new one; its Jenkins reloads it without a restart.
    let t = Instant::now();
    let mut rotate = keys_cmd(&moto, &operator, &["rotate", "--agent-sync", SYNC])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run jbake keys rotate");
    let mut agent_both: Option<Duration> = None;
    loop {
        let lines = agent
            .exec(&format!("cat {authorized}"))
            .stdout
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        if agent_both.is_none() && lines == 2 {
            agent_both = Some(t.elapsed());
        }
        // The controller keeps the old key until the rotation gives it the new one.
        if agent_both.is_none() {
            assert_eq!(guest_sha(&ctl, KEY_FILE).as_deref(), Some(sha1.as_str()));
        }
        if rotate.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(t.elapsed() < WAIT, "rotate did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rotated = Instant::now();
    let out = rotate.wait_with_output().expect("rotate's output");
    let r = Run::from_output(out);
    r.assert_code(0);
    outputs.extend([r.stdout.clone(), r.stderr.clone()]);
    // finish before --controller-sync has passed: refused, nothing changed.
    let early = Run::from_output(
        keys_cmd(&moto, &operator, &["finish", "--controller-sync", SYNC])
            .output()
            .expect("run jbake keys finish"),
    );
    early.assert_code(2);
    assert!(early.stderr.contains("wait"), "{}", early.stderr);
    outputs.extend([early.stdout.clone(), early.stderr.clone()]);
    let key2 = ssm_value(&moto, PRIVATE).expect("the new key");
    assert_ne!(key2, key1);
    all_keys.push(key2.clone());
    let sha2 = key_file_sha(&key2);
    let took = wait_until(
        "the controller's Jenkins reloads the new key",
        WAIT,
        || casc_log(&efs).contains(&casc_line("reload", &sha2)),
        || diag(&ctl, &efs),
    );
    let agent_both = agent_both.expect("the agent never held both keys");
    let switched = rotated.duration_since(t) + took;
    eprintln!(
        "keys_instance: agent accepted both keys {agent_both:.1?} after rotate started; the \
         controller's Jenkins reloaded the new key {took:.1?} after rotate ended ({switched:.1?})"
    );
    assert!(agent_both < switched);
    assert_eq!(
        jenkins_process(&ctl),
        before,
        "Jenkins was not restarted: {}",
        diag(&ctl, &efs)
    );
    let starts = std::fs::read_to_string(efs.join("standin-starts.log")).expect("starts");
    assert_eq!(starts.lines().count(), 1, "one start of Jenkins: {starts}");
    assert!(journal(&ctl, "jbake-jenkins-agent-key.service")
        .contains("Jenkins reloaded its configuration (JCasC): it uses the new key"));
    assert!(!guest_has(&ctl, MARKER));
    // The window: the agent takes the old key and the new one (the controller's).
    assert!(
        login_from_controller(&ctl, &to_agent),
        "{}",
        diag(&ctl, &efs)
    );
    assert!(
        login_from_host(&agent, &key1_file),
        "the old key still logs in"
    );

    // finish once --controller-sync has passed since the switch: only the new key.
    let left = Duration::from_secs(SYNC_SECS + 1).saturating_sub(rotated.elapsed());
    std::thread::sleep(left);
    let fin = Run::from_output(
        keys_cmd(&moto, &operator, &["finish", "--controller-sync", SYNC])
            .output()
            .expect("run jbake keys finish"),
    );
    fin.assert_code(0);
    outputs.extend([fin.stdout.clone(), fin.stderr.clone()]);
    let pub2 = ssm_value(&moto, PUBLIC).expect("the public key");
    assert_eq!(pub2.lines().count(), 1);
    let took = wait_until(
        "the agent accepts only the new key",
        WAIT,
        || agent.exec(&format!("cat {authorized}")).stdout == pub2.as_bytes(),
        || journal(&agent, "jbake-agent-key-sync.service"),
    );
    assert!(
        !login_from_host(&agent, &key1_file),
        "the old key is refused"
    );
    assert!(
        login_from_controller(&ctl, &to_agent),
        "{}",
        diag(&ctl, &efs)
    );
    eprintln!(
        "keys_instance: rotation done in {:.1?} (the agent dropped the old key {took:.1?} after finish)",
        t.elapsed()
    );

    // A wrong reload token is refused and reloads nothing.
    let n = casc_log(&efs).len();
    let wrong = http(
        "POST",
        &ctl.host,
        8080,
        &format!(
            "/reload-configuration-as-code/?casc-reload-token={}",
            "0".repeat(64)
        ),
        "",
    )
    .expect("POST");
    assert_eq!(wrong.status, 401);
    assert_eq!(casc_log(&efs).len(), n);

    // A new key while Jenkins is stopped: fetched, nothing sent, Jenkins not started by the
    // refresh; it takes the key when it starts.
    let t = Instant::now();
    ctl.exec_ok("systemctl stop jenkins.service");
    let key3 = rotate_now(&moto, &operator, &mut outputs);
    all_keys.push(key3.clone());
    let sha3 = key_file_sha(&key3);
    wait_until(
        "the refresh sees that Jenkins is not running",
        WAIT,
        || guest_sha(&ctl, KEY_FILE).as_deref() == Some(sha3.as_str()) && !guest_has(&ctl, MARKER),
        || diag(&ctl, &efs),
    );
    assert!(journal(&ctl, "jbake-jenkins-agent-key.service").contains(
        "Jenkins is not running (jenkins.service is inactive/dead): nothing to reload, it reads the new key when it starts"
    ));
    assert_eq!(
        ctl.exec("systemctl is-active jenkins.service").stdout,
        b"inactive\n"
    );
    ctl.exec_ok("systemctl start jenkins.service");
    wait_until(
        "Jenkins starts with the new key",
        WAIT,
        || casc_log(&efs).contains(&casc_line("start", &sha3)),
        || diag(&ctl, &efs),
    );

    // A new key while this controller waits for the JENKINS_HOME lease (another one holds it):
    // no Jenkins runs here; it takes the key when it gets the lease.
    ctl.exec_ok("systemctl stop jenkins.service");
    let holder = LeaseHolder::take(&efs.join(".jbake/lease"));
    ctl.exec_ok("systemctl start jenkins.service");
    wait_until(
        "jenkins-lease waits for the lease",
        WAIT,
        || {
            http("GET", &ctl.host, 8080, "/login", "")
                .is_ok_and(|r| r.status == 503 && r.header("X-Jbake-Lease") == Some("waiting"))
        },
        || diag(&ctl, &efs),
    );
    let key4 = rotate_now(&moto, &operator, &mut outputs);
    all_keys.push(key4.clone());
    let sha4 = key_file_sha(&key4);
    wait_until(
        "the refresh sees that Jenkins does not run here",
        WAIT,
        || {
            journal(&ctl, "jbake-jenkins-agent-key.service").contains(
                "Jenkins does not run here (jenkins-lease is waiting for the JENKINS_HOME lease)",
            ) && !guest_has(&ctl, MARKER)
        },
        || diag(&ctl, &efs),
    );
    assert_eq!(guest_sha(&ctl, KEY_FILE).as_deref(), Some(sha4.as_str()));
    drop(holder);
    wait_until(
        "Jenkins starts with the new key once it holds the lease",
        WAIT,
        || casc_log(&efs).contains(&casc_line("start", &sha4)),
        || diag(&ctl, &efs),
    );

    // A new key while Jenkins is starting (it read its configuration and does not answer
    // yet: the stand-in waits for a gate file): the refresh asks again until Jenkins answers,
    // then it reloads; Jenkins is left to start.
    let gate = "/run/keys-test/jenkins-may-answer";
    ctl.exec_ok(&format!(
        "echo 'JAVA_OPTS=-Dstandin.startGate={gate}' > /etc/default/jenkins"
    ));
    let starts_now = casc_log(&efs)
        .iter()
        .filter(|l| l.starts_with("start "))
        .count();
    ctl.exec_ok("systemctl restart jenkins.service");
    wait_until(
        "Jenkins read its configuration at its start",
        WAIT,
        || {
            casc_log(&efs)
                .iter()
                .filter(|l| l.starts_with("start "))
                .count()
                > starts_now
        },
        || diag(&ctl, &efs),
    );
    assert!(
        http("GET", &ctl.host, 8080, "/login", "").is_err(),
        "still starting"
    );
    let seen = journal(&ctl, "jbake-jenkins-agent-key.service")
        .lines()
        .count();
    let key5 = rotate_now(&moto, &operator, &mut outputs);
    all_keys.push(key5.clone());
    let sha5 = key_file_sha(&key5);
    let new_lines = || -> Vec<String> {
        journal(&ctl, "jbake-jenkins-agent-key.service")
            .lines()
            .skip(seen)
            .map(str::to_string)
            .collect()
    };
    wait_until(
        "the refresh waits for the starting Jenkins",
        WAIT,
        || {
            new_lines()
                .iter()
                .any(|l| l.contains("Jenkins is starting ("))
        },
        || diag(&ctl, &efs),
    );
    assert!(guest_has(&ctl, MARKER), "the reload is pending");
    ctl.exec_ok(&format!("touch {gate}"));
    wait_until(
        "Jenkins reloads the key once it answers",
        WAIT,
        || casc_log(&efs).contains(&casc_line("reload", &sha5)),
        || diag(&ctl, &efs),
    );
    assert!(!guest_has(&ctl, MARKER));
    let refresh_log = new_lines();
    assert!(
        !refresh_log.iter().any(|l| l.contains("Failed")),
        "{refresh_log:#?}"
    );
    assert_eq!(
        casc_log(&efs)
            .iter()
            .filter(|l| l.starts_with("start "))
            .count(),
        starts_now + 1,
        "Jenkins started once"
    );
    eprintln!(
        "keys_instance: Jenkins stopped, waiting for the lease, starting: each took its new key in {:.1?}",
        t.elapsed()
    );

    // jbake-casc-reload's other ways out, by hand on the controller (Jenkins running): each
    // fails with exit 3 (the unit is not restarted then: its timer tries again) and says what to
    // do; the reload stays pending unless nothing could ever reload it (404).
    std::fs::write(ctl.root.join("root/answer.py"), ANSWER_PY).expect("write answer.py");
    ctl.exec_ok(&format!(
        "umask 077; echo CASC_RELOAD_TOKEN={} > /run/keys-test/other.env",
        "1".repeat(64)
    ));
    let ours = format!("--token-file {TOKEN_FILE}");
    for (args, answer, want, pending) in [
        (
            "--token-file /run/keys-test/other.env".to_string(),
            None,
            "Jenkins refused the reload token (it was started with another one): restart Jenkins",
            true,
        ),
        (
            "--token-file /run/keys-test/none".to_string(),
            None,
            "no JCasC reload token in /run/keys-test/none",
            true,
        ),
        (
            format!("{ours} --url http://127.0.0.1:18081/"),
            Some(404),
            "Jenkins has no token reload (POST /reload-configuration-as-code/ is 404",
            false,
        ),
        (
            format!("{ours} --url http://127.0.0.1:18081/"),
            Some(500),
            "Jenkins answered HTTP 500 to the JCasC reload",
            true,
        ),
        (
            format!("{ours} --url http://127.0.0.1:9/ --wait 1"),
            None,
            "Jenkins did not take the reload within 1s ([Errno 111] Connection refused)",
            true,
        ),
    ] {
        let (code, stderr, left) = reload_by_hand(&ctl, &args, answer);
        assert_eq!(code, 3, "{args}: {stderr}");
        assert!(stderr.contains(want), "{args}: {stderr}");
        assert_eq!(left, pending, "{args}: pending afterwards");
        assert!(!stderr.contains(&token));
        outputs.push(stderr);
    }
    assert!(
        jenkins_uses(&efs, &sha5),
        "none of them reloaded anything: {:?}",
        casc_log(&efs)
    );

    // No private key on either instance's disk (their root file systems as files, outside the
    // tmpfs mounts of /run) or on the EFS; none in any output or journal.
    let t = Instant::now();
    let patterns = w.join("patterns");
    // Every unencrypted ed25519 key in the OpenSSH format starts with the same line (the
    // format's magic, "none" cipher, the key type): only the lines unique to a key identify it.
    let every: Vec<String> = all_keys.iter().flat_map(|k| key_lines(k)).collect();
    let lines: Vec<String> = every
        .iter()
        .filter(|l| every.iter().filter(|m| m == l).count() == 1)
        .cloned()
        .collect();
    assert!(lines.len() >= 5 * 3, "{} key lines", lines.len());
    std::fs::write(&patterns, lines.join("\n") + "\n").expect("write patterns");
    for (what, dir) in [
        ("the controller's disk", ctl.root.clone()),
        ("the agent's disk", agent.root.clone()),
        ("the EFS", efs.clone()),
    ] {
        let out = Command::new("grep")
            .args(["-rlaF", "--no-messages", "-f"])
            .arg(&patterns)
            .arg(&dir)
            .output()
            .expect("grep");
        assert!(
            out.stdout.is_empty(),
            "a private key on {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    std::fs::remove_file(&patterns).expect("rm patterns");
    let journals = [
        ctl.exec_ok("journalctl -b --no-pager -o cat"),
        agent.exec_ok("journalctl -b --no-pager -o cat"),
    ];
    for text in outputs.iter().chain(journals.iter()) {
        assert!(!text.contains("PRIVATE KEY"), "a private key in: {text}");
        for l in &lines {
            assert!(
                !text.contains(l.as_str()),
                "private key material in: {text}"
            );
        }
        assert!(!text.contains(&token), "the reload token in: {text}");
    }
    // The reload token is on no command line (Jenkins has it in its environment only).
    let cmdlines = ctl.exec_ok("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' || true");
    assert!(!cmdlines.contains(&token));
    assert!(!guest_has(
        &ctl,
        "/run/jenkins-secrets/.agent-ssh-key.jbake-tmp"
    ));
    eprintln!(
        "keys_instance: disks, EFS, outputs and journals searched in {:.1?}",
        t.elapsed()
    );
    eprintln!(
        "keys_instance: whole test {:.1?} (of which the two bakes in parallel {baked:.1?})",
        total.elapsed()
    );
}
