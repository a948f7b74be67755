//! Baking the product's images against the stand-ins: `jbake controller|agent` against moto
//! (through a [`FaultProxy`]), with SSH going to an nspawn [`Instance`] where [`CloudInit`]
//! (started by the caller) plays cloud-init's part; and the Jenkins stand-in war.
//!
//! Shared by tests/images.rs, tests/build.rs and `examples/sandbox.rs` (the README's
//! `scripts/demo`): the demo runs exactly what the tests prove, so it cannot rot.
//!
//! The real jenkins.war cannot be downloaded here: [`build_standin`] builds a stand-in
//! (tests/fixtures/jenkins-standin, a tiny Java HTTP program) with the machine's `javac`; serve
//! it from a [`FileServer`](super::net::FileServer) on the instance's GATEWAY and pass its
//! SHA-256 ([`controller_vars`]).

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::cli::jbake;
use super::instance::Instance;
use super::moto::{FaultProxy, Moto, REGION};
use super::prereq;

/// A public parameter moto has (it has no Debian ones): the base of every build against moto.
pub const BASE_PARAM: &str =
    "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";

/// moto reports an instance `running` in RunInstances' own answer, before the harness has
/// played cloud-init's part (on EC2, sshd only answers once cloud-init installed the host key).
/// Holding the first DescribeInstances answer after the launch back for a few seconds gives
/// [`CloudInit`] that time, so jbake never meets the previous build's host key. A build that
/// launches nothing (unchanged, or failed before the launch) is not held back.
///
/// [`CloudInit`]: super::moto::CloudInit
pub const BOOTING: &str =
    r#"[{"action": "DescribeInstances", "after": "RunInstances", "delay_ms": 4000, "times": 1}]"#;

/// The EFS id the controller is baked for (checked offline; nothing is mounted at build time).
pub const EFS_ID: &str = "fs-0123456789abcdef0";
/// The Jenkins version of the recipe's default (the stand-in answers as `VERSION-standin`).
pub const JENKINS_VERSION: &str = "2.479.3";

/// The instance tier, moto, and a JDK for the stand-in war.
pub fn prerequisites() -> bool {
    prereq::instance_tier()
        & prereq::moto()
        & prereq::require(
            "javac (JDK 17+) for the Jenkins stand-in",
            prereq::has_program("javac"),
        )
        & prereq::require(
            "jar (JDK) for the Jenkins stand-in",
            prereq::has_program("jar"),
        )
}

/// Builds the stand-in war under `work/www/<version>/jenkins.war`; returns its SHA-256.
pub fn build_standin(work: &Path) -> String {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jenkins-standin/Jenkins.java");
    let classes = work.join("classes");
    let war = work.join("www").join(JENKINS_VERSION).join("jenkins.war");
    std::fs::create_dir_all(war.parent().expect("parent")).expect("mkdir www");
    let ok = super::command("javac")
        .args(["--release", "17", "-d"])
        .arg(&classes)
        .arg(&src)
        .status()
        .expect("run javac")
        .success();
    assert!(ok, "javac failed");
    let ok = super::command("jar")
        .args(["--create", "--file"])
        .arg(&war)
        .args(["--main-class", "Jenkins", "-C"])
        .arg(&classes)
        .arg(".")
        .status()
        .expect("run jar")
        .success();
    assert!(ok, "jar failed");
    let bytes = std::fs::read(&war).expect("read the war");
    format!("{:x}", Sha256::digest(&bytes))
}

/// The controller recipe's variables for the stand-in war served from `mirror`
/// (`http://GATEWAY:PORT`, a [`FileServer`](super::net::FileServer) of `work/www`).
pub fn controller_vars(mirror: &str, sha: &str) -> Vec<String> {
    vec![
        format!("jenkins_mirror={mirror}"),
        format!("jenkins_war_sha256={sha}"),
        // The tests' EFS stand-in starts empty: their image is a first installation's (an image
        // baked without this refuses an empty JENKINS_HOME).
        "jenkins_home_init=true".to_string(),
    ]
}

/// `jbake ARGS` (`controller --efs-id …`, `agent`) against moto through `proxy`, which holds
/// the first DescribeInstances back ([`BOOTING`]) while [`CloudInit`] installs the user-data
/// host key on `vm`; SSH goes to the nspawn `vm`; the build's record goes to `manifest`.
/// Add `--output json` or more flags to the command as needed.
///
/// [`CloudInit`]: super::moto::CloudInit
pub fn bake_command(
    args: &[&str],
    moto: &Moto,
    proxy: &FaultProxy,
    vm: &Instance,
    vars: &[String],
    manifest: &Path,
) -> Command {
    proxy.set(BOOTING);
    let mut cmd = jbake();
    moto.apply_env(&mut cmd);
    cmd.args(args)
        .args(["--region", REGION, "--endpoint-url", &proxy.endpoint()])
        // moto has no Debian parameters; the recipe's base stays the default everywhere else.
        .args(["--base-ssm-parameter", BASE_PARAM])
        .args(["--ssh-host", &vm.host, "--ssh-port", &vm.port.to_string()])
        .args(["--ssh-cidr", &format!("{}/32", vm.host)])
        .args(["--connect-timeout", "60s"])
        .args(["--manifest", &manifest.display().to_string()]);
    for v in vars {
        cmd.args(["--var", v]);
    }
    cmd
}
