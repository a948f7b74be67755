//! The product's images, proven on the instance tier (a real Debian bookworm booted with
//! systemd-nspawn): `jbake controller` / `jbake agent` run against moto (the AWS APIs) with
//! SSH going to a fresh instance, where [`CloudInit`] plays cloud-init's part for the
//! instance moto launched; the recipe runs, jbake's image hygiene runs, moto gets its image.
//! Then jbake boot-tests the image: when its test instance is launched, [`CloudInit`] stops the
//! build instance, "snapshots" it (its root file system archived) and boots a new instance from
//! the archive, where jbake's checks and the recipe's `test:` run (no EFS there: the controller
//! must wait for it). New instances boot from the same archive afterwards, with a host folder
//! bound at JENKINS_HOME standing in for the EFS (NFS cannot be mounted on this kernel).
//!
//! The real jenkins.war cannot be downloaded here: the tests build a stand-in
//! (tests/fixtures/jenkins-standin, a tiny Java HTTP program) with the machine's `javac`,
//! serve it from an HTTP server on the instance's GATEWAY and pass its SHA-256.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::build::{assert_nothing_left, build_id_of, finished};
use crate::support::archive;
use crate::support::bake::{bake_command, build_standin, controller_vars, prerequisites, EFS_ID};
use crate::support::cli::Run;
use crate::support::instance::{fstype_of, Instance};
use crate::support::moto::{CloudInit, FaultProxy, Moto};
use crate::support::net::{http, FileServer, Forwarder, Imds};
use crate::support::prereq;

const REGION: &str = "us-east-1";
const JENKINS_UID: u32 = 3000;

/// Seconds a step named like `name` took, from the JSON events.
fn step_secs(run: &Run, name: &str) -> f64 {
    run.events()
        .iter()
        .find(|e| {
            e["event"] == "step_finished" && e["name"].as_str().is_some_and(|n| n.contains(name))
        })
        .and_then(|e| e["elapsed_ms"].as_u64())
        .map(|ms| ms as f64 / 1000.0)
        .unwrap_or(f64::NAN)
}

/// Polls `GET /login` on port 8080 like the load balancer's health check.
fn wait_for_jenkins(vm: &Instance, timeout: Duration) -> crate::support::net::Response {
    let start = Instant::now();
    loop {
        match http("GET", &vm.host, 8080, "/login", "") {
            Ok(r) if r.status == 200 => return r,
            other => {
                if start.elapsed() > timeout {
                    let journal =
                        vm.exec("journalctl --no-pager -n 60 -u jenkins -u var-lib-jenkins.mount");
                    panic!(
                        "Jenkins did not answer /login on {} within {timeout:?}: {other:?}\n{}",
                        vm.name,
                        String::from_utf8_lossy(&journal.stdout)
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `jbake controller|agent ARGS` against moto with SSH going to the nspawn `vm`
/// ([`bake_command`], what `scripts/demo` runs too). Events in JSON.
fn bake(
    args: &[&str],
    moto: &Moto,
    proxy: &FaultProxy,
    cloud: &CloudInit,
    vm: &Instance,
    vars: &[String],
    manifest: &Path,
) -> Run {
    let mut cmd = bake_command(args, moto, proxy, cloud, vm, vars, manifest);
    cmd.args(["--output", "json"]);
    Run::from_output(cmd.output().expect("run jbake"))
}

/// What a successful `jbake controller|agent` made in moto: an available image of `recipe`,
/// named by its version and tagged, that passed its boot test; nothing else left (the test
/// instance, its key pair and group included). Returns the image id.
#[track_caller]
fn assert_baked(moto: &Moto, run: &Run, recipe: &str) -> String {
    run.assert_code(0);
    let id = build_id_of(run);
    let result = finished(run);
    assert_eq!(result["skipped_unchanged"], false, "{}", run.stdout);
    let ami = result["ami_id"].as_str().expect("ami_id").to_string();
    let version = result["version"].as_str().expect("version");
    let res = moto.resources(REGION);
    let image = res
        .images
        .iter()
        .find(|i| i.id == ami)
        .unwrap_or_else(|| panic!("{ami} not in {:?}", res.images));
    assert_eq!(image.state.as_deref(), Some("available"));
    assert_eq!(
        image.name.as_deref(),
        Some(format!("{recipe}-{version}").as_str())
    );
    for (k, v) in [
        ("jbake:recipe", recipe),
        ("jbake:version", version),
        ("jbake:complete", "true"),
        ("jbake:tested", "true"),
    ] {
        assert_eq!(
            image.tags.get(k).map(String::as_str),
            Some(v),
            "{k}: {image:?}"
        );
    }
    for k in [
        "jbake:tested-at",
        "jbake:build-host-key",
        "jbake:build-key",
        "jbake:build-machine-id",
    ] {
        assert!(image.tags.contains_key(k), "{k}: {image:?}");
    }
    assert_eq!(result["tested"], true, "{}", run.stdout);
    let test = run
        .events()
        .into_iter()
        .find(|e| e["event"] == "test_finished")
        .unwrap_or_else(|| panic!("no test_finished event: {}", run.stdout));
    assert_eq!(test["passed"], true, "{test}");
    let checks: Vec<String> = test["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            format!(
                "{} ({} ms)",
                c["name"].as_str().unwrap_or("?"),
                c["elapsed_ms"]
            )
        })
        .collect();
    eprintln!(
        "images: boot test of {ami} passed in {} ms: {}",
        test["elapsed_ms"],
        checks.join(", ")
    );
    assert_nothing_left(moto, &id);
    ami
}

/// What the image hygiene promised, in the image itself (the archive of its root file system):
/// no host key, an empty machine id, no key authorized for the login user (the harness's own
/// came off before the archive was made; the build's key pair was never left).
fn assert_hygiene(archive: &Path, user: &str) {
    let files = archive::list(archive);
    let host_keys: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("etc/ssh/ssh_host_"))
        .collect();
    assert!(
        host_keys.is_empty(),
        "host keys in the image: {host_keys:?}"
    );
    assert_eq!(
        archive::read(archive, "etc/machine-id").as_deref(),
        Some(&b""[..]),
        "/etc/machine-id is empty"
    );
    let keys =
        archive::read(archive, &format!("home/{user}/.ssh/authorized_keys")).unwrap_or_default();
    assert!(
        keys.is_empty(),
        "keys authorized in the image: {}",
        String::from_utf8_lossy(&keys)
    );
}

/// Builds the controller image once with `jbake controller` (steps, validate, image hygiene,
/// the boot test on an instance booted from its archive). Returns the archive.
fn bake_controller(work: &Path, efs_fstype: &str, moto: &Moto) -> PathBuf {
    let sha = build_standin(work);
    let t = Instant::now();
    let vm = Instance::builder("img-ctl").up();
    eprintln!("images: build instance up in {:.1?}", t.elapsed());
    let cloud = CloudInit::for_instance(moto, &vm);
    let proxy = FaultProxy::start(&moto.endpoint());
    let www = FileServer::start(&vm.gateway, work.join("www"));
    let manifest = work.join("manifest.json");
    let vars = test_controller_vars(&www.url(), &sha, efs_fstype);
    let args = ["controller", "--efs-id", EFS_ID];

    let t = Instant::now();
    let run = bake(&args, moto, &proxy, &cloud, &vm, &vars, &manifest);
    let ami = assert_baked(moto, &run, "jenkins-controller");
    eprintln!(
        "images: jbake controller in {:.1?} (Java via apt {:.1}s, curl+nfs-common {:.1}s) -> {ami}",
        t.elapsed(),
        step_secs(&run, "Install Java"),
        step_secs(&run, "NFS client")
    );
    for (n, status) in run.statuses() {
        assert_ne!(status, "failed", "step {n}: {}", run.stdout);
    }
    // The build instance, then the boot test's, booted from the image.
    let served = cloud.served();
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(
        served[0].booted.is_none() && served[1].booted.is_some(),
        "{served:?}"
    );
    assert_eq!(served[1].image_id, ami);
    assert!(
        cloud.booted_running().is_empty(),
        "the test instance's machine is gone"
    );

    // The same inputs again (the nightly cron): the image exists, nothing is launched.
    let again = bake(&args, moto, &proxy, &cloud, &vm, &vars, &manifest);
    again.assert_code(0);
    assert_eq!(
        finished(&again)["skipped_unchanged"],
        true,
        "{}",
        again.stdout
    );
    assert_eq!(finished(&again)["ami_id"], ami.as_str());
    assert_eq!(finished(&again)["tested"], true);
    assert_eq!(cloud.served().len(), 2, "no instance launched");

    // The image (what the harness archived when the test instance was launched): the verified
    // war, the fixed uid, an empty mount point (nothing ran and nothing was mounted at build
    // time), and nothing of the build's access.
    let image = cloud.image_archive(&ami).expect("the image's archive");
    let archive = work.join("controller.tar.zst");
    std::fs::copy(&image, &archive).expect("keep the archive");
    let war = archive::read(&archive, "usr/share/java/jenkins.war").expect("the war");
    assert_eq!(format!("{:x}", sha2::Sha256::digest(&war)), sha);
    let passwd =
        String::from_utf8(archive::read(&archive, "etc/passwd").expect("passwd")).expect("UTF-8");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with(&format!("jenkins:x:{JENKINS_UID}:"))),
        "{passwd}"
    );
    let home: Vec<String> = archive::list(&archive)
        .into_iter()
        .filter(|f| f.starts_with("var/lib/jenkins/"))
        .collect();
    assert_eq!(home, ["var/lib/jenkins/"], "nothing in the mount point");
    assert_hygiene(&archive, &vm.user);
    drop((www, cloud, vm));
    archive
}

/// The controller recipe's variables for the tests: the stand-in war from `mirror`, and the
/// bind mount's file system type accepted at JENKINS_HOME besides nfs4.
fn test_controller_vars(mirror: &str, sha: &str, efs_fstype: &str) -> Vec<String> {
    let mut vars = controller_vars(mirror, sha);
    vars.push(format!("jenkins_home_fstypes=nfs4 {efs_fstype}"));
    vars
}

/// A build of the controller on an instance launched from the image, with a wrong checksum
/// for the war: refused with a message naming the step, the instance and both checksums;
/// everything the build made is removed and the verified war stays in place.
fn rebuild_with_a_wrong_checksum(
    work: &Path,
    moto: &Moto,
    from_image: &Instance,
    efs_fstype: &str,
) {
    let cloud = CloudInit::for_instance(moto, from_image);
    let proxy = FaultProxy::start(&moto.endpoint());
    let www = FileServer::start(&from_image.gateway, work.join("www"));
    let before = from_image.exec_ok("sha256sum /usr/share/java/jenkins.war | cut -d' ' -f1");
    let images = moto.resources(REGION).images.len();
    let vars = test_controller_vars(&www.url(), &"0".repeat(64), efs_fstype);
    let bad = bake(
        &["controller", "--efs-id", EFS_ID],
        moto,
        &proxy,
        &cloud,
        from_image,
        &vars,
        &work.join("manifest.json"),
    );
    bad.assert_code(1);
    // The war's step, wherever the recipe's earlier steps (upgrades, …) put it.
    let war_step = bad
        .statuses()
        .into_iter()
        .find(|(_, s)| s == "failed")
        .map(|(n, _)| n)
        .unwrap_or_else(|| panic!("no failed step: {}", bad.stdout));
    assert!(
        bad.stderr.contains(&format!(
            "step {war_step} 'Jenkins 2.479.3 war, SHA-256 verified' ("
        )) && bad.stderr.contains("recipes/controller.yaml:")
            && bad.stderr.contains(") exited 1 (attempt 3 of 3) on i-"),
        "{}",
        bad.stderr
    );
    assert!(
        bad.stderr
            .contains(&format!("has SHA-256 {before}, expected 0000")),
        "{}",
        bad.stderr
    );
    assert_nothing_left(moto, &build_id_of(&bad));
    assert_eq!(moto.resources(REGION).images.len(), images, "no image");
    assert_eq!(cloud.served().len(), 1);
    // The steps before it found their work done (the image is their result).
    let failed: Vec<u64> = bad
        .statuses()
        .into_iter()
        .filter(|(_, s)| s == "failed")
        .map(|(n, _)| n)
        .collect();
    assert_eq!(failed.len(), 1, "{}", bad.stdout);
    assert_eq!(
        from_image.exec_ok("sha256sum /usr/share/java/jenkins.war | cut -d' ' -f1"),
        before,
        "the verified war stays in place"
    );
}

#[test]
fn images_controller_serves_the_same_efs_state_on_a_new_instance_and_never_the_local_disk() {
    if !prerequisites() {
        return;
    }
    let total = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("jbake-images-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    // The EFS stand-in: a host folder, root-owned like a new EFS's root directory.
    let efs = work.path().join("efs");
    std::fs::create_dir(&efs).expect("mkdir efs");
    Command::new("chmod")
        .arg("0755")
        .arg(&efs)
        .status()
        .expect("chmod");
    let moto = Moto::start();
    let archive = bake_controller(work.path(), &fstype_of(&efs), &moto);
    let reader = ssm_reader(&moto);
    let (_, _) = keypair(work.path(), "agents");
    let agents_key = std::fs::read_to_string(work.path().join("agents")).expect("private key");
    moto.put_parameter("/devops-tools/jenkins/id_rsa", &agents_key, true);

    // The image carries no private key at all (no host keys, no agent key, no build key).
    let keys = archive::private_keys(&archive);
    assert!(keys.is_empty(), "private keys in the image: {keys:?}");

    // Instance A: first boot on the empty EFS.
    let t = Instant::now();
    let a = Instance::builder("img-ctl-a")
        .image(&archive)
        .bind(&efs, "/var/lib/jenkins")
        .up();
    let up = t.elapsed();
    let login = wait_for_jenkins(&a, Duration::from_secs(90));
    eprintln!(
        "images: A sshd after {up:.1?}, Jenkins /login 200 after {:.1?}",
        t.elapsed()
    );
    assert_eq!(login.header("X-Jenkins"), Some("2.479.3-standin"));
    assert!(
        login.body.contains(&format!("uid={JENKINS_UID} ")),
        "{}",
        login.body
    );
    assert!(
        login.body.contains("home=/var/lib/jenkins"),
        "{}",
        login.body
    );
    // The heap was sized from the machine's RAM (MaxRAMPercentage=50).
    let mem_kb: u64 = a
        .exec_ok("awk '/^MemTotal:/ { print $2 }' /proc/meminfo")
        .parse()
        .expect("MemTotal");
    let heap: u64 = login
        .header("X-Max-Memory")
        .and_then(|v| v.parse().ok())
        .expect("X-Max-Memory");
    let pct = heap as f64 * 100.0 / (mem_kb as f64 * 1024.0);
    assert!((35.0..=51.0).contains(&pct), "max heap is {pct:.1}% of RAM");
    let init = std::fs::read_to_string(efs.join(".jbake-initialised")).expect("first boot marker");
    assert!(init.contains(&a.name), "{init}");
    assert_eq!(std::fs::metadata(&efs).expect("efs").uid(), JENKINS_UID);
    let journal = a.exec_ok("journalctl --no-pager -u jenkins");
    assert!(journal.contains("was empty: initialised"), "{journal}");

    // The agents' private key: read from SSM at boot (retrying until SSM answers) into
    // memory, root-owned, readable by jenkins only; never on the EFS.
    let _ssm = point_ssm_at_moto_via_imds(&a, &moto, &reader);
    let took = wait_for_file(
        &a,
        "/run/jenkins-secrets/agent-ssh-key",
        &agents_key,
        Duration::from_secs(60),
    );
    eprintln!("images: A has the agents' key from SSM (role credentials from IMDSv2) {took:.1?} after the endpoint was set");
    assert_eq!(
        a.exec_ok("stat -c '%U:%G %a' /run/jenkins-secrets/agent-ssh-key /run/jenkins-secrets"),
        "root:jenkins 440\nroot:jenkins 750"
    );
    a.exec_ok("runuser -u jenkins -- head -c 10 /run/jenkins-secrets/agent-ssh-key >/dev/null");
    assert!(!a
        .exec("runuser -u nobody -- head -c 10 /run/jenkins-secrets/agent-ssh-key")
        .status
        .success());
    assert!(a
        .exec("findmnt -n -o FSTYPE --target /run/jenkins-secrets")
        .stdout
        .starts_with(b"tmpfs"));

    let created = http(
        "POST",
        &a.host,
        8080,
        "/createItem?name=hello",
        "<project>built on A</project>",
    )
    .expect("create a job");
    assert_eq!(created.status, 200, "{created:?}");
    let job = efs.join("jobs/hello/config.xml");
    assert_eq!(
        std::fs::read_to_string(&job).expect("job on EFS"),
        "<project>built on A</project>"
    );
    assert_eq!(std::fs::metadata(&job).expect("job").uid(), JENKINS_UID);
    // The ASG terminates A.
    a.down();

    // Instance B: same image, same EFS: the same state, the same owner, nothing re-initialised.
    let t = Instant::now();
    let b = Instance::builder("img-ctl-b")
        .image(&archive)
        .bind(&efs, "/var/lib/jenkins")
        .up();
    wait_for_jenkins(&b, Duration::from_secs(90));
    eprintln!("images: B Jenkins /login 200 after {:.1?}", t.elapsed());
    let got = http("GET", &b.host, 8080, "/job/hello/config.xml", "").expect("read the job on B");
    assert_eq!(
        (got.status, got.body.as_str()),
        (200, "<project>built on A</project>")
    );
    assert_eq!(
        std::fs::read_to_string(efs.join(".jbake-initialised")).expect("marker"),
        init,
        "a populated EFS is left as it is"
    );
    let journal = b.exec_ok("journalctl --no-pager -u jenkins");
    assert!(journal.contains("is populated"), "{journal}");
    let starts = std::fs::read_to_string(efs.join("standin-starts.log")).expect("starts log");
    let lines: Vec<&str> = starts.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{} uid={JENKINS_UID}", a_name(&init)),
            format!("{} uid={JENKINS_UID}", b.name)
        ],
        "both instances ran Jenkins as uid {JENKINS_UID}"
    );
    b.down();
    let on_efs = Command::new("grep")
        .args(["-rl", "PRIVATE KEY"])
        .arg(&efs)
        .output()
        .expect("grep");
    assert!(
        on_efs.stdout.is_empty(),
        "a private key on the EFS: {}",
        String::from_utf8_lossy(&on_efs.stdout)
    );

    // Instance C: the EFS is not there. Jenkins stays down; nothing is written locally.
    let t = Instant::now();
    let c = Instance::builder("img-ctl-c").image(&archive).up();
    let state = c.exec("timeout 200 systemctl is-system-running --wait");
    eprintln!(
        "images: C (no EFS) booted and settled in {:.1?}: {}",
        t.elapsed(),
        String::from_utf8_lossy(&state.stdout).trim()
    );
    // What happened: the EFS mount failed, so jenkins.service failed its dependency.
    let boot_log = c.exec_ok("journalctl -b --no-pager -o cat");
    let mount_lines: Vec<&str> = boot_log
        .lines()
        .filter(|l| l.contains("var-lib-jenkins.mount") || l.contains("jenkins.service"))
        .collect();
    eprintln!(
        "images: C boot log about the mount and Jenkins:\n  {}",
        mount_lines.join("\n  ")
    );
    assert!(
        boot_log.contains("Dependency failed for jenkins.service"),
        "{}",
        mount_lines.join("\n")
    );
    let active = c.exec("systemctl is-active jenkins.service");
    assert_ne!(String::from_utf8_lossy(&active.stdout).trim(), "active");
    assert!(
        http("GET", &c.host, 8080, "/login", "").is_err(),
        "nothing listens on 8080"
    );
    assert_eq!(
        c.exec_ok("ls -A /var/lib/jenkins"),
        "",
        "nothing written to the local disk"
    );
    assert!(!c.exec("test -e /var/cache/jenkins").status.success());
    let check = c.exec("/usr/local/lib/jbake/jenkins-home-check");
    assert!(!check.status.success());
    let why = String::from_utf8_lossy(&check.stderr);
    assert!(why.contains("is not a mount point"), "{why}");
    // Even started by hand, jenkins could not write the local mount point (root-owned).
    assert!(!c
        .exec("runuser -u jenkins -- touch /var/lib/jenkins/x")
        .status
        .success());
    assert_eq!(
        c.exec_ok("grep ' /var/lib/jenkins ' /etc/fstab"),
        format!(
            "{EFS_ID}.efs.us-east-1.amazonaws.com:/ /var/lib/jenkins nfs4 \
             nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev,nofail 0 0"
        )
    );
    c.exec_ok("findmnt --verify --tab-file /etc/fstab");

    // A rebuild on top of the image (C is an instance launched from it) with a wrong checksum.
    moto.disable_iam_auth();
    rebuild_with_a_wrong_checksum(work.path(), &moto, &c, &fstype_of(&efs));
    c.down();
    eprintln!("images: controller test in {:.1?}", total.elapsed());
}

/// A moto IAM user allowed nothing but `ssm:GetParameter`, with IAM authorization on: the
/// instance's SigV4 signature is checked and it gets no more than the instance role would.
fn ssm_reader(moto: &Moto) -> (String, String) {
    let user = moto.iam_user(
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ssm:GetParameter","Resource":"*"}]}"#,
    );
    moto.enable_iam_auth();
    user
}

/// Points the instance's SSM reads at moto: a forwarder on its GATEWAY to moto on 127.0.0.1
/// (only that port), and /etc/default/jbake-ssm with the endpoint and the reader's keys.
fn point_ssm_at_moto(vm: &Instance, moto: &Moto, reader: &(String, String)) -> Forwarder {
    let fwd = Forwarder::start(&vm.gateway, moto.port());
    vm.exec_ok(&format!(
        "printf 'AWS_REGION=us-east-1\\nAWS_ENDPOINT_URL_SSM={}/\\nAWS_ACCESS_KEY_ID={}\\nAWS_SECRET_ACCESS_KEY={}\\n' \
         > /etc/default/jbake-ssm && chmod 0600 /etc/default/jbake-ssm",
        fwd.url(),
        reader.0,
        reader.1
    ));
    fwd
}

/// Like [`point_ssm_at_moto`], but the way a real instance gets its region and credentials:
/// from the instance metadata service (IMDSv2, a stand-in on the GATEWAY handing out the
/// reader's keys as the instance role's); only the SSM endpoint is overridden.
fn point_ssm_at_moto_via_imds(
    vm: &Instance,
    moto: &Moto,
    reader: &(String, String),
) -> (Forwarder, Imds) {
    let fwd = Forwarder::start(&vm.gateway, moto.port());
    let imds = Imds::start(&vm.gateway, "us-east-1", &reader.0, &reader.1);
    vm.exec_ok(&format!(
        "printf 'AWS_ENDPOINT_URL_SSM={}/\\nAWS_EC2_METADATA_SERVICE_ENDPOINT={}\\n' > /etc/default/jbake-ssm",
        fwd.url(),
        imds.url()
    ));
    (fwd, imds)
}

/// Waits until `cat FILE` in the guest prints `want`; returns how long it took.
fn wait_for_file(vm: &Instance, file: &str, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let out = vm.exec(&format!("cat {file}"));
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && got.trim() == want.trim() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let journal = vm.exec("journalctl --no-pager -n 40 -u 'jbake-*'");
            panic!(
                "{file} on {} is not {want:?} after {timeout:?} (it is {got:?})\n{}",
                vm.name,
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A fresh ed25519 key pair in `dir`: (private key file, public key line).
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
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", vm.known_hosts().display()))
        .arg(format!("{user}@{}", vm.host))
        .arg("id -un")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ssh");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn images_agent_accepts_the_controller_key_from_ssm_and_follows_its_rotation() {
    if !prerequisites() {
        return;
    }
    let total = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("jbake-images-agent-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let moto = Moto::start();
    let (key1, pub1) = keypair(work.path(), "controller-1");
    let (key2, pub2) = keypair(work.path(), "controller-2");
    let param = "/devops-tools/jenkins/id_rsa.pub";
    moto.put_parameter(param, &pub1, true);

    let vm = Instance::builder("img-agent").up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    let proxy = FaultProxy::start(&moto.endpoint());
    let t = Instant::now();
    let run = bake(
        &["agent"],
        &moto,
        &proxy,
        &cloud,
        &vm,
        // The default tool list (the original's: pip, boto3, awscli, ansible, ...): about 50 s
        // of apt, while the controller test waits out its 90 s mount timeout in parallel.
        &["key_refresh_interval=5s".into()],
        &work.path().join("manifest.json"),
    );
    let ami = assert_baked(&moto, &run, "jenkins-agent");
    assert_eq!(cloud.served().len(), 2, "{:?}", cloud.served());
    let image = cloud.image_archive(&ami).expect("the image's archive");
    let archive = work.path().join("agent.tar.zst");
    std::fs::copy(&image, &archive).expect("keep the archive");
    drop(cloud);
    eprintln!(
        "images: jbake agent in {:.1?} -> {ami} (Java via apt {:.1}s, git and tools {:.1}s)",
        t.elapsed(),
        step_secs(&run, "Install Java"),
        step_secs(&run, "git and the build tools")
    );
    let files = archive::list(&archive);
    for key in [
        "home/jenkins/.ssh/authorized_keys",
        "etc/ssh/authorized_keys/jenkins",
    ] {
        assert!(!files.iter().any(|f| f == key), "{key} in the image");
    }
    assert_hygiene(&archive, &vm.user);
    drop(vm);
    let keys = archive::private_keys(&archive);
    assert!(keys.is_empty(), "private keys in the agent image: {keys:?}");
    let reader = ssm_reader(&moto);

    // Boot: the key sync retries until it can read SSM, then installs the controller's key,
    // root-owned, in the folder sshd reads the agent user's keys from (never its home).
    let keys = "/etc/ssh/authorized_keys/jenkins";
    let t = Instant::now();
    let agent = Instance::builder("img-agent-b").image(&archive).up();
    let _fwd = point_ssm_at_moto(&agent, &moto, &reader);
    let took = wait_for_file(&agent, keys, &pub1, Duration::from_secs(60));
    eprintln!("images: agent booted, key from SSM after {:.1?} ({took:.1?} after the SSM endpoint was set)", t.elapsed());
    assert_eq!(
        agent.exec_ok(&format!("stat -c '%U:%G %a' {keys}")),
        "root:root 644"
    );
    assert_eq!(ssh_as(&agent, "jenkins", &key1).as_deref(), Some("jenkins"));

    // Rotation, no rebuild: during the window the parameter holds the old and the new key
    // (both log in), then only the new one (the old one is refused).
    let both = format!("{pub1}\n{pub2}");
    moto.put_parameter(param, &both, true);
    let took = wait_for_file(&agent, keys, &both, Duration::from_secs(60));
    eprintln!("images: old and new key in place {took:.1?} after the parameter changed");
    assert_eq!(ssh_as(&agent, "jenkins", &key1).as_deref(), Some("jenkins"));
    assert_eq!(ssh_as(&agent, "jenkins", &key2).as_deref(), Some("jenkins"));
    moto.put_parameter(param, &pub2, true);
    let took = wait_for_file(&agent, keys, &pub2, Duration::from_secs(60));
    eprintln!("images: rotated key in place {took:.1?} after the parameter changed");
    assert_eq!(ssh_as(&agent, "jenkins", &key2).as_deref(), Some("jenkins"));
    assert_eq!(
        ssh_as(&agent, "jenkins", &key1),
        None,
        "the old key is refused"
    );

    // A parameter that is not a public key is refused; the keys in place stay.
    moto.put_parameter(
        param,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----",
        true,
    );
    let start = Instant::now();
    while !agent
        .exec("journalctl --no-pager -u jbake-agent-key-sync | grep -q 'refusing to write'")
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the bad value was not refused"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(agent.exec_ok(&format!("cat {keys}")), pub2);
    eprintln!("images: agent test in {:.1?}", total.elapsed());
}

/// The instance name in the first-boot marker ("initialised by NAME (…").
fn a_name(marker: &str) -> String {
    marker
        .strip_prefix("initialised by ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

/// The archive scan itself finds keys (a scan that finds nothing proves nothing otherwise),
/// and it ignores text that merely mentions a key, like jbake-ssm-get's own source.
#[test]
fn images_private_key_scan_finds_a_key_in_an_archive() {
    let tools = ["zstd", "tar", "grep", "ssh-keygen"];
    if !tools
        .iter()
        .all(|t| prereq::require(t, prereq::has_program(t)))
    {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc/ssh")).expect("mkdir");
    std::fs::create_dir_all(root.join("usr/local/lib/jbake")).expect("mkdir");
    let (key, _) = keypair(&root.join("etc/ssh"), "ssh_host_ed25519_key");
    assert!(key.exists());
    let pem = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(root.join("root-key.pem"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("files/jbake-ssm-get"),
        root.join("usr/local/lib/jbake/jbake-ssm-get"),
    )
    .expect("copy");
    let archive = work.path().join("image.tar.zst");
    let ok = Command::new("sh")
        .arg("-c")
        .arg("tar -C \"$1\" -cf - . | zstd -q -o \"$2\"")
        .args([
            "sh",
            &root.display().to_string(),
            &archive.display().to_string(),
        ])
        .status()
        .expect("tar")
        .success();
    assert!(ok, "cannot make the archive");
    let mut want = vec!["etc/ssh/ssh_host_ed25519_key".to_string()];
    if pem {
        want.push("root-key.pem".to_string());
    }
    assert_eq!(archive::private_keys(&archive), want);
}
