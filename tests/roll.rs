//! `jbake roll` and `jbake status` against moto (a launch template, an Auto Scaling group of
//! 1/1/1 behind an ALB, jbake-tagged controller and agent images) and a stand-in for the
//! controllers themselves, over real HTTP: the [`World`].
//!
//! moto knows instances, not the Jenkins on them. The world plays what runs on each controller
//! instance moto launches, as the image would: it boots, its lease wrapper waits for the
//! JENKINS_HOME lease (answering the load balancer's health check with 503), takes it when it
//! is free, starts Jenkins (which answers with the version of its image and the instance
//! identity of its home), and lets it go on `/safeExit` (then, like the wrapper, it takes the
//! home back by itself once another controller held and released it, or after its hand-back
//! time). It is also the load balancer: requests to its URL go to a controller that serves.
//! moto asks it for target health and tells it what happens to instances (see the "jbake roll"
//! block of tests/support/moto_server.py). It records the order of the API calls, which
//! controller answered each, and a timeline, and it checks crumbs and credentials; a test can
//! act at a chosen call or event (a build finishing, an instance stopping, Ctrl-C).

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::cli::{self, Run};
use crate::support::moto::{Moto, REGION};

pub(crate) const GROUP: &str = "jenkins";
const CREDS_PARAM: &str = "/jenkins/api-credentials";
const TOKEN: &str = "11d0c0ffee5ecret7oken";
pub(crate) const EFS: &str = "fs-0123456789abcdef0";

/// Runs `tests/support/roll_fixture.py` against moto with `env`.
pub(crate) fn fixture_py(env: &[(String, String)], command: &str, args: Value) -> Value {
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

// ------------------------------------------------------------------ the controllers' world

/// How the controllers of one image behave.
#[derive(Debug, Clone)]
pub(crate) struct ImageModel {
    /// What Jenkins answers in `X-Jenkins`.
    pub(crate) version: String,
    /// It starts Jenkins only while it holds the JENKINS_HOME lease (`jbake:home-lease=1`).
    pub(crate) lease: bool,
    /// The JENKINS_HOME (EFS) it mounts: its lease, and the identity of its Jenkins.
    pub(crate) home: String,
    /// An identity other than its home's (an image that waits for the right lease, then
    /// serves another JENKINS_HOME).
    pub(crate) identity: Option<String>,
}

impl ImageModel {
    pub(crate) fn new(version: &str) -> ImageModel {
        ImageModel {
            version: version.to_string(),
            lease: true,
            home: "efs".to_string(),
            identity: None,
        }
    }

    fn identity(&self) -> String {
        self.identity
            .clone()
            .unwrap_or_else(|| identity_of(&self.home))
    }
}

/// The `X-Instance-Identity` of a home (like Jenkins': base64 of a public key's DER).
pub(crate) fn identity_of(home: &str) -> String {
    let hex: String = home.bytes().map(|b| format!("{b:02x}")).collect();
    format!("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA{hex}IDAQAB")
}

#[derive(Debug, Clone, PartialEq)]
enum CState {
    /// The instance boots (the lease wrapper is not up yet).
    Booting(Instant),
    /// The wrapper waits for the lease: the health check gets 503.
    Waiting,
    /// It holds the lease; Jenkins starts (refuses connections).
    Starting(Instant),
    Serving,
    /// Jenkins exited cleanly (`/safeExit`): the wrapper released the lease and takes it back
    /// once another controller held and released it (`armed`), or after the hand-back time.
    Standby {
        since: Instant,
        armed: bool,
    },
    /// Jenkins exited and nothing restarts it (an image without the lease wrapper).
    Exited,
    /// Terminated or stopped.
    Down,
}

#[derive(Debug, Clone)]
struct Controller {
    id: String,
    ami: String,
    model: ImageModel,
    state: CState,
    /// `/safeExit` (waits for builds) or `/exit` (at once) was asked.
    exit: Option<&'static str>,
}

/// What the world knows and answers.
pub(crate) struct JState {
    /// `METHOD /path` of every Jenkins request through the load balancer, in order.
    calls: Vec<String>,
    /// `(call, instance that answered or "-")`.
    routed: Vec<(String, String)>,
    /// Running builds reported by /computer/api/json.
    pub(crate) busy: u64,
    /// `Basic …` the API calls must carry (None: anonymous).
    pub(crate) auth: Option<String>,
    /// Protocol mistakes jbake made (a POST without crumb or session, bad credentials).
    violations: Vec<String>,
    controllers: Vec<Controller>,
    /// Who holds each home's lease.
    leases: HashMap<String, String>,
    images: HashMap<String, ImageModel>,
    /// How an image with no model behaves (None: as an unknown Jenkins).
    default_model: Option<ImageModel>,
    /// Instances launched from these AMIs are not controllers (a bake's build instances).
    not_controllers: Vec<String>,
    /// What happened, in order: `(ms since the world started, what)`.
    timeline: Vec<(u128, String)>,
    /// The most controllers that served one home at the same moment.
    max_serving: usize,
    t0: Instant,
    boot: Duration,
    start: Duration,
    handback: Duration,
    rr: usize,
}

impl JState {
    fn log(&mut self, what: String) {
        self.timeline.push((self.t0.elapsed().as_millis(), what));
    }

    fn take(&mut self, i: usize, now: Instant) {
        let (id, home) = (
            self.controllers[i].id.clone(),
            self.controllers[i].model.home.clone(),
        );
        self.leases.insert(home.clone(), id.clone());
        for c in self.controllers.iter_mut() {
            if c.id != id && c.model.home == home {
                if let CState::Standby { armed, .. } = &mut c.state {
                    *armed = true;
                }
            }
        }
        self.controllers[i].state = CState::Starting(now + self.start);
        self.log(format!("{id} takes the lease of {home}"));
    }

    fn release(&mut self, id: &str) {
        let home = self
            .controllers
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.model.home.clone());
        if let Some(home) = home {
            if self.leases.get(&home).map(String::as_str) == Some(id) {
                self.leases.remove(&home);
                self.log(format!("{id} releases the lease of {home}"));
            }
        }
    }

    /// Moves every controller on as far as `now` allows.
    fn advance(&mut self) {
        let now = Instant::now();
        loop {
            let mut changed = false;
            for i in 0..self.controllers.len() {
                let c = self.controllers[i].clone();
                let free = !self.leases.contains_key(&c.model.home);
                match c.state {
                    CState::Booting(until) if now >= until => {
                        if c.model.lease {
                            self.controllers[i].state = CState::Waiting;
                            self.log(format!("{} waits for the lease", c.id));
                        } else {
                            self.controllers[i].state = CState::Starting(now + self.start);
                            self.log(format!("{} starts Jenkins (no lease)", c.id));
                        }
                        changed = true;
                    }
                    CState::Waiting if free => {
                        self.take(i, now);
                        changed = true;
                    }
                    CState::Starting(until) if now >= until => {
                        self.controllers[i].state = CState::Serving;
                        self.log(format!("{} serves Jenkins {}", c.id, c.model.version));
                        changed = true;
                    }
                    CState::Serving
                        if c.exit == Some("exit") || (c.exit.is_some() && self.busy == 0) =>
                    {
                        self.controllers[i].exit = None;
                        self.log(format!("{} stops Jenkins ({})", c.id, c.exit.unwrap_or("")));
                        self.release(&c.id);
                        self.controllers[i].state = if c.model.lease {
                            CState::Standby {
                                since: now,
                                armed: false,
                            }
                        } else {
                            CState::Exited
                        };
                        changed = true;
                    }
                    CState::Standby { since, armed }
                        if free && (armed || now.duration_since(since) >= self.handback) =>
                    {
                        self.log(format!(
                            "{} takes the home back ({})",
                            c.id,
                            if armed {
                                "the other controller let it go"
                            } else {
                                "hand-back time"
                            }
                        ));
                        self.take(i, now);
                        changed = true;
                    }
                    _ => {}
                }
            }
            if !changed {
                break;
            }
        }
        let mut per_home: HashMap<&str, usize> = HashMap::new();
        for c in &self.controllers {
            if c.state == CState::Serving {
                *per_home.entry(c.model.home.as_str()).or_default() += 1;
            }
        }
        let most = per_home.values().copied().max().unwrap_or(0);
        self.max_serving = self.max_serving.max(most);
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.controllers.iter().position(|c| c.id == id)
    }

    fn event(&mut self, event: &str, id: &str, ami: Option<&str>) {
        let now = Instant::now();
        match event {
            "launched" => {
                let ami = ami.unwrap_or_default().to_string();
                if self.not_controllers.contains(&ami) {
                    self.log(format!("{id} launched from {ami} (not a controller)"));
                    return;
                }
                let model = self
                    .images
                    .get(&ami)
                    .cloned()
                    .or_else(|| self.default_model.clone())
                    .unwrap_or_else(|| ImageModel::new("unknown"));
                self.log(format!("{id} launched from {ami}"));
                self.controllers.push(Controller {
                    id: id.to_string(),
                    ami,
                    model,
                    state: CState::Booting(now + self.boot),
                    exit: None,
                });
            }
            "terminated" | "stopped" => {
                if let Some(i) = self.index(id) {
                    self.release(id);
                    self.controllers[i].state = CState::Down;
                    self.log(format!("{id} {event}"));
                }
            }
            "rebooted" | "started" => {
                if let Some(i) = self.index(id) {
                    self.release(id);
                    self.controllers[i].state = CState::Booting(now + self.boot);
                    self.log(format!("{id} {event}"));
                }
            }
            _ => {}
        }
        self.advance();
    }

    fn health(&mut self, id: &str) -> Option<Value> {
        self.advance();
        let c = self.controllers.iter().find(|c| c.id == id)?;
        let (state, reason) = match c.state {
            CState::Booting(_) => ("initial", Some("Elb.InitialHealthChecking")),
            CState::Waiting | CState::Standby { .. } => {
                ("unhealthy", Some("Target.ResponseCodeMismatch"))
            }
            CState::Starting(_) | CState::Exited | CState::Down => {
                ("unhealthy", Some("Target.FailedHealthChecks"))
            }
            CState::Serving => ("healthy", None),
        };
        Some(json!({"state": state, "reason": reason}))
    }

    fn count(&self, call: &str) -> usize {
        self.calls.iter().filter(|c| *c == call).count()
    }
}

type Hook = Box<dyn FnMut(&str, usize, &World) + Send>;

/// The controllers' world on 127.0.0.1: the load balancer's URL (Jenkins' API: the crumb
/// issuer, quiet-down and its cancel, the executors' state, `/safeExit`, `/exit`, `/restart`,
/// `/login` with X-Jenkins and X-Instance-Identity) and moto's callbacks (`/__world__/…`).
/// One thread per connection; a hook runs without the world's lock held.
#[derive(Clone)]
pub(crate) struct World {
    port: u16,
    state: Arc<Mutex<JState>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

const CRUMB: &str = "c0ffee";
const SESSION: &str = "JSESSIONID.node0=abc123";

impl World {
    fn start() -> World {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the world");
        let port = listener.local_addr().expect("world address").port();
        let world = World {
            port,
            state: Arc::new(Mutex::new(JState {
                calls: Vec::new(),
                routed: Vec::new(),
                busy: 0,
                auth: None,
                violations: Vec::new(),
                controllers: Vec::new(),
                leases: HashMap::new(),
                images: HashMap::new(),
                default_model: None,
                not_controllers: Vec::new(),
                timeline: Vec::new(),
                max_serving: 0,
                t0: Instant::now(),
                boot: Duration::from_millis(400),
                start: Duration::from_millis(300),
                handback: Duration::from_secs(3),
                rr: 0,
            })),
            hook: Arc::new(Mutex::new(None)),
        };
        let w = world.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let w = w.clone();
                std::thread::spawn(move || serve(conn, &w));
            }
        });
        world
    }

    /// The load balancer's URL.
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut JState) -> T) -> T {
        f(&mut self.state.lock().expect("world lock"))
    }

    /// Runs `hook(call, how many such calls so far, world)` at every request, before it is
    /// answered (calls: `METHOD /path`, `EVENT kind i-…`, `HEALTH i-…`).
    fn on_call(&self, hook: impl FnMut(&str, usize, &World) + Send + 'static) {
        *self.hook.lock().expect("hook lock") = Some(Box::new(hook));
    }

    pub(crate) fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    fn routed(&self) -> Vec<(String, String)> {
        self.with(|s| s.routed.clone())
    }

    fn violations(&self) -> Vec<String> {
        self.with(|s| s.violations.clone())
    }

    fn timeline(&self) -> Vec<String> {
        self.with(|s| s.timeline.iter().map(|(_, w)| w.clone()).collect())
    }

    /// The most controllers that ever served one JENKINS_HOME at the same moment.
    fn max_serving(&self) -> usize {
        self.with(|s| s.max_serving)
    }

    fn image(&self, ami: &str, model: ImageModel) {
        self.with(|s| s.images.insert(ami.to_string(), model));
    }

    /// Images made during the test (a bake's) behave as `model`.
    pub(crate) fn default_image(&self, model: ImageModel) {
        self.with(|s| s.default_model = Some(model));
    }

    /// Instances launched from `ami` (a bake's base image) are not controllers.
    pub(crate) fn not_controllers_from(&self, ami: &str) {
        self.with(|s| s.not_controllers.push(ami.to_string()));
    }

    /// The controller that runs at set-up (launched before the world was listening): it serves
    /// and holds its home's lease.
    fn serving(&self, id: &str, ami: &str) {
        self.with(|s| {
            let model = s.images.get(ami).cloned().expect("a model for the AMI");
            s.leases.insert(model.home.clone(), id.to_string());
            s.controllers.push(Controller {
                id: id.to_string(),
                ami: ami.to_string(),
                model,
                state: CState::Serving,
                exit: None,
            });
            s.log(format!("{id} serves (set-up)"));
        });
    }

    /// The controllers serving now: `(instance, ami)`.
    fn serving_now(&self) -> Vec<(String, String)> {
        self.with(|s| {
            s.advance();
            s.controllers
                .iter()
                .filter(|c| c.state == CState::Serving)
                .map(|c| (c.id.clone(), c.ami.clone()))
                .collect()
        })
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn read_request(conn: &mut TcpStream) -> Option<Request> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
    })
}

fn reply(conn: &mut TcpStream, status: u16, extra: &str, body: &str) {
    let text = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(text.as_bytes());
}

fn serve(mut conn: TcpStream, world: &World) {
    let Some(req) = read_request(&mut conn) else {
        return;
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    // moto's callbacks.
    if req.path == "/__world__/event" {
        let v: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let (event, id) = (
            v["event"].as_str().unwrap_or_default().to_string(),
            v["instance"].as_str().unwrap_or_default().to_string(),
        );
        world.with(|s| s.event(&event, &id, v["image"].as_str()));
        run_hook(world, &format!("EVENT {event} {id}"), 0);
        reply(&mut conn, 200, "Content-Type: application/json\r\n", "{}");
        return;
    }
    if req.path == "/__world__/health" {
        let id = req
            .query
            .strip_prefix("instance=")
            .unwrap_or_default()
            .to_string();
        run_hook(world, &format!("HEALTH {id}"), 0);
        match world.with(|s| s.health(&id)) {
            Some(h) => reply(
                &mut conn,
                200,
                "Content-Type: application/json\r\n",
                &h.to_string(),
            ),
            None => reply(&mut conn, 404, "", "unknown instance"),
        }
        return;
    }
    // The load balancer: Jenkins' API on a controller that serves.
    let call = format!("{} {}", req.method, req.path);
    let count = world.with(|s| {
        s.calls.push(call.clone());
        s.count(&call)
    });
    run_hook(world, &call, count);
    let mut st = world.state.lock().expect("world lock");
    st.advance();
    let serving: Vec<usize> = (0..st.controllers.len())
        .filter(|i| st.controllers[*i].state == CState::Serving)
        .collect();
    let Some(&target) = serving.get(st.rr % serving.len().max(1)) else {
        st.routed.push((call.clone(), "-".to_string()));
        drop(st);
        // No healthy target: what an ALB answers.
        reply(&mut conn, 503, "", "503 Service Temporarily Unavailable");
        return;
    };
    st.rr = st.rr.wrapping_add(1);
    let c = st.controllers[target].clone();
    st.routed.push((call.clone(), c.id.clone()));
    let authorized = st.auth.is_none() || header("authorization") == st.auth;
    let crumbed = header("jenkins-crumb").as_deref() == Some(CRUMB)
        && header("cookie").is_some_and(|c| c.contains(SESSION));
    let identity = c.model.identity();
    let id_header = format!("X-Instance-Identity: {identity}\r\n");
    let (status, extra, body): (u16, String, String) = match (req.method.as_str(), req.path.as_str())
    {
        ("GET", "/login") => (
            200,
            format!(
                "X-Jenkins: {}\r\n{id_header}Content-Type: text/html\r\n",
                c.model.version
            ),
            "<html>Sign in [Jenkins]</html>".into(),
        ),
        _ if !authorized => {
            st.violations
                .push(format!("{call} without the right credentials"));
            (401, id_header, "unauthorized".into())
        }
        ("GET", "/crumbIssuer/api/json") => (
            200,
            format!(
                "Set-Cookie: {SESSION}; Path=/; HttpOnly\r\n{id_header}Content-Type: application/json\r\n"
            ),
            json!({"crumb": CRUMB, "crumbRequestField": "Jenkins-Crumb"}).to_string(),
        ),
        ("POST", _) if !crumbed => {
            st.violations
                .push(format!("{call} without the crumb and its session"));
            (403, id_header, "No valid crumb was included in the request".into())
        }
        ("POST", "/quietDown" | "/cancelQuietDown") => (302, format!("Location: /\r\n{id_header}"), String::new()),
        ("POST", "/safeExit" | "/exit") => {
            st.controllers[target].exit = Some(if req.path == "/exit" { "exit" } else { "safeExit" });
            st.log(format!("{} asked to stop ({})", c.id, &req.path[1..]));
            st.advance();
            (200, id_header, String::new())
        }
        ("POST", "/restart" | "/safeRestart") => {
            let until = Instant::now() + st.start;
            st.controllers[target].state = CState::Starting(until);
            st.log(format!("{} restarts Jenkins, keeping the lease", c.id));
            (302, format!("Location: /\r\n{id_header}"), String::new())
        }
        ("GET", "/computer/api/json") => {
            let executors: Vec<Value> = (0..st.busy)
                .map(|n| json!({"currentExecutable": {"url": format!("http://jenkins/job/build/{}/", n + 1)}}))
                .chain(std::iter::once(json!({"currentExecutable": null})))
                .collect();
            (
                200,
                format!("{id_header}Content-Type: application/json\r\n"),
                json!({"busyExecutors": st.busy, "computer": [
                    {"displayName": "Built-In Node", "executors": executors, "oneOffExecutors": []}
                ]})
                .to_string(),
            )
        }
        _ => (404, id_header, "not found".into()),
    };
    drop(st);
    reply(&mut conn, status, &extra, &body);
}

fn run_hook(world: &World, call: &str, count: usize) {
    // Taken out while it runs: a hook may call moto, whose callbacks come back here.
    let hook = world.hook.lock().expect("hook lock").take();
    if let Some(mut h) = hook {
        h(call, count, world);
        let mut slot = world.hook.lock().expect("hook lock");
        if slot.is_none() {
            *slot = Some(h);
        }
    }
}

/// The controllers' world for another test's moto fixture (tests/terraform.rs): `instance`
/// serves from `ami` and holds the lease; every image of `images` answers as Jenkins `version`.
/// Jenkins' URL (the load balancer) is `world.url()`.
pub(crate) fn world_for(
    moto: &Moto,
    instance: &str,
    ami: &str,
    images: &[&str],
    version: &str,
) -> World {
    let world = World::start();
    for image in images {
        world.image(image, ImageModel::new(version));
    }
    world.serving(instance, ami);
    let (status, _) = crate::support::moto::http(
        moto.port(),
        "POST",
        "/jbake-test/world",
        "text/plain",
        &world.url(),
    )
    .expect("tell moto where the world is");
    assert_eq!(status, 200, "moto_server.py has no world endpoint");
    world
}

// ------------------------------------------------------------------ moto fixture

pub(crate) struct Fixture {
    pub(crate) moto: Moto,
    /// The environment of the fixture's own calls (roll_fixture.py).
    pub(crate) env: Vec<(String, String)>,
    pub(crate) old_ami: String,
    pub(crate) new_ami: String,
    agent_ami: String,
    pub(crate) instance: String,
    /// The controllers and the load balancer (`f.jenkins.url()` is Jenkins' URL).
    pub(crate) jenkins: World,
}

/// The tags of a controller image baked by jbake for the fixture's EFS, with the lease.
pub(crate) fn controller_tags<'a>(
    version: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut t = vec![
        ("jbake:recipe", "jenkins-controller"),
        ("jbake:version", version),
        ("jbake:complete", "true"),
        // It passed its boot test (`jbake roll` refuses an untested image by default).
        ("jbake:tested", "true"),
        ("jbake:efs-id", EFS),
        ("jbake:efs-path", "/"),
        ("jbake:home-lease", "1"),
        ("jbake:home-init", "false"),
    ];
    for (k, v) in extra {
        match t.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v,
            None => t.push((k, v)),
        }
    }
    t
}

/// moto with the controller's infrastructure; the group runs the older controller image.
pub(crate) fn fixture(group_version: &str) -> Fixture {
    fixture_with(group_version, json!({}))
}

/// [`fixture`] with more set-up arguments (`min`, `max`, `desired`).
pub(crate) fn fixture_with(group_version: &str, extra: Value) -> Fixture {
    // A shared CARGO_TARGET_DIR holds one debug/jbake: say so when it is another checkout's.
    let help = Run::from_output(
        jbake()
            .args(["roll", "--help"])
            .output()
            .expect("run jbake"),
    );
    assert!(
        help.code == 0 && help.stdout.contains("--strategy"),
        "{} has no `roll --strategy`: it was linked from another checkout sharing the target \
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
    let mut args = json!({"name": GROUP, "ami": old_ami, "group_version": group_version});
    if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    let out = fixture_py(&env, "setup", args);
    let instance = out["instance"].as_str().expect("instance id").to_string();
    let world = World::start();
    world.image(&old_ami, ImageModel::new("2.479.2"));
    world.image(&new_ami, ImageModel::new("2.479.3"));
    world.serving(&instance, &old_ami);
    let (status, _) = crate::support::moto::http(
        moto.port(),
        "POST",
        "/jbake-test/world",
        "text/plain",
        &world.url(),
    )
    .expect("tell moto where the world is");
    assert_eq!(status, 200, "moto_server.py has no world endpoint");
    Fixture {
        moto,
        env,
        old_ami,
        new_ami,
        agent_ami,
        instance,
        jenkins: world,
    }
}

impl Fixture {
    pub(crate) fn state(&self) -> Value {
        fixture_py(&self.env, "state", json!({"group": GROUP}))
    }

    /// Another controller image in moto (tags as [`controller_tags`] plus `extra`), behaving as
    /// `model`.
    fn image(&self, name: &str, extra: &[(&str, &str)], model: ImageModel) -> String {
        let ami = self
            .moto
            .create_image_fixture(name, &controller_tags("2026.11.29-1", extra));
        self.jenkins.image(&ami, model);
        ami
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
                "Suspend",
                "Resume",
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

fn position(list: &[String], what: &str) -> usize {
    list.iter()
        .position(|c| c.contains(what))
        .unwrap_or_else(|| panic!("nothing like {what:?} in {list:#?}"))
}

/// Checks that the group, the template and the instance are as the fixture made them, the
/// processes resumed and the roll lock released.
pub(crate) fn assert_untouched(f: &Fixture, group_version: &str) {
    let st = f.state();
    assert_eq!(st["group_version"], group_version, "{st}");
    assert_eq!(version_data(&st, 1)["default"], true, "{st}");
    assert_eq!(
        f.running(),
        vec![(f.instance.clone(), f.old_ami.clone())],
        "{st}"
    );
    assert_as_before(f, &st);
}

/// The group is at its original sizes, nothing suspended or protected, no roll lock left.
fn assert_as_before(f: &Fixture, st: &Value) {
    assert_eq!(st["sizes"], json!([1, 1, 1]), "sizes: {st}");
    assert_eq!(st["suspended"], json!([]), "suspended processes: {st}");
    assert_eq!(st["protected"], json!([]), "scale-in protection: {st}");
    assert_eq!(st["lock"], Value::Null, "the roll lock is left: {st}");
    let _ = f;
}

/// One Jenkins serves (the world's load balancer), with the fixture's JENKINS_HOME.
fn assert_serving(f: &Fixture, ami: &str) -> String {
    let serving = f.jenkins.serving_now();
    assert_eq!(serving.len(), 1, "{serving:?}\n{:#?}", f.jenkins.timeline());
    assert_eq!(serving[0].1, ami, "{:#?}", f.jenkins.timeline());
    assert_eq!(
        f.jenkins.max_serving(),
        1,
        "two Jenkins on one home: {:#?}",
        f.jenkins.timeline()
    );
    serving[0].0.clone()
}

/// The credentials header for `admin:TOKEN`.
fn basic_auth() -> String {
    format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("admin:{TOKEN}")
        )
    )
}

// ------------------------------------------------------------------ tests: the handover

/// The IAM actions of `iam/jbake-roll-policy.json`.
fn policy_actions() -> Vec<String> {
    let policy: Value = serde_json::from_str(
        &std::fs::read_to_string(cli::root().join("iam/jbake-roll-policy.json"))
            .expect("read iam/jbake-roll-policy.json"),
    )
    .expect("the policy is JSON");
    policy["Statement"]
        .as_array()
        .expect("statements")
        .iter()
        .flat_map(|s| match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![],
        })
        .collect()
}

#[test]
fn roll_handover_boots_the_successor_while_the_old_controller_serves() {
    let f = fixture("$Latest");
    f.moto
        .put_parameter(CREDS_PARAM, &format!("admin:{TOKEN}"), true);
    f.jenkins.with(|s| {
        s.busy = 1;
        s.auth = Some(basic_auth());
    });
    // A build runs for the first two polls; the old controller serves meanwhile.
    f.jenkins.on_call(|call, n, w| {
        if call == "GET /computer/api/json" && n >= 2 {
            w.with(|s| s.busy = 0);
        }
    });
    let before = f.state();
    f.moto.start_recording();
    let run = f.roll(&[
        "--yes",
        "--jenkins-credentials",
        CREDS_PARAM,
        "--allow-insecure-http",
    ]);
    f.moto.stop_recording();
    eprintln!("{}\n{}", run.stdout, run.stderr);
    run.assert_code(0);
    assert!(
        run.stdout
            .contains(&format!("rolled group {GROUP} to {}", f.new_ami)),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("handover"), "{}", run.stdout);
    assert!(run.stdout.contains("same JENKINS_HOME"), "{}", run.stdout);
    assert!(run.stdout.contains("downtime"), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("--allow-insecure-http: the Jenkins credentials go to"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stdout.contains(TOKEN) && !run.stderr.contains(TOKEN),
        "the API token was printed"
    );
    assert!(
        f.jenkins.violations().is_empty(),
        "{:?}",
        f.jenkins.violations()
    );

    // The AWS writes, in order: the lock, the template, the group, and back.
    let actions = f.moto.recorded_actions();
    assert_eq!(
        writes(&actions),
        [
            "PutParameter",
            "CreateLaunchTemplateVersion",
            "ModifyLaunchTemplate",
            "UpdateAutoScalingGroup",
            "SuspendProcesses",
            "SetInstanceProtection",
            "UpdateAutoScalingGroup",
            "TerminateInstanceInAutoScalingGroup",
            "UpdateAutoScalingGroup",
            "ResumeProcesses",
            "DeleteParameter",
        ],
        "{actions:?}"
    );
    let requests = f.moto.recorded_requests();
    let params = |action: &str, nth: usize| {
        requests
            .iter()
            .filter(|r| r.action == action)
            .nth(nth)
            .unwrap_or_else(|| panic!("no {action} #{nth}"))
            .params
            .clone()
    };
    // EC2 copies the version itself; only the changed field is sent.
    let create = params("CreateLaunchTemplateVersion", 0);
    assert_eq!(
        create.get("SourceVersion").map(String::as_str),
        Some("1"),
        "{create:?}"
    );
    let data: Vec<&String> = create
        .keys()
        .filter(|k| k.starts_with("LaunchTemplateData"))
        .collect();
    assert_eq!(data, ["LaunchTemplateData.ImageId"], "{create:?}");
    let raise = params("UpdateAutoScalingGroup", 1);
    assert_eq!(
        raise.get("MaxSize").map(String::as_str),
        Some("2"),
        "{raise:?}"
    );
    assert_eq!(
        raise.get("DesiredCapacity").map(String::as_str),
        Some("2"),
        "{raise:?}"
    );
    let suspend = params("SuspendProcesses", 0);
    let mut suspended: Vec<&str> = suspend
        .iter()
        .filter(|(k, _)| k.starts_with("ScalingProcesses"))
        .map(|(_, v)| v.as_str())
        .collect();
    suspended.sort();
    assert_eq!(
        suspended,
        [
            "AZRebalance",
            "AlarmNotification",
            "HealthCheck",
            "InstanceRefresh",
            "ReplaceUnhealthy",
            "ScheduledActions"
        ]
    );
    let terminate = params("TerminateInstanceInAutoScalingGroup", 0);
    assert_eq!(
        terminate.get("InstanceId"),
        Some(&f.instance),
        "{terminate:?}"
    );
    assert_eq!(
        terminate
            .get("ShouldDecrementDesiredCapacity")
            .map(String::as_str),
        Some("true"),
        "the old instance goes, lowering the desired capacity"
    );
    let restore = params("UpdateAutoScalingGroup", 2);
    assert_eq!(
        restore.get("MaxSize").map(String::as_str),
        Some("1"),
        "{restore:?}"
    );
    // Every call it made is allowed by iam/jbake-roll-policy.json (enforced in tests/iam.rs).
    let allowed = policy_actions();
    for a in &actions {
        assert!(
            allowed.contains(&iam_action(a)),
            "{} is not in the policy",
            iam_action(a)
        );
    }

    // Jenkins: quiet-down and the stop went to the old controller, after the successor was
    // waiting; the lease passed from one to the other; never two Jenkins on the home.
    let calls = f.jenkins.calls();
    assert!(index_of(&calls, "POST /quietDown") < index_of(&calls, "GET /computer/api/json"));
    assert!(index_of(&calls, "GET /computer/api/json") < index_of(&calls, "POST /safeExit"));
    assert!(!calls.contains(&"POST /cancelQuietDown".to_string()));
    let routed = f.jenkins.routed();
    for call in ["POST /quietDown", "POST /safeExit"] {
        let (_, to) = routed.iter().find(|(c, _)| c == call).expect("routed");
        assert_eq!(to, &f.instance, "{call} went to {to}");
    }
    let new_id = assert_serving(&f, &f.new_ami);
    let t = f.jenkins.timeline();
    eprintln!("timeline:\n  {}", t.join("\n  "));
    let i = |what: &str| position(&t, what);
    assert!(i(&format!("{new_id} launched")) < i(&format!("{new_id} waits for the lease")));
    assert!(
        i(&format!("{new_id} waits for the lease")) < i(&format!("{} asked to stop", f.instance))
    );
    assert!(
        i(&format!("{} releases the lease", f.instance)) < i(&format!("{new_id} takes the lease"))
    );
    assert!(i(&format!("{new_id} takes the lease")) < i(&format!("{new_id} serves")));
    assert!(i(&format!("{new_id} serves")) < i(&format!("{} terminated", f.instance)));

    // The group: the new AMI on an explicit new version (EC2's copy of version 1), the default;
    // sizes and processes as before, the lock gone.
    let st = f.state();
    assert_eq!(st["sizes"], before["sizes"]);
    assert_as_before(&f, &st);
    let running = f.running();
    assert_eq!(running, vec![(new_id.clone(), f.new_ami.clone())], "{st}");
    assert_eq!(st["group_version"], "2", "{st}");
    let (v1, v2) = (version_data(&st, 1), version_data(&st, 2));
    assert_eq!(v2["default"], true);
    assert_eq!(v2["data"]["ImageId"], f.new_ami.as_str());
    let (mut d1, mut d2) = (v1["data"].clone(), v2["data"].clone());
    d1["ImageId"] = Value::Null;
    d2["ImageId"] = Value::Null;
    assert_eq!(d1, d2, "the new version must hold all of version 1's data");
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
    assert_eq!(s["suspended"], json!([]));
    assert_eq!(s["roll_lock"], Value::Null);
    assert!(
        s["targets"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["id"] == new_id.as_str() && t["state"] == "healthy")),
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
    for want in [
        "version 2 from version 1 (EC2 copies it: SourceVersion)",
        "raise group jenkins to max 2 desired 2",
        "POST /safeExit",
        "same X-Instance-Identity",
        "lowering the desired capacity (back to 1), max back to 1",
    ] {
        assert!(run.stdout.contains(want), "{want}: {}", run.stdout);
    }
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
    assert_eq!(plan["result"]["strategy"], "handover");
}

#[test]
fn roll_refuses_what_cannot_be_made_safe_before_any_change() {
    let f = fixture("1");
    let other_efs = f.image(
        "jenkins-controller-other-efs",
        &[("jbake:efs-id", "fs-0fedcba9876543210")],
        ImageModel::new("2.479.3"),
    );
    let no_lease = f.image(
        "jenkins-controller-no-lease",
        &[("jbake:home-lease", "0")],
        ImageModel::new("2.479.3"),
    );
    let first_install = f.image(
        "jenkins-controller-first-install",
        &[("jbake:home-init", "true")],
        ImageModel::new("2.479.3"),
    );
    f.moto.start_recording();
    let agent = f.roll(&["--yes", "--ami", &f.agent_ami.clone()]);
    let unknown = f.roll(&["--yes", "--asg", "no-such-group"]);
    let missing = f.roll(&["--yes", "--ami", "ami-0123456789abcdef0"]);
    // No terminal to ask on and no --yes: refused before any change.
    let unasked = f.roll(&["--ami", &f.new_ami.clone()]);
    let efs = f.roll(&["--yes", "--ami", &other_efs]);
    let lease = f.roll(&["--yes", "--ami", &no_lease]);
    let init = f.roll(&["--yes", "--ami", &first_install]);
    f.moto.stop_recording();
    for (run, want) in [
        (
            &agent,
            "built from the jenkins-agent recipe, not jenkins-controller",
        ),
        (&unknown, "no Auto Scaling group named no-such-group"),
        (&missing, "AMI ami-0123456789abcdef0 does not exist"),
        (&unasked, "pass --yes"),
        (&efs, "was baked for EFS fs-0fedcba9876543210:/"),
        (&efs, &format!("for EFS {EFS}:/")),
        (&efs, "--allow-efs-change"),
        (&lease, "has no JENKINS_HOME lease"),
        (&lease, "--strategy replace"),
        (&init, "first-installation image"),
    ] {
        run.assert_code(2);
        assert!(run.stderr.contains(want), "{want}: {}", run.stderr);
    }
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );
    assert_untouched(&f, "1");

    // Credentials over plain HTTP: refused before any AWS call.
    f.moto.start_recording();
    let http = f.roll(&["--yes", "--jenkins-credentials", CREDS_PARAM]);
    f.moto.stop_recording();
    http.assert_code(2);
    assert!(
        http.stderr
            .contains("is plain HTTP: the Jenkins credentials would cross the network unencrypted")
            && http.stderr.contains("--allow-insecure-http"),
        "{}",
        http.stderr
    );
    assert_eq!(f.moto.recorded_actions(), Vec::<String>::new());

    // A group of more than one.
    let g = fixture_with("1", json!({"max": 2, "desired": 2}));
    let two = g.roll(&["--yes"]);
    two.assert_code(2);
    assert!(
        two.stderr
            .contains("group jenkins has desired capacity 2 (max 2): jbake roll replaces the single controller"),
        "{}",
        two.stderr
    );
}

#[test]
fn roll_takes_the_newest_tested_image_and_refuses_untested_and_failed_ones() {
    let f = fixture("1");
    // Newer than f.new_ami (2026.11.28-1): one never tested, one that failed its boot test.
    let mut untested_tags = controller_tags("2026.11.29-1", &[]);
    untested_tags.retain(|(k, _)| *k != "jbake:tested");
    let untested = f
        .moto
        .create_image_fixture("jenkins-controller-2026.11.29-1", &untested_tags);
    f.jenkins.image(&untested, ImageModel::new("2.479.3"));
    let failed = f.moto.create_image_fixture(
        "jenkins-controller-2026.11.30-1",
        &controller_tags(
            "2026.11.30-1",
            &[
                ("jbake:tested", "false"),
                ("jbake:tested-at", "2026-11-30T03:04:05Z"),
            ],
        ),
    );
    f.jenkins.image(&failed, ImageModel::new("2.479.3"));
    let chosen = |extra: &[&str]| {
        let mut args = vec!["--dry-run", "--output", "json"];
        args.extend_from_slice(extra);
        let run = f.roll(&args);
        run.assert_code(0);
        let events = run.events();
        let plan = events
            .iter()
            .find(|e| e["event"] == "plan")
            .unwrap_or_else(|| panic!("no plan event: {}", run.stdout));
        plan["result"]["new"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    f.moto.start_recording();
    // By default the newest image that passed its boot test; with --allow-untested the newest
    // that did not fail it; never the one that failed.
    assert_eq!(chosen(&[]), f.new_ami);
    assert_eq!(chosen(&["--allow-untested"]), untested);
    assert_eq!(chosen(&["--ami", &untested, "--allow-untested"]), untested);
    let refused_untested = f.roll(&["--yes", "--ami", &untested]);
    let refused_failed = f.roll(&["--yes", "--ami", &failed]);
    let refused_failed_anyway = f.roll(&["--yes", "--ami", &failed, "--allow-untested"]);
    f.moto.stop_recording();
    for (run, want) in [
        (&refused_untested, "has no boot test result"),
        (&refused_untested, "jbake test "),
        (&refused_untested, "--allow-untested"),
        (
            &refused_failed,
            "failed its boot test (jbake:tested=false at 2026-11-30T03:04:05Z)",
        ),
        (&refused_failed, "never rolled out"),
        (&refused_failed_anyway, "failed its boot test"),
    ] {
        run.assert_code(2);
        assert!(run.stderr.contains(want), "{want}: {}", run.stderr);
    }
    assert_eq!(writes(&f.moto.recorded_actions()), Vec::<String>::new());
    assert_untouched(&f, "1");
}

/// Runs `jbake roll EXTRA` on a pseudo-terminal (util-linux `script`); when the confirmation
/// question appears, runs `meanwhile`, then types `answer`. stdout and stderr arrive together,
/// as a user sees them.
fn roll_on_terminal_with(
    f: &Fixture,
    extra: &[&str],
    answer: &str,
    meanwhile: impl FnOnce(),
) -> Run {
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
    let stdout = child.stdout.take().expect("script's stdout");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut r = std::io::BufReader::new(stdout);
        let mut sent = false;
        loop {
            let buf = match r.fill_buf() {
                Ok([]) => break,
                Ok(b) => b.to_vec(),
                Err(_) => break,
            };
            r.consume(buf.len());
            out.extend_from_slice(&buf);
            if !sent && String::from_utf8_lossy(&out).contains("[y/N]") {
                let _ = tx.send(());
                sent = true;
            }
        }
        out
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_ok() {
        meanwhile();
    }
    // stdin stays open until jbake exits (an early EOF would make script hang up).
    stdin.write_all(answer.as_bytes()).expect("type the answer");
    let status = child.wait().expect("wait for script");
    let stdout = reader.join().expect("reader");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    drop(stdin);
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr,
    }
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
    let no = roll_on_terminal_with(&f, &[], "n\n", || {});
    f.moto.stop_recording();
    no.assert_code(1);
    let question = format!("roll group {GROUP} to {}? [y/N]", f.new_ami);
    assert!(no.stdout.contains(&question), "{}", no.stdout);
    assert!(
        no.stdout.contains("not confirmed: nothing was changed"),
        "{}",
        no.stdout
    );
    // The lock was taken for the question, and released.
    assert_eq!(
        writes(&f.moto.recorded_actions()),
        ["PutParameter", "DeleteParameter"]
    );
    assert!(
        f.jenkins.calls().iter().all(|c| c.starts_with("GET ")),
        "{:?}",
        f.jenkins.calls()
    );
    assert_untouched(&f, "1");

    let yes = roll_on_terminal_with(&f, &["--health-timeout", "60s"], "y\n", || {});
    yes.assert_code(0);
    assert!(yes.stdout.contains(&question), "{}", yes.stdout);
    assert!(yes.stdout.contains("rolled group"), "{}", yes.stdout);
    assert_serving(&f, &f.new_ami);
}

/// Someone changes the group while the confirmation question waits: jbake reads it again
/// before its first write and stops, changing nothing (and not undoing the other change).
#[test]
fn roll_stops_when_the_group_changed_while_the_question_waited() {
    if !crate::support::prereq::require(
        "script (util-linux) for a pseudo-terminal",
        crate::support::prereq::has_program("script"),
    ) {
        return;
    }
    let f = fixture("1");
    let env = f.env.clone();
    let run = roll_on_terminal_with(&f, &[], "y\n", move || {
        fixture_py(&env, "set-sizes", json!({"group": GROUP, "max": 3}));
    });
    run.assert_code(1);
    assert!(
        run.stdout.contains(
            "the sizes of group jenkins changed while jbake worked (it was min 1 max 1 desired 1, it is now min 1 max 3 desired 1)"
        ),
        "{}",
        run.stdout
    );
    let st = f.state();
    assert_eq!(
        st["sizes"],
        json!([1, 3, 1]),
        "the other change stays: {st}"
    );
    assert_eq!(
        st["versions"].as_array().map(Vec::len),
        Some(1),
        "no new version: {st}"
    );
    assert_eq!(st["group_version"], "1");
    assert_eq!(st["lock"], Value::Null);
    assert!(f.jenkins.calls().iter().all(|c| c.starts_with("GET ")));
    assert_eq!(f.running(), vec![(f.instance.clone(), f.old_ami.clone())]);
}

// ------------------------------------------------------------------ tests: the ways back

/// After a handover that did not finish: the original controller serves its home again (the
/// same instance, the old AMI, the same identity), the group is on its old launch template
/// version, at its sizes, its processes resumed, the lock released.
fn assert_rolled_back(f: &Fixture) {
    let st = f.state();
    assert_eq!(st["group_version"], "1", "{st}");
    assert_eq!(version_data(&st, 1)["default"], true, "{st}");
    assert_eq!(
        f.running(),
        vec![(f.instance.clone(), f.old_ami.clone())],
        "{st}\n{:#?}",
        f.jenkins.timeline()
    );
    assert_as_before(f, &st);
    assert_eq!(assert_serving(f, &f.old_ami), f.instance);
}

/// Ctrl-C in one phase of a handover (`trigger` says when: it returns true at the call or
/// event where jbake gets SIGINT). Returns the run.
fn ctrl_c_when(
    f: &Fixture,
    busy: u64,
    mut trigger: impl FnMut(&str, usize, &World) -> bool + Send + 'static,
) -> Run {
    f.jenkins.with(|s| s.busy = busy);
    let pid = Arc::new(AtomicU32::new(0));
    let p = pid.clone();
    let mut fired = false;
    f.jenkins.on_call(move |call, n, w| {
        if !fired && trigger(call, n, w) {
            fired = true;
            sigint(&p);
            // Let the signal land before the call is answered.
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let run = f.roll_with_pid(&["--yes", "--health-timeout", "30s"], &pid);
    eprintln!(
        "{}\n{}\ntimeline:\n  {}",
        run.stdout,
        run.stderr,
        f.jenkins.timeline().join("\n  ")
    );
    run.assert_code(130);
    run
}

/// Whether the world shows `id` in `state` (Debug name).
fn in_state(w: &World, id: &str, state: &str) -> bool {
    w.with(|s| {
        s.advance();
        s.controllers
            .iter()
            .any(|c| c.id == id && format!("{:?}", c.state).starts_with(state))
    })
}

fn successor_of(w: &World, old: &str) -> Option<String> {
    w.with(|s| {
        s.controllers
            .iter()
            .find(|c| c.id != old && c.state != CState::Down)
            .map(|c| c.id.clone())
    })
}

#[test]
fn roll_ctrl_c_while_the_successor_is_launched_puts_everything_back() {
    let f = fixture("$Latest");
    let old = f.instance.clone();
    let run = ctrl_c_when(&f, 0, move |call, _, _| {
        call.starts_with("EVENT launched") && !call.ends_with(&old)
    });
    assert!(
        run.stderr.contains("nothing was replaced"),
        "{}",
        run.stderr
    );
    // $Latest now means the new, unused version: the group names the version it meant.
    assert!(run.stderr.contains("it named $Latest"), "{}", run.stderr);
    assert!(!f.jenkins.calls().iter().any(|c| c.starts_with("POST")));
    assert_rolled_back(&f);
}

#[test]
fn roll_ctrl_c_while_the_successor_waits_for_the_lease_puts_everything_back() {
    let f = fixture("1");
    let old = f.instance.clone();
    let run = ctrl_c_when(&f, 0, move |call, _, w| {
        call.starts_with("HEALTH ")
            && successor_of(w, &old)
                .is_some_and(|s| call.ends_with(&s) && in_state(w, &s, "Waiting"))
    });
    assert!(
        run.stderr.contains("nothing was replaced"),
        "{}",
        run.stderr
    );
    assert_rolled_back(&f);
}

#[test]
fn roll_ctrl_c_during_the_drain_cancels_quiet_down_and_puts_everything_back() {
    let f = fixture("1");
    let run = ctrl_c_when(&f, 1, |call, n, _| {
        call == "GET /computer/api/json" && n == 2
    });
    assert!(
        run.stderr.contains("cancelled Jenkins' quiet-down"),
        "{}",
        run.stderr
    );
    let calls = f.jenkins.calls();
    assert!(index_of(&calls, "POST /quietDown") < index_of(&calls, "POST /cancelQuietDown"));
    assert!(!calls.contains(&"POST /safeExit".to_string()));
    assert_rolled_back(&f);
}

#[test]
fn roll_ctrl_c_as_the_old_jenkins_stops_gives_the_home_back() {
    let f = fixture("1");
    let run = ctrl_c_when(&f, 0, |call, _, _| call == "POST /safeExit");
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("{} serves the JENKINS_HOME again", f.instance)),
        "{}",
        run.stderr
    );
    assert_rolled_back(&f);
}

#[test]
fn roll_ctrl_c_while_the_successor_serves_unverified_gives_the_home_back() {
    let f = fixture("1");
    let old = f.instance.clone();
    let run = ctrl_c_when(&f, 0, move |call, _, w| {
        call == "GET /login" && successor_of(w, &old).is_some_and(|s| in_state(w, &s, "Serving"))
    });
    assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
    let t = f.jenkins.timeline();
    // The successor's Jenkins was stopped before the old controller took its home back.
    assert!(
        position(&t, &format!("{} takes the home back", f.instance))
            > position(&t, "releases the lease of efs"),
        "{t:#?}"
    );
    assert_rolled_back(&f);
}

#[test]
fn roll_ctrl_c_while_finishing_finishes() {
    let f = fixture("1");
    let old = f.instance.clone();
    let run = ctrl_c_when(&f, 0, move |call, _, _| {
        call == format!("EVENT terminated {old}")
    });
    assert!(
        run.stderr.contains("the new controller serves"),
        "{}",
        run.stderr
    );
    let st = f.state();
    assert_eq!(st["group_version"], "2", "{st}");
    assert_as_before(&f, &st);
    let new = assert_serving(&f, &f.new_ami);
    assert_eq!(f.running(), vec![(new, f.new_ami.clone())]);
}

#[test]
fn roll_drain_timeout_removes_the_successor_and_changes_nothing() {
    let f = fixture("1");
    f.jenkins.with(|s| s.busy = 2);
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
    assert!(!calls.contains(&"POST /safeExit".to_string()));
    assert!(
        f.jenkins.violations().is_empty(),
        "{:?}",
        f.jenkins.violations()
    );
    let t = f.jenkins.timeline();
    assert!(
        t.iter().any(|e| e.contains("waits for the lease")),
        "{t:#?}"
    );
    assert_rolled_back(&f);
}

/// The successor never gets ready (its instance stops while it boots): the old controller was
/// never stopped; the successor is removed.
#[test]
fn roll_successor_that_never_gets_ready_is_removed() {
    let f = fixture("1");
    let env = f.env.clone();
    let old = f.instance.clone();
    f.jenkins.on_call(move |call, _, _| {
        if call.starts_with("EVENT launched") && !call.ends_with(&old) {
            let (env, keep) = (env.clone(), old.clone());
            std::thread::spawn(move || {
                fixture_py(&env, "stop-others", json!({"group": GROUP, "keep": keep}));
            });
        }
    });
    let run = f.roll(&["--yes", "--health-timeout", "6s"]);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("the new controller is not ready to take over"),
        "{}",
        run.stderr
    );
    assert!(!f.jenkins.calls().iter().any(|c| c.starts_with("POST")));
    assert_rolled_back(&f);
}

/// The successor takes the lease but serves the wrong version: after the stop, so its Jenkins
/// is stopped and the old controller takes its home back.
#[test]
fn roll_wrong_version_after_the_stop_gives_the_home_back() {
    let f = fixture("1");
    let bad = f.image(
        "jenkins-controller-wrong-version",
        &[("jbake:jenkins-version", "2.479.3")],
        ImageModel::new("2.440.1"),
    );
    let run = f.roll(&["--yes", "--ami", &bad, "--health-timeout", "5s"]);
    eprintln!("{}\n{}", run.stdout, run.stderr);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&format!("the roll to {bad} failed")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("expected 2.479.3"), "{}", run.stderr);
    assert!(
        run.stderr.contains("stopped the new controller's Jenkins"),
        "{}",
        run.stderr
    );
    let routed = f.jenkins.routed();
    let stops: Vec<&String> = routed
        .iter()
        .filter(|(c, _)| c == "POST /safeExit")
        .map(|(_, to)| to)
        .collect();
    assert_eq!(stops.len(), 2, "{routed:?}");
    assert_eq!(stops[0], &f.instance, "first the old one");
    assert_ne!(stops[1], &f.instance, "then the successor");
    assert_rolled_back(&f);
}

/// The successor waits for the right lease but serves another JENKINS_HOME (another
/// X-Instance-Identity): rolled back at once.
#[test]
fn roll_changed_instance_identity_rolls_back() {
    let f = fixture("1");
    let mut model = ImageModel::new("2.479.3");
    model.identity = Some(identity_of("an-empty-home"));
    let bad = f.image("jenkins-controller-other-home", &[], model);
    let t0 = Instant::now();
    let run = f.roll(&["--yes", "--ami", &bad, "--health-timeout", "60s"]);
    eprintln!("{}\n{}", run.stdout, run.stderr);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains("answers with another instance identity"),
        "{}",
        run.stderr
    );
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "an identity mismatch is final: no waiting for the health timeout"
    );
    assert_rolled_back(&f);
}

/// An image baked for another EFS: refused; with --allow-efs-change, its controller serves
/// another home at once (its own lease): two Jenkins at once are seen before the old one is
/// stopped, and the successor is removed.
#[test]
fn roll_to_another_efs_is_refused_and_two_jenkins_are_caught() {
    let f = fixture("1");
    let mut model = ImageModel::new("2.479.3");
    model.home = "other-efs".into();
    let other = f.image(
        "jenkins-controller-other-efs",
        &[("jbake:efs-id", "fs-0fedcba9876543210")],
        model,
    );
    let refused = f.roll(&["--yes", "--ami", &other]);
    refused.assert_code(2);
    let run = f.roll(&["--yes", "--ami", &other, "--allow-efs-change"]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("two Jenkins serve at once"),
        "{}",
        run.stderr
    );
    assert!(!f.jenkins.calls().iter().any(|c| c == "POST /safeExit"));
    assert_rolled_back(&f);
}

// ------------------------------------------------------------------ tests: --strategy replace

/// The first roll to an image with the lease, from one without: `--strategy replace`. The old
/// Jenkins stops before the group replaces the instance; the group's sizes never change.
#[test]
fn roll_replace_stops_the_old_jenkins_before_the_termination() {
    let f = fixture("1");
    // The running controller's image has no lease wrapper: its Jenkins stays down once stopped.
    f.jenkins.with(|s| {
        for c in s.controllers.iter_mut() {
            c.model.lease = false;
        }
    });
    f.moto.start_recording();
    let run = f.roll(&["--yes", "--strategy", "replace", "--health-timeout", "60s"]);
    f.moto.stop_recording();
    eprintln!("{}\n{}", run.stdout, run.stderr);
    run.assert_code(0);
    assert!(
        run.stdout.contains("(replace)") || run.stdout.contains(", replace)"),
        "{}",
        run.stdout
    );
    let actions = f.moto.recorded_actions();
    assert_eq!(
        writes(&actions),
        [
            "PutParameter",
            "CreateLaunchTemplateVersion",
            "ModifyLaunchTemplate",
            "UpdateAutoScalingGroup",
            "SuspendProcesses",
            "TerminateInstanceInAutoScalingGroup",
            "ResumeProcesses",
            "DeleteParameter",
        ],
        "{actions:?}"
    );
    let t = f.jenkins.timeline();
    eprintln!("timeline:\n  {}", t.join("\n  "));
    assert!(
        position(&t, &format!("{} stops Jenkins", f.instance))
            < position(&t, &format!("{} terminated", f.instance))
    );
    let new = assert_serving(&f, &f.new_ami);
    assert!(
        position(&t, &format!("{} terminated", f.instance))
            < position(&t, &format!("{new} serves"))
    );
    let st = f.state();
    assert_as_before(&f, &st);
    assert_eq!(st["group_version"], "2");
}

#[test]
fn roll_replace_ctrl_c_after_the_stop_replaces_and_says_where_the_group_is() {
    let f = fixture("1");
    let pid = Arc::new(AtomicU32::new(0));
    let p = pid.clone();
    f.jenkins.on_call(move |call, _, _| {
        if call == "POST /safeExit" {
            sigint(&p);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let run = f.roll_with_pid(&["--yes", "--strategy", "replace"], &pid);
    run.assert_code(130);
    for want in [
        format!(
            "{} was terminated; group {GROUP} points at launch template",
            f.instance
        ),
        format!(
            "jbake roll --region {REGION} --asg {GROUP} --ami {} --strategy replace --yes",
            f.old_ami
        ),
        format!("jbake status --region {REGION} --asg {GROUP}"),
        "Right now: group jenkins has".to_string(),
    ] {
        assert!(run.stderr.contains(&want), "{want}: {}", run.stderr);
    }
    let st = f.state();
    assert_eq!(st["group_version"], "2", "{st}");
    assert_as_before(&f, &st);
    assert!(!f.running().iter().any(|(id, _)| *id == f.instance));
}

#[test]
fn roll_replace_health_failure_rolls_back() {
    let f = fixture("1");
    let env = f.env.clone();
    let original = f.instance.clone();
    // The new instance stops as soon as it is launched: its target is "unused", never healthy.
    // (Only the first: the rollback launches another.)
    let mut stopped = false;
    f.jenkins.on_call(move |call, _, _| {
        if !stopped && call.starts_with("EVENT launched") && !call.ends_with(&original) {
            stopped = true;
            let (env, keep) = (env.clone(), original.clone());
            std::thread::spawn(move || {
                fixture_py(&env, "stop-others", json!({"group": GROUP, "keep": keep}));
            });
        }
    });
    let run = f.roll(&["--yes", "--strategy", "replace", "--health-timeout", "8s"]);
    eprintln!("{}\n{}", run.stdout, run.stderr);
    run.assert_code(1);
    assert!(
        run.stderr
            .contains(&format!("the roll to {} failed", f.new_ami)),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("Rolled back"), "{}", run.stderr);
    let st = f.state();
    assert_eq!(st["group_version"], "1", "{st}");
    assert_eq!(version_data(&st, 1)["default"], true, "{st}");
    assert_as_before(&f, &st);
    let running = f.running();
    assert_eq!(running.len(), 1, "{st}");
    assert_ne!(running[0].0, f.instance);
    assert_eq!(running[0].1, f.old_ami, "the old AMI serves again");
}

// ------------------------------------------------------------------ tests: one roll at a time

#[test]
fn roll_refuses_while_another_roll_holds_the_lock_and_takes_a_stale_one_over() {
    let f = fixture("1");
    // Two real rolls: A drains a build while B starts.
    f.jenkins.with(|s| s.busy = 1);
    let a = f.roll_cmd(&["--yes"]).spawn().expect("spawn roll A");
    let a_pid = a.id();
    let t0 = Instant::now();
    while f.state()["lock"].is_null() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "A never took the lock"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    f.moto.start_recording();
    let b = f.roll(&["--yes"]);
    f.moto.stop_recording();
    b.assert_code(1);
    assert!(
        b.stderr.contains("group jenkins is being rolled by")
            && b.stderr.contains(&format!("(pid {a_pid}, jbake"))
            && b.stderr.contains("--take-over-lock"),
        "{}",
        b.stderr
    );
    assert_eq!(
        writes(&f.moto.recorded_actions()),
        Vec::<String>::new(),
        "B changed nothing"
    );
    f.jenkins.with(|s| s.busy = 0);
    let a = Run::from_output(a.wait_with_output().expect("wait for roll A"));
    a.assert_code(0);
    assert_eq!(f.state()["lock"], Value::Null);

    // A lock left by a killed roll: named, refused, then taken over on request.
    let g = fixture("1");
    let stale = json!({"by": "ops@bastion", "pid": 4242, "since": "2026-11-30T03:00:00Z",
        "doing": "roll group jenkins to ami-0aaaaaaaaaaaaaaaa (handover)",
        "token": "0123456789abcdef0123456789abcdef", "jbake": "0.1.0"});
    fixture_py(
        &g.env,
        "put-lock",
        json!({"group": GROUP, "value": stale.to_string()}),
    );
    let mut cmd = jbake();
    g.moto.apply_env(&mut cmd);
    let status = Run::from_output(
        cmd.args(["status", "--region", REGION])
            .output()
            .expect("run jbake status"),
    );
    assert!(
        status
            .stdout
            .contains("roll lock (/jbake/locks/roll/jenkins): held by ops@bastion (pid 4242"),
        "{}",
        status.stdout
    );
    let refused = g.roll(&["--yes"]);
    refused.assert_code(1);
    assert!(
        refused.stderr.contains(
            "is being rolled by ops@bastion (pid 4242, jbake 0.1.0) since 2026-11-30T03:00:00Z"
        ),
        "{}",
        refused.stderr
    );
    assert_untouched_but_lock(&g);
    let taken = g.roll(&["--yes", "--take-over-lock"]);
    taken.assert_code(0);
    assert!(
        taken.stderr.contains("--take-over-lock: taking over the roll lock of group jenkins (/jbake/locks/roll/jenkins) held by ops@bastion (pid 4242"),
        "{}",
        taken.stderr
    );
    assert_eq!(g.state()["lock"], Value::Null, "released after the roll");
    assert_serving(&g, &g.new_ami);
}

fn assert_untouched_but_lock(f: &Fixture) {
    let st = f.state();
    assert_eq!(st["group_version"], "1", "{st}");
    assert_eq!(st["sizes"], json!([1, 1, 1]));
    assert_eq!(st["versions"].as_array().map(Vec::len), Some(1));
    assert_eq!(f.running(), vec![(f.instance.clone(), f.old_ami.clone())]);
}

/// The IAM action for an API action jbake was recorded making.
pub(crate) fn iam_action(action: &str) -> String {
    let service = match action {
        "DescribeAutoScalingGroups"
        | "UpdateAutoScalingGroup"
        | "TerminateInstanceInAutoScalingGroup"
        | "SuspendProcesses"
        | "ResumeProcesses"
        | "SetInstanceProtection" => "autoscaling",
        "DescribeTargetGroups"
        | "DescribeLoadBalancers"
        | "DescribeListeners"
        | "DescribeTargetHealth" => "elasticloadbalancing",
        "GetParameter" | "PutParameter" | "DeleteParameter" => "ssm",
        _ => "ec2",
    };
    format!("{service}:{action}")
}

// ------------------------------------------------------------------ tests: reaching Jenkins

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

    let mut cmd = f.roll_cmd_at(&url, &["--yes", "--health-timeout", "60s"]);
    cmd.env("SSL_CERT_FILE", &tls.ca).env_remove("SSL_CERT_DIR");
    let run = Run::from_output(cmd.output().expect("run jbake roll"));
    run.assert_code(0);
    assert!(run.stdout.contains("rolled group"), "{}", run.stdout);
    let calls = f.jenkins.calls();
    // Quiet-down and the stop (POSTs with the crumb) went through TLS.
    index_of(&calls, "POST /quietDown");
    index_of(&calls, "POST /safeExit");
    assert_eq!(f.running().len(), 1);
    assert_eq!(f.running()[0].1, f.new_ami);
    assert_serving(&f, &f.new_ami);
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

    // --no-drain (here Jenkins answers, so the replacement can be verified): no quiet-down,
    // the old Jenkins is stopped at once (POST /exit).
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
    let posts: Vec<String> = f
        .jenkins
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("POST "))
        .collect();
    assert_eq!(posts, ["POST /exit"]);
    let running = f.running();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].1, f.new_ami);
    assert_serving(&f, &f.new_ami);
}

/// A roll run by a Jenkins build (a Jenkinsfile's `jbake nightly --roll`): the drain does not
/// wait for that build (`--ignore-build`), and the old Jenkins is stopped with `/exit`, since
/// `/safeExit` would wait for that very build for ever (a pipeline is saved and resumes on the
/// new controller). Another build still running is waited for as always.
#[test]
fn roll_ignores_the_build_that_runs_it_and_stops_jenkins_at_once() {
    let f = fixture("1");
    f.jenkins.with(|s| s.busy = 1);
    let own = "http://jenkins/job/build/1/";
    let run = f.roll(&["--yes", "--ignore-build", own]);
    run.assert_code(0);
    assert!(
        run.stdout.contains("rolled group jenkins"),
        "{}",
        run.stdout
    );
    let calls = f.jenkins.calls();
    assert!(calls.contains(&"POST /exit".to_string()), "{calls:?}");
    assert!(!calls.contains(&"POST /safeExit".to_string()), "{calls:?}");
    assert_eq!(f.running().len(), 1);
    assert_eq!(f.running()[0].1, f.new_ami);

    // Two builds run: only the roll's own is ignored; the drain waits for the other.
    let g = fixture("1");
    g.jenkins.with(|s| s.busy = 2);
    let timed_out = g.roll(&["--yes", "--ignore-build", own, "--drain-timeout", "3s"]);
    timed_out.assert_code(1);
    assert!(
        timed_out
            .stderr
            .contains("1 build(s) running: http://jenkins/job/build/2/"),
        "{}",
        timed_out.stderr
    );
}

#[test]
fn roll_says_when_the_template_changed_outside_it_and_rolls_that_change_with_from_latest() {
    let f = fixture("1");
    // Terraform changed the instance type: version 2, neither the group's nor the default.
    let added = fixture_py(
        &f.env,
        "add-version",
        json!({"group": GROUP, "source": 1, "data": {"InstanceType": "t3.large"}}),
    );
    assert_eq!(added["version"], 2, "{added}");
    // jbake status says it too.
    let mut status = jbake();
    f.moto.apply_env(&mut status);
    let status = Run::from_output(
        status
            .args(["status", "--region", REGION])
            .output()
            .expect("run jbake status"),
    );
    status.assert_code(0);
    assert!(
        status
            .stdout
            .contains("note: launch template version 2 is newer than the group's version 1"),
        "{}",
        status.stdout
    );
    let plan = f.roll(&["--dry-run"]);
    plan.assert_code(0);
    assert!(
        plan.stderr.contains(
            "launch template version 2 is newer than the group's version 1 and differs from it in InstanceType"
        ) && plan.stderr.contains("pass --from-latest"),
        "{}",
        plan.stderr
    );
    assert!(
        plan.stdout
            .contains("version 3 from version 1 (EC2 copies it: SourceVersion)"),
        "{}",
        plan.stdout
    );
    let rolled = f.roll(&["--yes", "--from-latest"]);
    eprintln!("{}\n{}", rolled.stdout, rolled.stderr);
    rolled.assert_code(0);
    assert!(
        rolled
            .stderr
            .contains("--from-latest makes the new version from version 2"),
        "{}",
        rolled.stderr
    );
    let st = f.state();
    assert_eq!(st["group_version"], "3", "{st}");
    let v3 = version_data(&st, 3);
    assert_eq!(v3["data"]["InstanceType"], "t3.large", "{v3}");
    assert_eq!(v3["data"]["ImageId"], f.new_ami.as_str(), "{v3}");
    let running: Vec<String> = f.running().into_iter().map(|(_, ami)| ami).collect();
    assert_eq!(running, std::slice::from_ref(&f.new_ami));
}
