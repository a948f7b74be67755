//! The harness itself works: the throwaway sshd (quick tier) and the booted
//! instance stand-in (instance tier).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::instance::{self, Instance};
use crate::support::prereq;
use crate::support::sshd::Sshd;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn assert_ok(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------- quick tier

#[test]
fn sshd_runs_sudo_with_pinned_host_key() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let known = std::fs::read_to_string(sshd.known_hosts()).expect("read known_hosts");
    assert_eq!(
        known.trim(),
        format!("[127.0.0.1]:{} {}", sshd.port(), sshd.host_key())
    );
    assert!(sshd.host_key().starts_with("ssh-ed25519 AAAA"));
    let out = sshd.ssh("sudo -n id -u").output().expect("run ssh");
    assert_ok("ssh sudo -n id -u", &out);
    assert_eq!(stdout(&out), "0");
    // The work folder belongs to the test user.
    let probe = sshd.workdir().join("probe");
    let out = sshd
        .ssh(&format!("touch {}", probe.display()))
        .output()
        .expect("run ssh");
    assert_ok("touch in workdir", &out);
    assert!(probe.exists());
}

#[test]
fn sshd_drop_connections_ends_a_running_session() {
    if !prereq::quick_tier() {
        return;
    }
    let sshd = Sshd::start();
    let mut child = sshd
        .ssh("echo started; sleep 30")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ssh");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("ssh stdout"))
        .read_line(&mut line)
        .expect("read from ssh");
    assert_eq!(line.trim(), "started");
    let start = Instant::now();
    sshd.drop_connections();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait ssh") {
            assert!(!status.success(), "a dropped session must not succeed");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "ssh still running 5 s after drop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("session ended {:?} after drop_connections", start.elapsed());
    // The server itself still accepts connections.
    let out = sshd.ssh("true").output().expect("run ssh");
    assert_ok("ssh after drop", &out);
}

#[test]
fn sshd_restart_keeps_port_and_host_key() {
    if !prereq::quick_tier() {
        return;
    }
    let mut sshd = Sshd::start();
    let (port, key, pid) = (sshd.port(), sshd.host_key().to_string(), sshd.pid());
    sshd.restart();
    assert_eq!((sshd.port(), sshd.host_key()), (port, key.as_str()));
    assert_ne!(sshd.pid(), pid);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "old sshd still running"
    );
    let out = sshd.ssh("true").output().expect("run ssh");
    assert_ok("ssh after restart", &out);
}

#[test]
fn sshd_many_in_parallel() {
    if !prereq::quick_tier() {
        return;
    }
    let pids: Vec<u32> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let sshd = Sshd::start();
                    let out = sshd.ssh("echo $PPID").output().expect("run ssh");
                    assert_ok("ssh", &out);
                    sshd.pid()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "sshd {pid} left running"
        );
    }
}

// ---------------------------------------------------------------- instance tier

fn ssh_ok(vm: &Instance, command: &str) -> String {
    let out = vm.ssh(command).output().expect("run ssh");
    assert_ok(&format!("ssh {command:?}"), &out);
    stdout(&out)
}

/// What the instance used on the host, to check that `down` removed it all.
struct Footprint {
    name: String,
    supervisor: u32,
    veth: String,
}

impl Footprint {
    fn of(vm: &Instance) -> Footprint {
        let index = vm
            .host
            .split('.')
            .nth(2)
            .expect("HOST is 169.254.N.2")
            .to_string();
        Footprint {
            name: vm.name.clone(),
            supervisor: vm.supervisor_pid,
            veth: format!("jbk{index}h"),
        }
    }

    fn assert_gone(&self) {
        let name = &self.name;
        assert!(
            !Path::new(&format!("/proc/{}", self.supervisor)).exists(),
            "supervisor alive"
        );
        assert!(
            !Path::new(&format!("/run/netns/jbake-{name}")).exists(),
            "netns left"
        );
        let links = Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip link");
        assert!(
            !stdout(&links).contains(&self.veth),
            "veth {} left",
            self.veth
        );
        for cg in ["unified", "systemd"] {
            let dir = format!("/sys/fs/cgroup/{cg}/jbake-{name}");
            assert!(!Path::new(&dir).exists(), "{dir} left");
        }
        assert!(
            !Path::new(&format!("/var/tmp/jbake-instances/{name}")).exists(),
            "files left"
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        assert!(
            !mounts.contains(&format!("/jbake-instances/{name}/")),
            "mount left"
        );
        let ps = Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .expect("ps");
        let ps = String::from_utf8_lossy(&ps.stdout);
        for line in ps.lines() {
            assert!(
                !(line.contains("systemd-nspawn") && line.contains(&format!("-M {name} "))),
                "nspawn left: {line}"
            );
            assert!(
                !line.contains(&format!("__supervise {name}")),
                "supervisor left: {line}"
            );
        }
    }
}

#[test]
fn instance_boots_installs_reboots_and_goes_down_clean() {
    if !prereq::instance_tier() {
        return;
    }
    let t = Instant::now();
    instance::base_image();
    eprintln!("[timing] base image ready: {:?}", t.elapsed());

    let t = Instant::now();
    let vm = Instance::builder("boot").up();
    eprintln!("[timing] up (unpack + boot to sshd): {:?}", t.elapsed());
    assert_eq!(ssh_ok(&vm, "sudo -n id -u"), "0");
    assert_eq!(ssh_ok(&vm, "id -un"), "admin");
    assert_eq!(vm.exec_ok("hostname"), vm.name);

    let t = Instant::now();
    let state = ssh_ok(&vm, "systemctl is-system-running --wait || true");
    eprintln!(
        "[timing] is-system-running --wait = {state:?} after {:?}",
        t.elapsed()
    );
    assert!(
        state == "running" || state == "degraded",
        "system state {state:?}"
    );
    if state == "degraded" {
        eprintln!(
            "failed units:\n{}",
            ssh_ok(&vm, "systemctl --failed --no-legend")
        );
    }

    let t = Instant::now();
    ssh_ok(
        &vm,
        "sudo -n apt-get update -q >/dev/null && sudo -n apt-get install -y -q hello >/dev/null",
    );
    eprintln!("[timing] apt-get update + install hello: {:?}", t.elapsed());
    assert_eq!(ssh_ok(&vm, "hello"), "Hello, world!");

    let boot_id = ssh_ok(&vm, "cat /proc/sys/kernel/random/boot_id");
    let t = Instant::now();
    // The session may end with an error when the guest goes away under it.
    let _ = vm.ssh("sudo -n systemctl reboot").output();
    std::thread::sleep(Duration::from_millis(500));
    vm.wait_for_ssh(Duration::from_secs(60));
    eprintln!(
        "[timing] reboot until sshd answers again: {:?}",
        t.elapsed()
    );
    let new_boot_id = ssh_ok(&vm, "cat /proc/sys/kernel/random/boot_id");
    let supervisor = Path::new("/proc").join(vm.supervisor_pid.to_string());
    assert!(
        supervisor.exists(),
        "the same supervisor booted the guest again"
    );
    assert_ne!(
        boot_id, new_boot_id,
        "boot_id unchanged: the guest did not reboot"
    );
    assert_eq!(
        ssh_ok(&vm, "hello"),
        "Hello, world!",
        "installed package survives reboot"
    );

    let footprint = Footprint::of(&vm);
    let t = Instant::now();
    vm.down();
    eprintln!("[timing] down: {:?}", t.elapsed());
    footprint.assert_gone();
}

#[test]
fn instance_two_in_parallel() {
    if !prereq::instance_tier() {
        return;
    }
    instance::base_image();
    let t = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Instance::builder("par").up());
        let b = s.spawn(|| Instance::builder("par").up());
        (a.join().expect("thread a"), b.join().expect("thread b"))
    });
    eprintln!("[timing] two instances up in parallel: {:?}", t.elapsed());
    assert_ne!(a.host, b.host);
    assert_ne!(a.host_key, b.host_key, "host keys are per instance");
    assert_eq!(ssh_ok(&a, "hostname"), a.name);
    assert_eq!(ssh_ok(&b, "hostname"), b.name);
    // Each guest sees only its own network.
    let ping = a.exec(&format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/{}/22'",
        b.host
    ));
    assert!(!ping.status.success(), "instance a reached instance b");
    let (fa, fb) = (Footprint::of(&a), Footprint::of(&b));
    std::thread::scope(|s| {
        s.spawn(|| a.down());
        s.spawn(|| b.down());
    });
    fa.assert_gone();
    fb.assert_gone();
}

#[test]
fn instance_snapshot_boots_again() {
    if !prereq::instance_tier() {
        return;
    }
    instance::base_image();
    let mut vm = Instance::builder("snap").up();
    ssh_ok(&vm, "echo baked | sudo -n tee /etc/jbake-marker >/dev/null");
    let t = Instant::now();
    vm.stop();
    eprintln!("[timing] stop: {:?}", t.elapsed());
    let dir = tempfile::tempdir().expect("temp folder");
    let archive = dir.path().join("image.tar.zst");
    let t = Instant::now();
    vm.snapshot(&archive);
    eprintln!("[timing] snapshot: {:?}", t.elapsed());
    let key_before = vm.host_key.clone();
    drop(vm);

    let vm = Instance::builder("snap").image(&archive).up();
    assert_eq!(ssh_ok(&vm, "cat /etc/jbake-marker"), "baked");
    assert_ne!(
        vm.host_key, key_before,
        "host keys are regenerated per instance"
    );
}

#[test]
fn instance_options_host_key_bind_authorized_key() {
    if !prereq::instance_tier() {
        return;
    }
    instance::base_image();
    let dir = tempfile::tempdir().expect("temp folder");
    let keygen = |name: &str| {
        let path = dir.path().join(name);
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .output()
            .expect("run ssh-keygen");
        assert_ok("ssh-keygen", &out);
        path
    };
    let host_key = keygen("host");
    let extra = keygen("extra");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir shared");
    std::fs::write(shared.join("hello.txt"), "from the host\n").expect("write hello.txt");
    let extra_pub = std::fs::read_to_string(extra.with_extension("pub")).expect("read extra.pub");
    let vm = Instance::builder("opts")
        .host_key(&host_key)
        .bind(&shared, "/mnt/shared")
        .authorized_key(extra_pub.trim())
        .up();
    let host_pub = std::fs::read_to_string(host_key.with_extension("pub")).expect("read host.pub");
    assert!(
        host_pub.starts_with(&vm.host_key),
        "HOST_KEY is the given key"
    );
    assert_eq!(vm.exec_ok("cat /mnt/shared/hello.txt"), "from the host");
    // The extra key logs in too (the pinned known_hosts proves the host key).
    let out = Command::new("ssh")
        .args(vm.ssh_args().iter().map(|a| {
            if *a == vm.identity.display().to_string() {
                extra.display().to_string()
            } else {
                a.clone()
            }
        }))
        .arg("id -un")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh");
    assert_ok("ssh with the extra key", &out);
    assert_eq!(stdout(&out), "admin");
}
