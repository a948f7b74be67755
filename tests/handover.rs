//! The JENKINS_HOME lease on the instance tier: two instances of the controller image (real
//! Debian bookworm, systemd-nspawn) share one host folder as their "EFS" (a bind mount at
//! JENKINS_HOME, as in tests/images.rs: NFS cannot be mounted on this kernel). The image is
//! `recipes/controller.yaml` applied with `jbake apply` to a fresh instance, then archived; the
//! war is the Jenkins stand-in (tests/fixtures/jenkins-standin), which behaves like Jenkins
//! where it matters here: an X-Instance-Identity from a key kept in JENKINS_HOME, `/safeExit`,
//! `/restart` in the same process (as Jenkins' UnixLifecycle re-executes the JVM in place) or
//! by exit 5 (ExitLifecycle), crumbs.
//!
//! What this proves: jenkins.service starts Jenkins only while its jenkins-lease process holds
//! the exclusive flock on JENKINS_HOME/.jbake/lease; a second controller waits (nothing but the
//! wrapper's 503 on 8080, its journal naming the holder), takes over within a second or two of
//! a clean stop, never during a restart from Jenkins' UI (either kind), never while the holder
//! is frozen (SIGSTOP of every process of its container: a hung machine), and as soon as the
//! holder's processes are killed (SIGKILL of its container); an empty home is refused by an
//! image not baked for a first installation.
//!
//! What it cannot prove: on this bind mount the locks are the local kernel's, released the
//! instant the holder's processes die. On EFS (NFSv4.1) they are the server's, and a holder
//! that dies without closing them (a lost instance, a network partition) keeps them until its
//! NFS lease expires (the server's lease time; see docs/images.md), during which the successor
//! waits; a partitioned holder whose lease expired gets EIO from its next write through the
//! lock (the wrapper's heartbeat), which kills its Jenkins. Neither the lease expiry nor the
//! EIO can be produced here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::bake::{build_standin, controller_vars, prerequisites, EFS_ID};
use crate::support::cli::{jbake, Run};
use crate::support::instance::{fstype_of, Instance};
use crate::support::net::{http, FileServer, Response};

const JENKINS_UID: u32 = 3000;
const CRUMB: &str = "-H 'Jenkins-Crumb: standin-crumb-0123' -b 'JSESSIONID.standin=s3ss10n'";

/// `recipes/controller.yaml` applied to a fresh instance with the stand-in war (the defaults
/// otherwise: this image does NOT initialise an empty home), archived.
fn controller_image(work: &Path, efs_fstype: &str) -> PathBuf {
    let sha = build_standin(work);
    let t = Instant::now();
    let vm = Instance::builder("ho-bake").up();
    let www = FileServer::start(&vm.gateway, work.join("www"));
    let mut vars: Vec<String> = controller_vars(&www.url(), &sha)
        .into_iter()
        .filter(|v| !v.starts_with("jenkins_home_init="))
        .collect();
    vars.push(format!("jenkins_home_fstypes=nfs4 {efs_fstype}"));
    vars.push(format!("efs_id={EFS_ID}"));
    // A clean exit hands the home over; taken back after 5 s if nobody took it.
    vars.push("jenkins_lease_handback=5".to_string());
    let mut cmd = jbake();
    cmd.args(["apply", "recipes/controller.yaml", "--target", &vm.target()])
        .args(["--identity", &vm.identity.display().to_string()])
        .args(["--host-key", &vm.host_key, "--region", "us-east-1"]);
    for v in &vars {
        cmd.args(["--var", v]);
    }
    let run = Run::from_output(cmd.output().expect("run jbake apply"));
    run.assert_code(0);
    eprintln!("handover: controller recipe applied in {:.1?}", t.elapsed());
    drop(www);
    let mut vm = vm;
    vm.stop();
    let archive = work.join("controller.tar.zst");
    vm.snapshot(&archive);
    vm.down();
    archive
}

fn login(vm: &Instance) -> Option<Response> {
    http("GET", &vm.host, 8080, "/login", "").ok()
}

/// `X-Jenkins` answers: Jenkins serves there.
fn serves(vm: &Instance) -> bool {
    login(vm).is_some_and(|r| r.status == 200 && r.header("X-Jenkins").is_some())
}

fn journal(vm: &Instance) -> String {
    vm.exec_ok("journalctl --no-pager -o cat -u jenkins")
}

/// Polls `f` until true or `timeout`; how long it took.
fn wait_for(what: &str, timeout: Duration, vm: &Instance, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "{what}: not within {timeout:?}; {}'s journal:\n{}",
            vm.name,
            journal(vm)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

/// For `duration`, `vm` must never serve Jenkins.
fn never_serves(vm: &Instance, duration: Duration, why: &str) {
    let t0 = Instant::now();
    while t0.elapsed() < duration {
        assert!(
            !serves(vm),
            "{} served Jenkins {why}:\n{}",
            vm.name,
            journal(vm)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn post(vm: &Instance, path: &str) {
    vm.exec_ok(&format!(
        "curl -sf -X POST {CRUMB} http://127.0.0.1:8080{path} >/dev/null"
    ));
}

fn starts(efs: &Path) -> Vec<String> {
    std::fs::read_to_string(efs.join("standin-starts.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

/// The descendants of `root`, parents before children (from /proc).
fn descendants(root: u32) -> Vec<u32> {
    let mut links: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            links.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.first().copied() {
        queue.remove(0);
        for (child, _) in links.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            queue.push(*child);
        }
    }
    out
}

/// Sends `signal` (`STOP`, `KILL`) to every process of the instance's container (all that
/// runs below its systemd-nspawn), parents first.
fn signal_container(vm: &Instance, signal: &str) {
    let pids: Vec<String> = descendants(vm.supervisor_pid)
        .iter()
        .map(u32::to_string)
        .collect();
    assert!(
        !pids.is_empty(),
        "no process below {}'s supervisor",
        vm.name
    );
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(&pids)
        .status()
        .expect("run kill");
    // A process may be gone between the listing and the signal.
    let _ = status;
}

#[test]
fn handover_two_controllers_share_one_home_and_never_run_together() {
    if !prerequisites() {
        return;
    }
    let total = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("jbake-handover-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    // The EFS stand-in, as a first installation left it: given to jenkins, marked.
    let efs = work.path().join("efs");
    std::fs::create_dir(&efs).expect("mkdir efs");
    std::fs::write(efs.join(".jbake-initialised"), "initialised by the test\n").expect("marker");
    let chown = Command::new("chown")
        .args(["-R", &format!("{JENKINS_UID}:{JENKINS_UID}")])
        .arg(&efs)
        .status()
        .expect("chown");
    assert!(chown.success());
    let archive = controller_image(work.path(), &fstype_of(&efs));

    // A: the controller.
    let a = Instance::builder("ho-a")
        .image(&archive)
        .bind(&efs, "/var/lib/jenkins")
        .up();
    let took = wait_for("A serves Jenkins", Duration::from_secs(90), &a, || {
        serves(&a)
    });
    eprintln!("handover: A serves {took:.1?} after sshd answered");
    let identity = login(&a)
        .and_then(|r| r.header("X-Instance-Identity").map(str::to_string))
        .expect("A sends X-Instance-Identity");
    let lease = std::fs::read_to_string(efs.join(".jbake/lease")).expect("the lease file");
    assert!(lease.contains(&format!("holder={}\n", a.name)), "{lease}");
    assert!(
        lease.contains("how=no instance metadata: hostname, machine-id"),
        "{lease}"
    );
    let meta = std::fs::metadata(efs.join(".jbake")).expect(".jbake");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o755),
        "root's, not jenkins'"
    );
    assert!(
        !a.exec("runuser -u jenkins -- rm -f /var/lib/jenkins/.jbake/lease")
            .status
            .success()
            && efs.join(".jbake/lease").exists(),
        "the jenkins user cannot remove the lease"
    );

    // B: same image, same home. It waits: no Jenkins, the wrapper's 503, A named as holder.
    let b = Instance::builder("ho-b")
        .image(&archive)
        .bind(&efs, "/var/lib/jenkins")
        .up();
    // B's Jenkins restarts the way Jenkins does under a service manager's lifecycle: exit 5.
    // (Restarting its waiting service changes nothing else: it queues for the lease again.)
    b.exec_ok(
        "echo 'JAVA_OPTS=-Dhudson.lifecycle=hudson.lifecycle.ExitLifecycle' > /etc/default/jenkins \
         && systemctl restart jenkins",
    );
    wait_for(
        "B says who holds the lease",
        Duration::from_secs(90),
        &b,
        || {
            journal(&b).contains(&format!(
                "waiting for the JENKINS_HOME lease (/var/lib/jenkins/.jbake/lease): held by {}",
                a.name
            ))
        },
    );
    wait_for(
        "B answers the health check",
        Duration::from_secs(30),
        &b,
        || login(&b).is_some_and(|r| r.status == 503),
    );
    let waiting = login(&b).expect("B answers the health check");
    assert_eq!(waiting.status, 503, "{waiting:?}");
    assert_eq!(waiting.header("X-Jbake-Lease"), Some("waiting"));
    assert!(waiting.header("X-Jenkins").is_none(), "no Jenkins on B");
    assert!(waiting.body.contains(&a.name), "{}", waiting.body);
    never_serves(&b, Duration::from_secs(3), "while A holds the lease");
    assert_eq!(starts(&efs), std::slice::from_ref(&a.name));

    // A restarts from its UI (in the same process, like Jenkins' UnixLifecycle): the lease
    // stays with A; B never starts in between.
    post(&a, "/restart");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30)
        && !(t0.elapsed() > Duration::from_secs(2) && serves(&a))
    {
        assert!(!serves(&b), "B served while A restarted:\n{}", journal(&b));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(serves(&a), "A is back after its restart");
    never_serves(&b, Duration::from_secs(2), "after A's restart");
    assert_eq!(starts(&efs), [a.name.clone(), a.name.clone()]);

    // A stops cleanly (/safeExit, a handover): B takes the lease and serves the same home.
    post(&a, "/safeExit");
    let t0 = Instant::now();
    wait_for("A stops", Duration::from_secs(30), &a, || !serves(&a));
    let took = wait_for(
        "B serves after A's clean exit",
        Duration::from_secs(60),
        &b,
        || serves(&b),
    );
    eprintln!(
        "handover: B serves {:.1?} after A stopped ({:.1?} after /safeExit)",
        took,
        t0.elapsed()
    );
    assert_eq!(
        login(&b).and_then(|r| r.header("X-Instance-Identity").map(str::to_string)),
        Some(identity.clone()),
        "the same JENKINS_HOME, the same identity"
    );
    assert!(journal(&a).contains("Jenkins exited cleanly: released the JENKINS_HOME lease"));
    never_serves(
        &a,
        Duration::from_secs(7),
        "after handing the home over (past its hand-back time)",
    );

    // B restarts from its UI by exit 5 (ExitLifecycle): the wrapper restarts Jenkins keeping
    // the lease; A, standing by, does not take it.
    post(&b, "/restart");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30)
        && !(t0.elapsed() > Duration::from_secs(2) && serves(&b))
    {
        assert!(!serves(&a), "A served while B restarted:\n{}", journal(&a));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(serves(&b), "B is back after its restart");
    assert!(
        journal(&b)
            .contains("Jenkins asked for a restart (exit 5): starting it again, keeping the lease"),
        "{}",
        journal(&b)
    );

    // B hangs (every process of its container stopped): it keeps the lease; A waits.
    signal_container(&b, "STOP");
    never_serves(
        &a,
        Duration::from_secs(4),
        "while B is frozen with the lease",
    );
    // B dies (SIGKILL): the local kernel releases its lock at once (NFS: at lease expiry).
    let t0 = Instant::now();
    signal_container(&b, "KILL");
    let took = wait_for(
        "A serves after B was killed",
        Duration::from_secs(60),
        &a,
        || serves(&a),
    );
    eprintln!(
        "handover: A serves {took:.1?} after B's container was killed ({:.1?} since)",
        t0.elapsed()
    );
    assert_eq!(
        login(&a).and_then(|r| r.header("X-Instance-Identity").map(str::to_string)),
        Some(identity.clone())
    );
    let log = starts(&efs);
    assert_eq!(
        log,
        [
            a.name.clone(),
            a.name.clone(),
            b.name.clone(),
            b.name.clone(),
            a.name.clone()
        ],
        "who started Jenkins, in order"
    );
    drop(b);

    // D stands by on the same home while A holds it. Then the jenkins user (any build on the
    // built-in node) renames .jbake/, which it can (its parent is jenkins' home): A finds its
    // lease file moved within a heartbeat and kills its Jenkins; D, which waited on the moved
    // file, gets that file's lock when A's Jenkins is gone, finds it moved too and waits on
    // the file at the lease path instead. Never both serve; one of them serves again on a new
    // root-owned lease.
    let d = Instance::builder("ho-d")
        .image(&archive)
        .bind(&efs, "/var/lib/jenkins")
        .up();
    wait_for(
        "D waits for the lease A holds",
        Duration::from_secs(90),
        &d,
        || journal(&d).contains("waiting for the JENKINS_HOME lease"),
    );
    a.exec_ok("runuser -u jenkins -- mv /var/lib/jenkins/.jbake /var/lib/jenkins/.jbake-moved");
    let t0 = Instant::now();
    wait_for(
        "A kills its Jenkins after its lease was moved",
        Duration::from_secs(30),
        &a,
        || journal(&a).contains("the JENKINS_HOME lease was moved away"),
    );
    eprintln!(
        "handover: A noticed the moved lease in {:.1?}",
        t0.elapsed()
    );
    let mut served = None;
    while t0.elapsed() < Duration::from_secs(90) {
        let (sa, sd) = (serves(&a), serves(&d));
        assert!(
            !(sa && sd),
            "A and D both serve:\nA:\n{}\nD:\n{}",
            journal(&a),
            journal(&d)
        );
        if served.is_none() && (sa || sd) {
            let who = if sa { a.name.clone() } else { d.name.clone() };
            eprintln!(
                "handover: {who} serves on the new lease {:.1?} after the rename",
                t0.elapsed()
            );
            served = Some(who);
        }
        // Keep watching for a while after the first one serves: the other must not.
        if served.is_some() && t0.elapsed() > Duration::from_secs(35) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let served = served.unwrap_or_else(|| {
        panic!(
            "nobody serves after the lease was moved:\nA:\n{}\nD:\n{}",
            journal(&a),
            journal(&d)
        )
    });
    eprintln!(
        "handover: {served} serves on the new lease ({:.1?})",
        t0.elapsed()
    );
    assert!(
        journal(&d).contains("the lease file moved") || served == a.name,
        "D went on waiting on the moved file:\n{}",
        journal(&d)
    );
    let meta = std::fs::metadata(efs.join(".jbake")).expect("a new .jbake");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o755));
    let lease = std::fs::read_to_string(efs.join(".jbake/lease")).expect("the new lease file");
    assert!(lease.contains(&format!("holder={served}\n")), "{lease}");
    assert!(efs.join(".jbake-moved/lease").exists());
    d.down();

    // C: the same image on an empty home: refused (this image is not a first installation).
    let empty = work.path().join("empty-efs");
    std::fs::create_dir(&empty).expect("mkdir");
    let c = Instance::builder("ho-c")
        .image(&archive)
        .bind(&empty, "/var/lib/jenkins")
        .up();
    wait_for(
        "C refuses the empty home",
        Duration::from_secs(90),
        &c,
        || journal(&c).contains("is empty: this image never initialises an empty JENKINS_HOME"),
    );
    assert!(!serves(&c));
    assert_eq!(
        std::fs::read_dir(&empty).expect("read").count(),
        0,
        "nothing written to the empty home"
    );
    c.down();
    a.down();
    eprintln!("handover: test in {:.1?}", total.elapsed());
}
