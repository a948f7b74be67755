//! Try jbake without AWS: what `scripts/demo` (the README's first command) runs.
//!
//! Bakes the Jenkins controller image end to end, the way tests/images.rs does, with the same
//! harness (tests/support, compiled into this program): a moto server stands in for the AWS
//! APIs, a throwaway Debian bookworm booted with systemd-nspawn stands in for the EC2 instance
//! moto "launches", and the harness plays cloud-init on it (the build's one-time host key and
//! key pair from the user data). Then it runs the real jbake binary:
//!
//! ```text
//! jbake controller --efs-id fs-0123456789abcdef0 --region us-east-1 --endpoint-url <moto> …
//! ```
//!
//! with its own progress on this terminal, and prints what moto has afterwards: the AMI with
//! its tags, and proof that nothing temporary is left. The same inputs are baked a second time,
//! which jbake skips (nothing launched). Everything it started is stopped on every exit,
//! Ctrl-C (SIGINT) and SIGTERM included: the signal goes to jbake, which stops the build and
//! removes what it made through moto; then the servers, the instance and moto are stopped.
//!
//! Not real AWS, and the Jenkins war is a stand-in (tests/fixtures/jenkins-standin) built here
//! with javac and served from this machine: jenkins.io cannot be reached from the instance.
//!
//! Usage (as root, after scripts/install-test-deps): `sandbox [EXTRA JBAKE FLAGS]`, e.g.
//! `--output json`, `--var java_version=21`, `--force`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::bake::{self, EFS_ID, JENKINS_VERSION};
use support::instance::Instance;
use support::moto::{CloudInit, FaultProxy, Moto, Resources, REGION};
use support::net::FileServer;

const RECIPE: &str = "jenkins-controller";

fn say(text: &str) {
    eprintln!("sandbox: {text}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!(
            "Usage: sandbox [EXTRA JBAKE FLAGS]\n\n\
             Bakes the Jenkins controller image with `jbake controller --efs-id {EFS_ID} --region {REGION}`\n\
             against a local moto server, SSH going to a local Debian instance (systemd-nspawn),\n\
             and prints the AMI and what is left in moto. Needs root and scripts/install-test-deps.\n\
             Extra flags go to both jbake runs (e.g. --output json, --var java_version=21)."
        );
        return ExitCode::SUCCESS;
    }
    // Ctrl-C on the terminal reaches only this process; it passes it on to jbake and then
    // stops the rest in order.
    support::use_own_process_groups();
    let signals = Signals::install();
    let total = Instant::now();
    let code = run(&args, &signals);
    say(&format!("done in {:.1?}", total.elapsed()));
    code
}

/// What the sandbox started, stopped on drop in reverse order (also on a panic or a signal).
#[derive(Default)]
struct Started {
    www: Option<FileServer>,
    proxy: Option<FaultProxy>,
    cloud: Option<CloudInit>,
    vm: Option<Instance>,
    moto: Option<Moto>,
    work: Option<tempfile::TempDir>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let t = Instant::now();
        let mut stopped = Vec::new();
        if self.www.take().is_some() {
            stopped.push("the war server".to_string());
        }
        if self.proxy.take().is_some() {
            stopped.push("the API proxy".to_string());
        }
        if self.cloud.take().is_some() {
            stopped.push("the cloud-init stand-in".to_string());
        }
        if let Some(vm) = self.vm.take() {
            stopped.push(format!("instance {}", vm.name));
            drop(vm); // scripts/instance down
        }
        if let Some(moto) = self.moto.take() {
            stopped.push(format!("moto (pid {})", moto.pid()));
        }
        if self.work.take().is_some() {
            stopped.push("the work folder".to_string());
        }
        if !stopped.is_empty() {
            say(&format!(
                "stopped {} in {:.1?}",
                stopped.join(", "),
                t.elapsed()
            ));
        }
    }
}

fn run(extra: &[String], signals: &Signals) -> ExitCode {
    if !bake::prerequisites() {
        say("missing prerequisites (above); scripts/install-test-deps installs them (as root)");
        return ExitCode::from(1);
    }
    let mut started = Started::default();
    let work = started.work.insert(
        tempfile::Builder::new()
            .prefix("jbake-sandbox-")
            .tempdir_in("/var/tmp")
            .expect("create a work folder in /var/tmp"),
    );
    let work = work.path().to_path_buf();
    let mut times: Vec<(&str, Duration)> = Vec::new();

    let t = Instant::now();
    let moto = started.moto.insert(Moto::start());
    times.push(("moto", t.elapsed()));
    say(&format!(
        "moto (the AWS APIs: EC2, SSM) answers on {} after {:.1?}",
        moto.endpoint(),
        t.elapsed()
    ));
    if signals.stopped() {
        return ExitCode::from(130);
    }

    let t = Instant::now();
    let sha = bake::build_standin(&work);
    times.push(("stand-in war", t.elapsed()));
    say(&format!(
        "built the Jenkins {JENKINS_VERSION} stand-in war (tests/fixtures/jenkins-standin, SHA-256 {}…) in {:.1?}",
        &sha[..12],
        t.elapsed()
    ));
    if signals.stopped() {
        return ExitCode::from(130);
    }

    let t = Instant::now();
    let vm = started.vm.insert(Instance::builder("sandbox").up());
    times.push(("instance boot", t.elapsed()));
    say(&format!(
        "booted a Debian bookworm instance ({}, systemd-nspawn) at {}:{} in {:.1?}",
        vm.name,
        vm.host,
        vm.port,
        t.elapsed()
    ));
    if signals.stopped() {
        return ExitCode::from(130);
    }
    let cloud = started.cloud.insert(CloudInit::for_instance(moto, vm));
    let proxy = started.proxy.insert(FaultProxy::start(&moto.endpoint()));
    let www = started
        .www
        .insert(FileServer::start(&vm.gateway, work.join("www")));
    say(&format!(
        "serving the war at {}/{JENKINS_VERSION}/jenkins.war; playing cloud-init on {} for the instance jbake launches in moto",
        www.url(),
        vm.name
    ));

    let vars = bake::controller_vars(&www.url(), &sha);
    let manifest = work.join("jbake-manifest.json");
    let bake = |what: &str| -> (ExitStatus, Duration) {
        let mut cmd = bake::bake_command(
            &["controller", "--efs-id", EFS_ID],
            moto,
            proxy,
            cloud,
            vm,
            &vars,
            &manifest,
        );
        cmd.args(extra);
        say(&format!(
            "{what}:\n  $ {}\n  (test credentials in the environment; the endpoint is moto behind the harness's proxy)",
            shown(&cmd)
        ));
        let t = Instant::now();
        let mut child = cmd.spawn().expect("run jbake");
        let status = wait_forwarding_signals(&mut child, signals);
        (status, t.elapsed())
    };

    let (status, took) = bake("baking the controller image");
    times.push(("jbake controller", took));
    let mut code = exit_code(status);
    if status.success() && !signals.stopped() {
        say(&format!("jbake controller finished in {took:.1?}"));
        let (again, took) = bake(
            "the same inputs again, like the nightly cron: jbake finds the image and launches nothing",
        );
        times.push(("again (unchanged)", took));
        code = exit_code(again);
    } else if signals.stopped() {
        say(&format!(
            "jbake stopped after {took:.1?} (it got the signal too, exit {}); stopping everything the sandbox started",
            exit_code(status)
        ));
    } else {
        say(&format!(
            "jbake failed after {took:.1?} (exit {})",
            exit_code(status)
        ));
    }
    if signals.stopped() {
        code = 130;
    }
    report(moto, &manifest, cloud, &times);
    ExitCode::from(code)
}

fn exit_code(status: ExitStatus) -> u8 {
    match status.code() {
        Some(0) => 0,
        Some(c) => u8::try_from(c).unwrap_or(1),
        None => 130, // killed by a signal
    }
}

/// What moto has now: the image and its tags, and nothing temporary.
fn report(moto: &Moto, manifest: &Path, cloud: &CloudInit, times: &[(&str, Duration)]) {
    let res = moto.resources(REGION);
    let mut out = String::from("\nsandbox: what moto has now\n");
    let built: Option<serde_json::Value> = std::fs::read_to_string(manifest)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let ami = built
        .as_ref()
        .and_then(|m| m["builds"][0]["ami_id"].as_str().map(str::to_string));
    match ami.and_then(|id| res.images.iter().find(|i| i.id == id)) {
        Some(image) => {
            out.push_str(&format!(
                "  AMI          {} {} ({})\n",
                image.id,
                image.name.as_deref().unwrap_or("?"),
                image.state.as_deref().unwrap_or("?")
            ));
            for (k, v) in &image.tags {
                out.push_str(&format!("    {k:<22} {v}\n"));
            }
            out.push_str(&format!(
                "    snapshots              {}\n",
                image.snapshot_ids.join(", ")
            ));
        }
        None => out.push_str(&format!("  AMI          none of {RECIPE}\n")),
    }
    out.push_str(&leftovers(&res, cloud));
    let times: Vec<String> = times
        .iter()
        .map(|(what, t)| format!("{what} {:.1}s", t.as_secs_f64()))
        .collect();
    out.push_str(&format!("  times        {}\n", times.join(", ")));
    print!("{out}");
}

/// One line per kind of temporary resource, saying that none is alive.
fn leftovers(res: &Resources, cloud: &CloudInit) -> String {
    let launched: Vec<String> = res
        .instances
        .iter()
        .filter(|i| i.tags.contains_key("jbake:build-id"))
        .map(|i| format!("{} {}", i.id, i.state))
        .collect();
    let incomplete = res
        .images
        .iter()
        .filter(|i| i.tags.get("jbake:complete").map(String::as_str) == Some("false"))
        .count();
    let live = res.live_instances().len();
    let keys = res.jbake_key_pairs().len();
    let groups = res.jbake_security_groups().len();
    let clean = live == 0 && keys == 0 && groups == 0 && incomplete == 0;
    format!(
        "  instances    {} launched by jbake ({}), served by the cloud-init stand-in: {}\n\
         \x20 temporary    {live} running instances, {keys} jbake key pairs, {groups} jbake security groups, {incomplete} incomplete images: {}\n",
        launched.len(),
        if launched.is_empty() { "none".to_string() } else { launched.join(", ") },
        cloud.served().len(),
        if clean { "nothing left" } else { "LEFT BEHIND" },
    )
}

/// The command line, as it could be typed (jbake's full path shortened to `jbake`).
fn shown(cmd: &Command) -> String {
    let mut words = vec!["jbake".to_string()];
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty()
            || a.contains(|c: char| !(c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c)))
        {
            words.push(format!("'{}'", a.replace('\'', "'\\''")));
        } else {
            words.push(a.to_string());
        }
    }
    words.join(" ")
}

/// SIGINT and SIGTERM, counted by a thread of their own (the default action would kill this
/// process without running any drop). The main thread passes them on to jbake and stops.
struct Signals {
    count: Arc<AtomicUsize>,
    last: Arc<AtomicU8>,
    /// jbake is running (the signals go to it).
    busy: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Signals {
        let count = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(AtomicU8::new(0));
        let busy = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = std::sync::mpsc::channel();
        let (c, l, b) = (count.clone(), last.clone(), busy.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the signal handlers");
            let busy = b;
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let mut int = signal(SignalKind::interrupt()).expect("handle SIGINT");
                let mut term = signal(SignalKind::terminate()).expect("handle SIGTERM");
                let _ = ready.send(());
                loop {
                    let (n, name) = tokio::select! {
                        _ = int.recv() => (2, "SIGINT"),
                        _ = term.recv() => (15, "SIGTERM"),
                    };
                    l.store(n, Ordering::SeqCst);
                    let first = c.fetch_add(1, Ordering::SeqCst) == 0;
                    // While jbake runs, it says what it does about the signal (on the same
                    // terminal, under its spinner): the sandbox speaks once it has exited.
                    if !busy.load(Ordering::SeqCst) {
                        if first {
                            say(&format!(
                                "{name}: stopping everything the sandbox started, after the current step"
                            ));
                        } else {
                            say(&format!("{name} again: still stopping"));
                        }
                    }
                }
            });
        });
        is_ready.recv().expect("the signal handlers are installed");
        Signals { count, last, busy }
    }

    fn stopped(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// Waits for jbake, passing every SIGINT/SIGTERM this process gets on to it (it is in a
/// process group of its own, so the terminal's Ctrl-C reaches it only this way, once).
fn wait_forwarding_signals(child: &mut Child, signals: &Signals) -> ExitStatus {
    signals.busy.store(true, Ordering::SeqCst);
    let mut forwarded = 0;
    loop {
        if let Some(status) = child.try_wait().expect("wait for jbake") {
            signals.busy.store(false, Ordering::SeqCst);
            return status;
        }
        while forwarded < signals.count.load(Ordering::SeqCst) {
            forwarded += 1;
            let name = if signals.last.load(Ordering::SeqCst) == 15 {
                "TERM"
            } else {
                "INT"
            };
            support::sshd::kill(&[child.id()], name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
