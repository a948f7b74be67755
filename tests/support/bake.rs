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
use super::moto::{CloudInit, FaultProxy, Moto, REGION};
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

/// `jbake ARGS` (`controller --efs-id …`, `agent`) against moto through `proxy`, which shows
/// each instance `pending` until `cloud` served it ([`BOOTS_LIKE_EC2`]): the build instance
/// once the user-data host key is on `vm`, the boot test's instance once `cloud` booted a
/// machine from the image (its address then is the instance's IP); SSH to the build instance
/// goes to the nspawn `vm`; the build's record goes to `manifest`. Add `--output json` or more
/// flags to the command as needed.
pub fn bake_command(
    args: &[&str],
    moto: &Moto,
    proxy: &FaultProxy,
    cloud: &CloudInit,
    vm: &Instance,
    vars: &[String],
    manifest: &Path,
) -> Command {
    proxy.world(BOOTS_LIKE_EC2);
    cloud.report_to(proxy);
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

/// The realistic AWS of the fault proxy (see fault_proxy.py), everything at once, in seconds:
/// new instances, groups and images NotFound for their first 2 requests and missing from lists
/// for 1 s; instances `pending` for 2 s and until the cloud-init stand-in served them (report it with
/// `CloudInit::report_to`), `stopping` and `shutting-down` for 2 s (the group in use meanwhile,
/// 1.5 s longer, and for the first delete after that),
/// images and their snapshots `pending` for 3 s; every 9th request starts a burst of 2 throttled
/// answers; the first answer to each create, stop, tag and delete is lost after it took effect
/// (connection dropped, or HTTP 500).
pub const REALISTIC: &str = r#"{
    "seed": 7,
    "not_found": 2,
    "hide_s": 1.0,
    "pending_until_ready": true,
    "pending_s": 2,
    "pending_max_s": 60,
    "stopping_s": 2,
    "shutting_down_s": 2,
    "group_busy_s": 1.5,
    "group_in_use": 1,
    "image_pending_s": 3,
    "throttle_every": 9,
    "throttle_burst": 2,
    "lose_once": ["ImportKeyPair", "CreateSecurityGroup", "AuthorizeSecurityGroupIngress",
                  "RunInstances", "StopInstances", "CreateImage", "ModifyImageAttribute",
                  "CreateTags", "TerminateInstances", "DeleteSecurityGroup", "DeleteKeyPair"],
    "lose_how": ["drop", "500"]
}"#;

/// Only what makes the harness behave like EC2 at launch: an instance is `pending` until the
/// cloud-init stand-in served it (instead of [`BOOTING`]'s fixed delay).
pub const BOOTS_LIKE_EC2: &str = r#"{"pending_until_ready": true, "pending_max_s": 60}"#;

/// An HTTPS stand-in for checkip.amazonaws.com on 127.0.0.1 (Python's `ssl`, a certificate from
/// a test CA made with `openssl`): answers every GET with `answer`. Point jbake at it with
/// `JBAKE_CHECKIP_URL=url()` and trust it with `SSL_CERT_FILE=ca()`. Stopped by PID on drop.
pub struct CheckIp {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

const CHECKIP_PY: &str = r#"
import http.server, ssl, sys
answer = sys.argv[3].encode() + b"\n"
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

impl CheckIp {
    pub fn start(answer: &str) -> CheckIp {
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
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=jbake checkip test CA",
        ]);
        openssl(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(&csr);
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
        let mut child = super::command("python3")
            .args(["-c", CHECKIP_PY, "server.pem", "server.key", answer])
            .current_dir(d)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the checkip stand-in");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read the checkip stand-in's port");
        let port = line
            .trim()
            .parse()
            .expect("the checkip stand-in prints its port");
        CheckIp { child, port, dir }
    }

    /// `https://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port)
    }

    /// The test CA's certificate (PEM), for `SSL_CERT_FILE`.
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for CheckIp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
