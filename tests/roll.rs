//! `jbake roll` and `jbake status` against moto (a launch template, an Auto Scaling group of
//! 1/1/1 behind an ALB, jbake-tagged controller and agent images) and a Jenkins stand-in over
//! real HTTP that records the order of the API calls and can act at a chosen call (a build
//! finishing, the new instance stopping, Ctrl-C).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::cli::{self, Run};
use crate::support::moto::{Moto, REGION};

pub(crate) const GROUP: &str = "jenkins";
const CREDS_PARAM: &str = "/jenkins/api-credentials";
const TOKEN: &str = "11d0c0ffee5ecret7oken";

/// Runs `tests/support/roll_fixture.py` against moto with `env`.
fn fixture_py(env: &[(String, String)], command: &str, args: Value) -> Value {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/roll_fixture.py"))
        .arg(command)
        .arg(args.to_string())
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().expect("run roll_fixture.py");
    assert!(
        out.status.success(),
        "roll_fixture.py {command} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("roll_fixture.py prints JSON")
}

/// The binary under test: `JBAKE_TEST_BIN` if set (a copy of this checkout's build, when
/// several checkouts share one CARGO_TARGET_DIR and so one debug/jbake), else cargo's.
pub(crate) fn jbake() -> Command {
    let mut c = cli::jbake();
    if let Some(bin) = std::env::var_os("JBAKE_TEST_BIN") {
        let mut own = Command::new(bin);
        own.current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        for var in [
            "AWS_REGION",
            "JBAKE_OUTPUT",
            "JBAKE_QUIET",
            "JBAKE_IDENTITY",
            "JBAKE_LOG",
        ] {
            own.env_remove(var);
        }
        c = own;
    }
    c
}

// ------------------------------------------------------------------ Jenkins stand-in

/// What the stand-in knows and answers.
#[derive(Default)]
struct JState {
    /// `METHOD /path` of every request, in order.
    calls: Vec<String>,
    /// Running builds reported by /computer/api/json.
    busy: u64,
    version: String,
    /// `Basic …` the API calls must carry (None: anonymous).
    auth: Option<String>,
    /// Protocol mistakes jbake made (a POST without crumb or session, bad credentials).
    violations: Vec<String>,
}

impl JState {
    fn count(&self, call: &str) -> usize {
        self.calls.iter().filter(|c| *c == call).count()
    }
}

type Hook = Box<dyn FnMut(&str, &mut JState) + Send>;

/// A Jenkins stand-in on 127.0.0.1: the crumb issuer, quiet-down and its cancel, the
/// executors' state, /login with X-Jenkins. One request per connection, served in order.
pub(crate) struct StandIn {
    port: u16,
    state: Arc<Mutex<JState>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

const CRUMB: &str = "c0ffee";
const SESSION: &str = "JSESSIONID.node0=abc123";

impl StandIn {
    fn start(busy: u64, version: &str) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the Jenkins stand-in");
        let port = listener.local_addr().expect("stand-in address").port();
        let state = Arc::new(Mutex::new(JState {
            busy,
            version: version.to_string(),
            ..JState::default()
        }));
        let hook: Arc<Mutex<Option<Hook>>> = Arc::new(Mutex::new(None));
        let (s, h) = (state.clone(), hook.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                serve(conn, &s, &h);
            }
        });
        StandIn { port, state, hook }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn on_call(&self, hook: impl FnMut(&str, &mut JState) + Send + 'static) {
        *self.hook.lock().expect("hook lock") = Some(Box::new(hook));
    }

    pub(crate) fn calls(&self) -> Vec<String> {
        self.state.lock().expect("state lock").calls.clone()
    }

    fn violations(&self) -> Vec<String> {
        self.state.lock().expect("state lock").violations.clone()
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<JState>, hook: &Mutex<Option<Hook>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let call = format!("{method} {path}");
    let mut st = state.lock().expect("state lock");
    st.calls.push(call.clone());
    if let Some(h) = hook.lock().expect("hook lock").as_mut() {
        h(&call, &mut st);
    }
    let authorized = st.auth.is_none() || header("authorization") == st.auth;
    let (status, extra, body): (u16, String, String) = match (method.as_str(), path.as_str()) {
        ("GET", "/login") => (
            200,
            format!("X-Jenkins: {}\r\nContent-Type: text/html\r\n", st.version),
            "<html>Sign in [Jenkins]</html>".into(),
        ),
        _ if !authorized => {
            st.violations
                .push(format!("{call} without the right credentials"));
            (401, String::new(), "unauthorized".into())
        }
        ("GET", "/crumbIssuer/api/json") => (
            200,
            format!(
                "Set-Cookie: {SESSION}; Path=/; HttpOnly\r\nContent-Type: application/json\r\n"
            ),
            json!({"crumb": CRUMB, "crumbRequestField": "Jenkins-Crumb"}).to_string(),
        ),
        ("POST", "/quietDown" | "/cancelQuietDown") => {
            let cookie_ok = header("cookie").is_some_and(|c| c.contains(SESSION));
            if header("jenkins-crumb").as_deref() != Some(CRUMB) || !cookie_ok {
                st.violations
                    .push(format!("{call} without the crumb and its session"));
                (
                    403,
                    String::new(),
                    "No valid crumb was included in the request".into(),
                )
            } else {
                (302, "Location: /\r\n".into(), String::new())
            }
        }
        ("GET", "/computer/api/json") => {
            let executors: Vec<Value> = (0..st.busy)
                .map(|n| json!({"currentExecutable": {"url": format!("http://jenkins/job/build/{}/", n + 1)}}))
                .chain(std::iter::once(json!({"currentExecutable": null})))
                .collect();
            (
                200,
                "Content-Type: application/json\r\n".into(),
                json!({"busyExecutors": st.busy, "computer": [
                    {"displayName": "Built-In Node", "executors": executors, "oneOffExecutors": []}
                ]})
                .to_string(),
            )
        }
        _ => (404, String::new(), "not found".into()),
    };
    drop(st);
    let reply = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes());
}

// ------------------------------------------------------------------ moto fixture

pub(crate) struct Fixture {
    pub(crate) moto: Moto,
    /// The environment of the fixture's own calls (roll_fixture.py).
    pub(crate) env: Vec<(String, String)>,
    old_ami: String,
    pub(crate) new_ami: String,
    agent_ami: String,
    pub(crate) instance: String,
    pub(crate) jenkins: StandIn,
}

fn controller_tags<'a>(version: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut t = vec![
        ("jbake:recipe", "jenkins-controller"),
        ("jbake:version", version),
        ("jbake:complete", "true"),
    ];
    t.extend_from_slice(extra);
    t
}

/// moto with the controller's infrastructure; the group runs the older controller image.
pub(crate) fn fixture(group_version: &str) -> Fixture {
    // A shared CARGO_TARGET_DIR holds one debug/jbake: say so when it is another checkout's.
    let help = Run::from_output(
        jbake()
            .args(["roll", "--help"])
            .output()
            .expect("run jbake"),
    );
    assert_eq!(
        help.code,
        0,
        "{} has no `roll` command: it was linked from another checkout sharing the target \
         folder; `touch src/main.rs` and run the tests again, or copy this checkout's build \
         and point JBAKE_TEST_BIN at the copy",
        std::env::var("JBAKE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_jbake").into())
    );
    let moto = Moto::start();
    let env = moto.env();
    let old_ami = moto.create_image_fixture(
        "jenkins-controller-2026.11.27-1",
        &controller_tags("2026.11.27-1", &[("jbake:jenkins-version", "2.479.2")]),
    );
    let agent_ami = moto.create_image_fixture(
        "jenkins-agent-2026.11.28-1",
        &[
            ("jbake:recipe", "jenkins-agent"),
            ("jbake:version", "2026.11.28-1"),
            ("jbake:complete", "true"),
        ],
    );
    let new_ami = moto.create_image_fixture(
        "jenkins-controller-2026.11.28-1",
        &controller_tags("2026.11.28-1", &[("jbake:jenkins-version", "2.479.3")]),
    );
    let out = fixture_py(
        &env,
        "setup",
        json!({"name": GROUP, "ami": old_ami, "group_version": group_version}),
    );
    let instance = out["instance"].as_str().expect("instance id").to_string();
    Fixture {
        moto,
        env,
        old_ami,
        new_ami,
        agent_ami,
        instance,
        jenkins: StandIn::start(0, "2.479.2"),
    }
}

impl Fixture {
    pub(crate) fn state(&self) -> Value {
        fixture_py(&self.env, "state", json!({"group": GROUP}))
    }

    fn roll_cmd(&self, extra: &[&str]) -> Command {
        self.roll_cmd_at(&self.jenkins.url(), extra)
    }

    /// `jbake roll` with Jenkins at `url`.
    fn roll_cmd_at(&self, url: &str, extra: &[&str]) -> Command {
        let mut cmd = jbake();
        self.moto.apply_env(&mut cmd);
        cmd.args(["roll", "--region", REGION, "--jenkins-url", url])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn roll(&self, extra: &[&str]) -> Run {
        Run::from_output(self.roll_cmd(extra).output().expect("run jbake roll"))
    }

    /// Runs jbake roll; `pid` holds its process id while it runs (for the hooks' SIGINT).
    fn roll_with_pid(&self, extra: &[&str], pid: &AtomicU32) -> Run {
        let child = self.roll_cmd(extra).spawn().expect("spawn jbake roll");
        pid.store(child.id(), Ordering::SeqCst);
        Run::from_output(child.wait_with_output().expect("wait for jbake roll"))
    }

    /// The group's running instances as EC2 sees them: `(id, image)`.
    pub(crate) fn running(&self) -> Vec<(String, String)> {
        self.state()["instances"]
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

    /// Whether `id` is still a running instance of the group.
    fn alive(env: &[(String, String)], id: &str) -> bool {
        fixture_py(env, "state", json!({"group": GROUP}))["instances"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["id"] == id && i["state"] == "running"))
    }
}

fn sigint(pid: &AtomicU32) {
    let pid = pid.load(Ordering::SeqCst);
    assert_ne!(pid, 0, "jbake's pid is known");
    let ok = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -INT {pid}");
}

/// API actions that change something.
fn writes(actions: &[String]) -> Vec<String> {
    actions
        .iter()
        .filter(|a| {
            [
                "Create",
                "Modify",
                "Update",
                "Terminate",
                "Put",
                "Delete",
                "Set",
                "Stop",
                "Run",
                "Register",
                "Deregister",
                "Attach",
                "Detach",
            ]
            .iter()
            .any(|w| a.starts_with(w))
        })
        .cloned()
        .collect()
}

fn version_data(state: &Value, number: i64) -> Value {
    state["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["number"] == number)
        .unwrap_or_else(|| panic!("no launch template version {number} in {state}"))
        .clone()
}

fn index_of(calls: &[String], call: &str) -> usize {
    calls
        .iter()
        .position(|c| c == call)
        .unwrap_or_else(|| panic!("no {call} in {calls:?}"))
}

// ------------------------------------------------------------------ tests

#[test]
fn roll_happy_path_drains_replaces_and_verifies() {
    let f = fixture("$Latest");
    f.moto
        .put_parameter(CREDS_PARAM, &format!("admin:{TOKEN}"), true);
    {
        let mut st = f.jenkins.state.lock().expect("state");
        st.busy = 1;
        st.auth = Some(format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("admin:{TOKEN}")
            )
        ));
    }
    // A build runs for the first two polls: the controller must stay up meanwhile; then
    // the build ends and Jenkins answers as the new version once replaced.
    let env = f.env.clone();
    let original = f.instance.clone();
    let alive_while_busy = Arc::new(Mutex::new(Vec::new()));
    let seen = alive_while_busy.clone();
    f.jenkins.on_call(move |call, st| {
        if call == "POST /quietDown" || (call == "GET /computer/api/json" && st.busy > 0) {
            seen.lock()
                .expect("seen")
                .push((call.to_string(), Fixture::alive(&env, &original)));
        }
        if call == "GET /computer/api/json" && st.count(call) >= 2 {
            st.busy = 0;
        }
        if call == "GET /login" && st.count("GET /login") >= 3 {
            st.version = "2.479.3".into();
        }
    });
    f.moto.start_recording();
    let run = f.roll(&["--yes", "--jenkins-credentials", CREDS_PARAM]);
    f.moto.stop_recording();
    run.assert_code(0);
    // Every call it made is allowed by iam/jbake-roll-policy.json (enforced by moto in
    // tests/iam.rs).
    let policy: Value = serde_json::from_str(
        &std::fs::read_to_string(cli::root().join("iam/jbake-roll-policy.json"))
            .expect("read iam/jbake-roll-policy.json"),
    )
    .expect("the policy is JSON");
    let allowed: Vec<&str> = policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .flat_map(|s| s["Action"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let actions = f.moto.recorded_actions();
    assert!(
        actions
            .iter()
            .any(|a| a == "TerminateInstanceInAutoScalingGroup"),
        "{actions:?}"
    );
    for a in &actions {
        assert!(
            allowed.contains(&iam_action(a).as_str()),
            "{} is not in the policy",
            iam_action(a)
        );
    }
    assert!(
        run.stdout
            .contains(&format!("rolled group {GROUP} to {}", f.new_ami)),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("downtime"), "{}", run.stdout);
    assert!(
        !run.stdout.contains(TOKEN) && !run.stderr.contains(TOKEN),
        "the API token was printed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        f.jenkins.violations().is_empty(),
        "{:?}",
        f.jenkins.violations()
    );
    // Quiet-down first; the controller was alive at quiet-down and at every busy answer.
    let calls = f.jenkins.calls();
    assert!(index_of(&calls, "POST /quietDown") < index_of(&calls, "GET /computer/api/json"));
    let seen = alive_while_busy.lock().expect("seen").clone();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(
        seen.iter().all(|(_, alive)| *alive),
        "terminated too early: {seen:?}"
    );
    assert!(!calls.contains(&"POST /cancelQuietDown".to_string()));

    // The group runs the new AMI (EC2's view), on an explicit new version holding all the
    // old version's data but the AMI, which is the default.
    let st = f.state();
    let running = f.running();
    assert_eq!(running.len(), 1, "{st}");
    assert_ne!(running[0].0, f.instance);
    assert_eq!(running[0].1, f.new_ami);
    assert_eq!(st["group_version"], "2", "{st}");
    let (v1, v2) = (version_data(&st, 1), version_data(&st, 2));
    assert_eq!(v2["default"], true);
    assert_eq!(v2["data"]["ImageId"], f.new_ami.as_str());
    let (mut d1, mut d2) = (v1["data"].clone(), v2["data"].clone());
    d1["ImageId"] = Value::Null;
    d2["ImageId"] = Value::Null;
    assert_eq!(d1, d2, "the new version must copy all of version 1's data");
    assert_eq!(v2["data"]["MetadataOptions"]["HttpPutResponseHopLimit"], 2);

    // jbake status shows it.
    let mut cmd = jbake();
    f.moto.apply_env(&mut cmd);
    let status = Run::from_output(
        cmd.args(["status", "--region", REGION, "--output", "json"])
            .output()
            .expect("run jbake status"),
    );
    status.assert_code(0);
    let ev = status.events();
    let s = &ev.last().expect("a status event")["result"];
    assert_eq!(s["group"], GROUP);
    assert_eq!(s["resolved_version"], 2);
    assert_eq!(s["instances"][0]["image"]["id"], f.new_ami.as_str());
    assert_eq!(s["instances"][0]["image"]["version"], "2026.11.28-1");
    assert_eq!(s["versions"][0]["number"], 2);
    assert_eq!(s["versions"][0]["default"], true);
    assert_eq!(s["versions"][1]["image"]["id"], f.old_ami.as_str());
    let new_id = running[0].0.as_str();
    assert!(
        s["targets"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["id"] == new_id && t["state"] == "healthy")),
        "{s}"
    );
}

#[test]
fn roll_up_to_date_is_a_no_op() {
    let f = fixture("1");
    f.moto.start_recording();
    let run = f.roll(&["--yes", "--asg", GROUP, "--ami", &f.old_ami.clone()]);
    f.moto.stop_recording();
    run.assert_code(0);
    assert!(run.stdout.contains("already up to date"), "{}", run.stdout);
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert!(f.jenkins.calls().is_empty(), "{:?}", f.jenkins.calls());
}

#[test]
fn roll_dry_run_makes_no_write_call() {
    let f = fixture("1");
    f.moto.start_recording();
    let run = f.roll(&["--dry-run"]);
    f.moto.stop_recording();
    run.assert_code(0);
    // The newest controller image is chosen (not the newer agent image).
    assert!(
        run.stdout.contains(&format!("new:     {}", f.new_ami)),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("current: {}", f.old_ami)),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("version 2: all of version 1's data"),
        "{}",
        run.stdout
    );
    let actions = f.moto.recorded_actions();
    assert!(
        actions.iter().any(|a| a == "DescribeAutoScalingGroups"),
        "{actions:?}"
    );
    assert_eq!(writes(&actions), Vec::<String>::new());
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );
    assert_eq!(f.running(), vec![(f.instance.clone(), f.old_ami.clone())]);
    // The plan as JSON.
    let json_run = f.roll(&["--dry-run", "--output", "json"]);
    json_run.assert_code(0);
    let events = json_run.events();
    let plan = events
        .iter()
        .find(|e| e["event"] == "plan")
        .unwrap_or_else(|| panic!("no plan event: {}", json_run.stdout));
    assert_eq!(plan["result"]["new"]["id"], f.new_ami.as_str());
    assert_eq!(plan["result"]["current"]["id"], f.old_ami.as_str());
    assert_eq!(plan["result"]["new_version"], 2);
}

#[test]
fn roll_refuses_bad_targets_before_any_change() {
    let f = fixture("1");
    f.moto.start_recording();
    let agent = f.roll(&["--yes", "--ami", &f.agent_ami.clone()]);
    let unknown = f.roll(&["--yes", "--asg", "no-such-group"]);
    let missing = f.roll(&["--yes", "--ami", "ami-0123456789abcdef0"]);
    // No terminal to ask on and no --yes: refused before any change.
    let unasked = f.roll(&[]);
    f.moto.stop_recording();
    agent.assert_code(2);
    assert!(
        agent
            .stderr
            .contains("built from the jenkins-agent recipe, not jenkins-controller"),
        "{}",
        agent.stderr
    );
    unknown.assert_code(2);
    assert!(
        unknown
            .stderr
            .contains("no Auto Scaling group named no-such-group"),
        "{}",
        unknown.stderr
    );
    missing.assert_code(2);
    assert!(
        missing
            .stderr
            .contains("AMI ami-0123456789abcdef0 does not exist"),
        "{}",
        missing.stderr
    );
    unasked.assert_code(2);
    assert!(unasked.stderr.contains("pass --yes"), "{}", unasked.stderr);
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );
}

/// Runs `jbake roll EXTRA` on a pseudo-terminal (util-linux `script`), typing `answer`;
/// stdout and stderr arrive together, as a user sees them.
fn roll_on_terminal(f: &Fixture, extra: &[&str], answer: &str) -> Run {
    let cmd = f.roll_cmd(extra);
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script");
    script
        .args([
            "--quiet",
            "--return",
            "--echo",
            "never",
            "--command",
            &line,
            "/dev/null",
        ])
        .current_dir(cli::root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let mut child = script.spawn().expect("run script");
    let mut stdin = child.stdin.take().expect("script's stdin");
    // The terminal buffers it until jbake reads its answer; stdin stays open until jbake
    // exits (an early EOF would make script hang up the terminal).
    stdin.write_all(answer.as_bytes()).expect("type the answer");
    let out = child.wait_with_output().expect("wait for script");
    drop(stdin);
    Run::from_output(out)
}

#[test]
fn roll_asks_on_a_terminal_and_no_changes_nothing() {
    if !crate::support::prereq::require(
        "script (util-linux) for a pseudo-terminal",
        crate::support::prereq::has_program("script"),
    ) {
        return;
    }
    let f = fixture("1");
    f.moto.start_recording();
    let no = roll_on_terminal(&f, &[], "n\n");
    f.moto.stop_recording();
    no.assert_code(1);
    let question = format!("roll group {GROUP} to {}? [y/N]", f.new_ami);
    assert!(no.stdout.contains(&question), "{}", no.stdout);
    assert!(
        no.stdout.contains("not confirmed: nothing was changed"),
        "{}",
        no.stdout
    );
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );
    assert_untouched(&f, "1");

    // The new image's Jenkins version answers once the controller is replaced.
    f.jenkins.state.lock().expect("state").version = "2.479.3".into();
    let yes = roll_on_terminal(&f, &["--health-timeout", "60s"], "y\n");
    yes.assert_code(0);
    assert!(yes.stdout.contains(&question), "{}", yes.stdout);
    assert!(yes.stdout.contains("rolled group"), "{}", yes.stdout);
    let running = f.running();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, f.new_ami);
}

/// A TLS front for the Jenkins stand-in (Python's `ssl`, certificate from `openssl`): Jenkins
/// behind HTTPS as users run it. Stopped by PID on drop.
struct TlsFront {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

const TLS_FRONT_PY: &str = r#"
import socket, ssl, sys, threading
cert, key, upstream = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
print(srv.getsockname()[1], flush=True)
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def serve(conn):
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError):
        conn.close()
        return
    up = socket.create_connection(("127.0.0.1", upstream))
    threading.Thread(target=pump, args=(up, tls), daemon=True).start()
    pump(tls, up)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

impl TlsFront {
    fn start(upstream: &str) -> TlsFront {
        let dir = tempfile::tempdir().expect("temp folder");
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // A CA, and a server certificate for 127.0.0.1 signed by it.
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=jbake test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
        let port = upstream
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .expect("stand-in port");
        let mut child = Command::new("python3")
            .args([
                "-c",
                TLS_FRONT_PY,
                "server.pem",
                "server.key",
                &port.to_string(),
            ])
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the TLS front");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read the TLS front's port");
        let port = line.trim().parse().expect("the TLS front prints its port");
        TlsFront {
            child,
            port,
            ca: d.join("ca.pem"),
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Jenkins behind HTTPS: with its CA trusted (SSL_CERT_FILE, as for any rustls/OpenSSL
/// program) the whole roll runs over TLS; with an unknown CA jbake says it cannot verify the
/// certificate and nothing is replaced.
#[test]
fn roll_talks_to_jenkins_over_https_and_refuses_an_unknown_certificate() {
    if !crate::support::prereq::require(
        "openssl for a test certificate",
        crate::support::prereq::has_program("openssl"),
    ) {
        return;
    }
    let f = fixture("1");
    let tls = TlsFront::start(&f.jenkins.url());
    let url = tls.url();

    // The machine's CAs only: the test CA is unknown. Jenkins cannot be drained, so jbake
    // refuses before any change.
    let mut cmd = f.roll_cmd_at(&url, &["--yes"]);
    cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
    f.moto.start_recording();
    let untrusted = Run::from_output(cmd.output().expect("run jbake roll"));
    f.moto.stop_recording();
    eprintln!("unknown CA:\n{}", untrusted.stderr);
    untrusted.assert_code(1);
    for want in [
        &url,
        "invalid peer certificate",
        "point SSL_CERT_FILE at that CA's PEM file",
        "Jenkins cannot be drained, so nothing was changed",
        "--no-drain",
    ] {
        assert!(
            untrusted.stderr.contains(want),
            "{want}: {}",
            untrusted.stderr
        );
    }
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert_untouched(&f, "1");
    assert_eq!(f.running(), vec![(f.instance.clone(), f.old_ami.clone())]);
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")) || f.jenkins.calls().is_empty(),
        "{:?}",
        f.jenkins.calls()
    );

    f.jenkins.state.lock().expect("state").version = "2.479.3".into();
    let mut cmd = f.roll_cmd_at(&url, &["--yes", "--health-timeout", "60s"]);
    cmd.env("SSL_CERT_FILE", &tls.ca).env_remove("SSL_CERT_DIR");
    let run = Run::from_output(cmd.output().expect("run jbake roll"));
    run.assert_code(0);
    assert!(run.stdout.contains("rolled group"), "{}", run.stdout);
    let calls = f.jenkins.calls();
    // Quiet-down (a POST with the crumb) went through TLS.
    index_of(&calls, "POST /quietDown");
    assert_eq!(f.running().len(), 1);
    assert_eq!(f.running()[0].1, f.new_ami);
}

/// Jenkins does not answer (nothing listens at its URL): the plan is shown (`--dry-run` works),
/// but the roll refuses before any change, since it cannot drain; `--no-drain` is the way to
/// replace a controller whose Jenkins is down, and skips the quiet-down.
#[test]
fn roll_without_a_reachable_jenkins_refuses_unless_no_drain() {
    let f = fixture("1");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let down = format!("http://127.0.0.1:{closed}");
    f.moto.start_recording();
    let dry = Run::from_output(
        f.roll_cmd_at(&down, &["--dry-run"])
            .output()
            .expect("run jbake roll"),
    );
    let refused = Run::from_output(
        f.roll_cmd_at(&down, &["--yes"])
            .output()
            .expect("run jbake roll"),
    );
    f.moto.stop_recording();
    dry.assert_code(0);
    assert!(
        dry.stdout.contains(&format!("new:     {}", f.new_ami)),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stderr.contains("did not answer GET /login"),
        "{}",
        dry.stderr
    );
    refused.assert_code(1);
    assert!(
        refused
            .stderr
            .contains("Jenkins cannot be drained, so nothing was changed"),
        "{}",
        refused.stderr
    );
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert_untouched(&f, "1");

    // --no-drain (here Jenkins answers, so the replacement can be verified): no quiet-down.
    f.jenkins.state.lock().expect("state").version = "2.479.3".into();
    let run = f.roll(&["--yes", "--no-drain", "--health-timeout", "60s"]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("no drain (--no-drain)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("--no-drain: Jenkins at"),
        "{}",
        run.stderr
    );
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );
    let running = f.running();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, f.new_ami);
}

/// Checks that the group, the template and the instance are as the fixture made them.
pub(crate) fn assert_untouched(f: &Fixture, group_version: &str) {
    let st = f.state();
    assert_eq!(st["group_version"], group_version, "{st}");
    assert_eq!(version_data(&st, 1)["default"], true, "{st}");
    assert_eq!(
        f.running(),
        vec![(f.instance.clone(), f.old_ami.clone())],
        "{st}"
    );
}

#[test]
fn roll_drain_timeout_cancels_quiet_down_and_changes_nothing() {
    let f = fixture("1");
    f.jenkins.state.lock().expect("state").busy = 2;
    let run = f.roll(&["--yes", "--drain-timeout", "2s"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("the drain timed out after 2.0s: 2 build(s) running"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("nothing was replaced"),
        "{}",
        run.stderr
    );
    let calls = f.jenkins.calls();
    assert!(index_of(&calls, "POST /quietDown") < index_of(&calls, "POST /cancelQuietDown"));
    assert!(
        f.jenkins.violations().is_empty(),
        "{:?}",
        f.jenkins.violations()
    );
    assert_untouched(&f, "1");
}

#[test]
fn roll_ctrl_c_before_replacement_leaves_the_group_as_it_was() {
    let f = fixture("$Latest");
    f.jenkins.state.lock().expect("state").busy = 1;
    let pid = Arc::new(AtomicU32::new(0));
    let p = pid.clone();
    f.jenkins.on_call(move |call, st| {
        if call == "GET /computer/api/json" && st.count(call) == 2 {
            sigint(&p);
        }
    });
    let run = f.roll_with_pid(&["--yes"], &pid);
    run.assert_code(130);
    assert!(
        run.stderr.contains("before the replacement"),
        "{}",
        run.stderr
    );
    let calls = f.jenkins.calls();
    assert!(index_of(&calls, "POST /quietDown") < index_of(&calls, "POST /cancelQuietDown"));
    // $Latest now means the new, unused version: the group names the version it meant.
    assert!(run.stderr.contains("it named $Latest"), "{}", run.stderr);
    assert_untouched(&f, "1");
}

#[test]
fn roll_ctrl_c_after_replacement_says_where_the_group_is() {
    let f = fixture("1");
    let pid = Arc::new(AtomicU32::new(0));
    let p = pid.clone();
    // /login: 1 before the plan, 2 just before the termination, 3 the first check after it.
    f.jenkins.on_call(move |call, st| {
        if call == "GET /login" && st.count(call) == 3 {
            sigint(&p);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let run = f.roll_with_pid(&["--yes"], &pid);
    run.assert_code(130);
    assert!(
        run.stderr.contains("after the replacement"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "{} was terminated; group {GROUP} points at launch template",
            f.instance
        )),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&format!(
            "jbake roll --region {REGION} --asg {GROUP} --ami {} --yes",
            f.old_ami
        )),
        "{}",
        run.stderr
    );
    assert!(run
        .stderr
        .contains(&format!("jbake status --region {REGION} --asg {GROUP}")));
    let st = f.state();
    assert_eq!(st["group_version"], "2", "{st}");
    assert!(!f.running().iter().any(|(id, _)| *id == f.instance));
    // It also says what the group has right now.
    let new_id = st["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["id"] != f.instance.as_str()))
        .and_then(|i| i["id"].as_str())
        .expect("a replacement")
        .to_string();
    let now = format!(
        "Right now: group {GROUP} has {new_id} InService (running, {})",
        f.new_ami
    );
    assert!(run.stderr.contains(&now), "{}", run.stderr);
}

#[test]
fn roll_health_failure_rolls_back() {
    let f = fixture("1");
    let env = f.env.clone();
    let original = f.instance.clone();
    // The first check after the termination: the new instance stops, so its target is
    // "unused" and never healthy.
    f.jenkins.on_call(move |call, st| {
        if call == "GET /login" && st.count(call) == 3 {
            fixture_py(
                &env,
                "stop-others",
                json!({"group": GROUP, "keep": original}),
            );
        }
    });
    // Long enough that, on a loaded machine too, the stop happens well before the deadline
    // and the last failure seen is the target's health (not the version the stand-in answers
    // before the stop).
    let run = f.roll(&["--yes", "--health-timeout", "15s"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains(&format!("the roll to {} failed", f.new_ami)),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("is unused"), "{}", run.stderr);
    assert!(run.stderr.contains("Rolled back"), "{}", run.stderr);
    let st = f.state();
    assert_eq!(st["group_version"], "1", "{st}");
    assert_eq!(version_data(&st, 1)["default"], true, "{st}");
    let running = f.running();
    assert_eq!(running.len(), 1, "{st}");
    assert_ne!(running[0].0, f.instance);
    assert_eq!(running[0].1, f.old_ami, "the old AMI serves again");
}

/// The IAM action for an API action jbake was recorded making.
pub(crate) fn iam_action(action: &str) -> String {
    let service = match action {
        "DescribeAutoScalingGroups"
        | "UpdateAutoScalingGroup"
        | "TerminateInstanceInAutoScalingGroup" => "autoscaling",
        "DescribeTargetGroups"
        | "DescribeLoadBalancers"
        | "DescribeListeners"
        | "DescribeTargetHealth" => "elasticloadbalancing",
        "GetParameter" => "ssm",
        _ => "ec2",
    };
    format!("{service}:{action}")
}
