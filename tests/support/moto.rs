//! AWS stand-in: a moto server per test (`moto_server.py`: `python3 -m moto.server` with its
//! SigV4 check fixed for form-encoded bodies), a fault-injecting proxy in front of it, and a
//! stand-in for cloud-init on the instances jbake launches.
//!
//! ```ignore
//! let moto = Moto::start();
//! let mut cmd = cli::jbake(); moto.apply_env(&mut cmd);
//! moto.start_recording(); /* run jbake */ moto.stop_recording();
//! assert!(moto.recorded_actions().contains(&"RunInstances".to_string()));
//! assert!(moto.resources("us-east-1").tagged_with_build("b1").is_empty());
//! ```
//!
//! moto keeps its state in the server process, so every [`Moto`] is its own server
//! (own port, own recording file in a temp folder): tests never share state. The
//! harness talks to moto with `tests/support/awsctl.py` (boto3; JSON on stdout) and to
//! the `/moto-api/` control endpoints with a plain HTTP request. Everything started is
//! killed by PID on drop, also when the test panics.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

use super::instance::Instance;
use super::sshd::{self, Sshd, SshdReload};

/// Region of the environment [`Moto::env`] sets.
pub const REGION: &str = "us-east-1";
/// The tag jbake puts on everything a build creates.
pub const BUILD_TAG: &str = "jbake:build-id";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The AWS config and credentials file of every client of a [`Moto`]: empty.
const EMPTY_AWS_FILE: &str = "empty-aws-file";

/// A python helper of this folder (`awsctl.py`, `fault_proxy.py`).
fn helper(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Last `n` lines of a file, for failure messages.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One plain HTTP/1.0 request to 127.0.0.1:`port` (no client crate needed, no chunked
/// answers); returns status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer: {head:?}"),
            )
        })?;
    Ok((status, body.to_string()))
}

/// A moto server on 127.0.0.1; killed by PID on drop.
pub struct Moto {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    /// Credentials the harness's own calls use: `testing`, or an admin IAM user
    /// while IAM authorization is on.
    creds: Mutex<(String, String)>,
}

impl Moto {
    /// Starts a server on a free port (strict AMI and key pair validation on) and
    /// waits until it answers.
    pub fn start() -> Moto {
        let dir = tempfile::Builder::new()
            .prefix("jbake-moto-")
            .tempdir()
            .expect("create the moto temp folder");
        fs::write(dir.path().join(EMPTY_AWS_FILE), "").expect("create an empty AWS config file");
        let mut moto = Moto {
            dir,
            port: 0,
            child: None,
            creds: Mutex::new(("testing".into(), "testing".into())),
        };
        // A free port can be taken by someone else before moto binds it: try again.
        for _ in 0..5 {
            if moto.spawn(free_port()) {
                return moto;
            }
        }
        panic!(
            "moto did not start; the tail of its log:\n{}",
            tail(&moto.log_path(), 40)
        );
    }

    fn spawn(&mut self, port: u16) -> bool {
        let log = fs::File::create(self.log_path()).expect("create the moto log");
        // moto.server, with its SigV4 check fixed for form-encoded bodies (see the file).
        let mut child = super::command("python3")
            .arg(helper("moto_server.py"))
            .args(["-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .current_dir(self.dir.path())
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")
            .env("MOTO_RECORDER_FILEPATH", self.dir.path().join("recording"))
            .env_remove("MOTO_ENABLE_RECORDING")
            .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .expect("spawn python3 tests/support/moto_server.py");
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if let Ok(Some(_)) = child.try_wait() {
                return false; // exited: port taken, or broken (the log says)
            }
            if matches!(
                http(port, "GET", "/moto-api/data.json", "text/plain", ""),
                Ok((200, _))
            ) {
                self.port = port;
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    /// The server's log so far (the last lines), for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_path(), 40)
    }

    pub fn port(&self) -> u16 {
        self.port
    }
    /// PID of the server process.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("moto is running")
    }
    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment an AWS client (jbake, the SDK, boto3) needs to talk to this
    /// server only: fixed `testing` credentials, the region, the endpoint, no instance
    /// metadata, and empty config/credentials files, so nothing of the host's AWS setup
    /// leaks in (files that do not exist would do too, but the SDK warns about them).
    pub fn env(&self) -> Vec<(String, String)> {
        self.env_with(&self.endpoint(), "testing", "testing")
    }

    /// [`env`](Self::env) with another endpoint and credentials (a [`FaultProxy`], an IAM user).
    pub fn env_with(&self, endpoint: &str, key: &str, secret: &str) -> Vec<(String, String)> {
        let empty = self.dir.path().join(EMPTY_AWS_FILE);
        let empty = empty.display().to_string();
        [
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_REGION", REGION),
            ("AWS_DEFAULT_REGION", REGION), // boto3 reads this one, not AWS_REGION
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", &empty),
            ("AWS_SHARED_CREDENTIALS_FILE", &empty),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The environment of the harness's own calls: [`env`](Self::env), or with the admin
    /// user's credentials while IAM authorization is on (for helper scripts of the tests).
    pub fn harness_env(&self) -> Vec<(String, String)> {
        let (key, secret) = self.creds.lock().expect("creds lock").clone();
        self.env_with(&self.endpoint(), &key, &secret)
    }

    /// Sets [`env`](Self::env) on a command and removes the other `AWS_*` variables
    /// (profile, session token, ...) it would inherit.
    pub fn apply_env(&self, cmd: &mut Command) {
        apply(cmd, &self.env());
    }

    /// POST to a `/moto-api/` endpoint; panics (with the log tail) unless it answers 200.
    fn api(&self, path: &str, content_type: &str, body: &str) -> String {
        match http(self.port, "POST", path, content_type, body) {
            Ok((200, text)) => text,
            other => panic!(
                "moto POST {path}: {other:?}; the tail of its log:\n{}",
                self.log_tail()
            ),
        }
    }

    /// Forgets all state (POST /moto-api/reset); the recording file stays.
    pub fn reset(&self) {
        self.api("/moto-api/reset", "application/json", "");
    }

    /// Starts recording the requests moto receives, from an empty recording.
    pub fn start_recording(&self) {
        self.api("/moto-api/recorder/reset-recording", "text/plain", "");
        self.api("/moto-api/recorder/start-recording", "text/plain", "");
    }

    pub fn stop_recording(&self) {
        self.api("/moto-api/recorder/stop-recording", "text/plain", "");
    }

    /// API action names of the recorded requests, in order ("DescribeImages",
    /// "RunInstances", "GetParameter", ...): `Action=` of a query/form request, the
    /// operation of `X-Amz-Target` for JSON-protocol ones.
    pub fn recorded_actions(&self) -> Vec<String> {
        let recording = match http(
            self.port,
            "GET",
            "/moto-api/recorder/download-recording",
            "text/plain",
            "",
        ) {
            Ok((200, text)) => text,
            other => panic!("moto download-recording: {other:?}"),
        };
        let value = self.awsctl_stdin("recorded", serde_json::json!({}), &recording);
        serde_json::from_value(value).expect("awsctl recorded prints a list of names")
    }

    /// The recorded requests with their query/form parameters, flattened the way the EC2
    /// query protocol sends them (`BlockDeviceMapping.1.Ebs.Encrypted` = `true`).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        let recording = match http(
            self.port,
            "GET",
            "/moto-api/recorder/download-recording",
            "text/plain",
            "",
        ) {
            Ok((200, text)) => text,
            other => panic!("moto download-recording: {other:?}"),
        };
        let value = self.awsctl_stdin("recorded-requests", serde_json::json!({}), &recording);
        serde_json::from_value(value).expect("awsctl recorded-requests prints a list")
    }

    /// Runs `awsctl.py COMMAND ARGS` with this server's environment; its JSON output.
    pub fn awsctl(&self, command: &str, args: serde_json::Value) -> serde_json::Value {
        self.awsctl_stdin(command, args, "")
    }

    fn awsctl_stdin(
        &self,
        command: &str,
        args: serde_json::Value,
        stdin: &str,
    ) -> serde_json::Value {
        let (key, secret) = self.creds.lock().expect("creds lock").clone();
        let mut cmd = super::command("python3");
        cmd.arg(helper("awsctl.py"))
            .arg(command)
            .arg(args.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        apply(&mut cmd, &self.env_with(&self.endpoint(), &key, &secret));
        let mut child = cmd.spawn().expect("spawn python3 awsctl.py");
        let mut input = child.stdin.take().expect("awsctl stdin");
        input
            .write_all(stdin.as_bytes())
            .expect("write to awsctl's stdin");
        drop(input);
        let out = child.wait_with_output().expect("wait for awsctl.py");
        assert!(
            out.status.success(),
            "awsctl.py {command} failed: {}\nthe tail of moto's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "awsctl.py {command} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A snapshot of the EC2 state of `region`, for leak assertions.
    pub fn resources(&self, region: &str) -> Resources {
        let value = self.awsctl("resources", serde_json::json!({ "region": region }));
        serde_json::from_value(value).expect("awsctl resources prints Resources")
    }

    /// Creates an IAM user with `policy_json` as its only (inline) policy; returns
    /// its access key and secret.
    pub fn iam_user(&self, policy_json: &str) -> (String, String) {
        let value = self.awsctl("iam-user", serde_json::json!({ "policy": policy_json }));
        let get = |k: &str| {
            value[k]
                .as_str()
                .unwrap_or_else(|| panic!("awsctl iam-user printed no {k}: {value}"))
                .to_string()
        };
        (get("access_key"), get("secret"))
    }

    /// Turns IAM authorization on: from now on every request needs the credentials of
    /// an IAM user whose policy allows it (`testing` is refused). The harness's own
    /// calls switch to an admin user created here.
    pub fn enable_iam_auth(&self) {
        let admin = self.iam_user(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#,
        );
        self.api("/moto-api/reset-auth", "text/plain", "0");
        *self.creds.lock().expect("creds lock") = admin;
    }

    /// Turns IAM authorization off again.
    pub fn disable_iam_auth(&self) {
        self.api("/moto-api/reset-auth", "text/plain", "inf");
        *self.creds.lock().expect("creds lock") = ("testing".into(), "testing".into());
    }

    /// SSM PutParameter (String, or SecureString when `secure`), overwriting.
    pub fn put_parameter(&self, name: &str, value: &str, secure: bool) {
        self.awsctl(
            "put-parameter",
            serde_json::json!({ "name": name, "value": value, "secure": secure }),
        );
    }

    /// Registers an AMI owned by this account (backed by a fresh snapshot), tagged
    /// with `tags`; returns its id. moto's built-in AMIs also work as a base.
    pub fn create_image_fixture(&self, name: &str, tags: &[(&str, &str)]) -> String {
        let tags: BTreeMap<&str, &str> = tags.iter().copied().collect();
        let value = self.awsctl(
            "register-image",
            serde_json::json!({ "name": name, "tags": tags, "region": REGION }),
        );
        value["image_id"]
            .as_str()
            .unwrap_or_else(|| panic!("awsctl register-image printed no image_id: {value}"))
            .to_string()
    }
}

/// An SSM parameter as the harness reads it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Parameter {
    pub value: String,
    pub version: i64,
    pub data_type: Option<String>,
}

/// The copy/share/publish tests' helpers: several regions, KMS keys, launch permissions,
/// parameters.
impl Moto {
    /// The EC2 state of each of `regions`, in that order.
    pub fn resources_in(&self, regions: &[&str]) -> Vec<(String, Resources)> {
        regions
            .iter()
            .map(|r| (r.to_string(), self.resources(r)))
            .collect()
    }

    /// A customer managed KMS key in `region`, with `alias`; returns its ARN.
    pub fn kms_key(&self, region: &str, alias: &str) -> String {
        let v = self.awsctl(
            "kms-key",
            serde_json::json!({ "region": region, "alias": alias }),
        );
        v["arn"]
            .as_str()
            .expect("awsctl kms-key prints an arn")
            .to_string()
    }

    /// Makes `key` the account's default EBS key in `region`; returns its ARN.
    pub fn set_ebs_default_key(&self, region: &str, key: &str) -> String {
        let v = self.awsctl(
            "ebs-default-key",
            serde_json::json!({ "region": region, "key": key }),
        );
        v["arn"]
            .as_str()
            .expect("awsctl ebs-default-key prints an arn")
            .to_string()
    }

    /// The accounts that may launch `image` (in `region`).
    pub fn launch_permissions(&self, region: &str, image: &str) -> Vec<String> {
        let v = self.awsctl(
            "launch-permissions",
            serde_json::json!({ "region": region, "image_id": image }),
        );
        serde_json::from_value(v).expect("awsctl launch-permissions prints a list")
    }

    /// The SSM parameter `name` in `region`, if it exists.
    pub fn parameter(&self, region: &str, name: &str) -> Option<Parameter> {
        let v = self.awsctl(
            "get-parameter",
            serde_json::json!({ "region": region, "name": name }),
        );
        serde_json::from_value(v).expect("awsctl get-parameter prints a parameter or null")
    }

    /// A String parameter in `region` (overwriting).
    pub fn put_parameter_in(&self, region: &str, name: &str, value: &str) {
        self.awsctl(
            "put-parameter",
            serde_json::json!({ "name": name, "value": value, "region": region }),
        );
    }

    /// An image of this account in `region`, tagged with `tags`; with `encrypted`, made by
    /// CreateImage from an instance whose root volume is encrypted with that key (`Some(None)`:
    /// the region's default EBS key), as a build makes it. Returns `(image id, snapshot id)`.
    pub fn image_fixture_in(
        &self,
        region: &str,
        name: &str,
        tags: &[(&str, &str)],
        encrypted: Option<Option<&str>>,
    ) -> (String, String) {
        let tags: BTreeMap<&str, &str> = tags.iter().copied().collect();
        let value = self.awsctl(
            "register-image",
            serde_json::json!({
                "name": name,
                "tags": tags,
                "region": region,
                "encrypted": encrypted.is_some(),
                "kms_key_id": encrypted.flatten(),
            }),
        );
        let get = |k: &str| {
            value[k]
                .as_str()
                .unwrap_or_else(|| panic!("awsctl register-image printed no {k}: {value}"))
                .to_string()
        };
        (get("image_id"), get("snapshot_id"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sets `vars` on `cmd` after removing every inherited `AWS_*` variable.
fn apply(cmd: &mut Command, vars: &[(String, String)]) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)));
}

// ------------------------------------------------------------------ resources

#[derive(Debug, Clone, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// pending, running, stopped, terminated, ...
    pub state: String,
    pub tags: BTreeMap<String, String>,
    pub image_id: Option<String>,
    pub key_name: Option<String>,
    /// The user data, base64-decoded.
    pub user_data: Option<String>,
    /// `MetadataOptions.HttpTokens`: `required` is IMDSv2 only.
    pub http_tokens: Option<String>,
}

/// One request moto recorded.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordedRequest {
    pub action: String,
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyPairInfo {
    pub name: String,
    pub id: Option<String>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SecurityGroupInfo {
    pub id: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub id: String,
    pub name: Option<String>,
    pub state: Option<String>,
    pub tags: BTreeMap<String, String>,
    /// `v2.0`: instances launched from it are IMDSv2-only.
    pub imds_support: Option<String>,
    pub snapshot_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub state: Option<String>,
    /// `Created by CreateImage(i-…) for ami-…` for an image's snapshot, `Copied for
    /// DestinationAmi ami-… from SourceAmi ami-…` for a copy's.
    pub description: Option<String>,
    #[serde(default)]
    pub encrypted: bool,
    /// The key's ARN, when encrypted.
    #[serde(default)]
    pub kms_key_id: Option<String>,
}

/// EC2 state of one region at one moment. Images and snapshots are this account's
/// (`Owners=self`); note that moto counts the ~1300 snapshots of its built-in AMIs as
/// this account's: compare snapshots by tag or against an earlier snapshot.
#[derive(Debug, Clone, Deserialize)]
pub struct Resources {
    pub instances: Vec<InstanceInfo>,
    pub key_pairs: Vec<KeyPairInfo>,
    /// Without the `default` groups.
    pub security_groups: Vec<SecurityGroupInfo>,
    pub images: Vec<ImageInfo>,
    pub snapshots: Vec<SnapshotInfo>,
}

impl Resources {
    /// Instances not terminated (or shutting down).
    pub fn live_instances(&self) -> Vec<&InstanceInfo> {
        self.instances
            .iter()
            .filter(|i| i.state != "terminated" && i.state != "shutting-down")
            .collect()
    }

    /// `kind id` of every still-alive resource tagged `jbake:build-id` = `build_id`
    /// (instances not terminated, key pairs, security groups, images not
    /// deregistered, snapshots): empty when a build cleaned up after itself.
    pub fn tagged_with_build(&self, build_id: &str) -> Vec<String> {
        let tagged = |tags: &BTreeMap<String, String>| {
            tags.get(BUILD_TAG).map(String::as_str) == Some(build_id)
        };
        let mut found = Vec::new();
        for i in self.live_instances() {
            if tagged(&i.tags) {
                found.push(format!("instance {}", i.id));
            }
        }
        for k in &self.key_pairs {
            if tagged(&k.tags) {
                found.push(format!("key-pair {}", k.name));
            }
        }
        for g in &self.security_groups {
            if tagged(&g.tags) {
                found.push(format!("security-group {} ({})", g.id, g.name));
            }
        }
        for im in &self.images {
            if tagged(&im.tags) && im.state.as_deref() != Some("deregistered") {
                found.push(format!("image {}", im.id));
            }
        }
        for s in &self.snapshots {
            if tagged(&s.tags) {
                found.push(format!("snapshot {}", s.id));
            }
        }
        found
    }

    /// What builds must not leave, as `kind id` lines (empty when clean): instances not
    /// terminated, key pairs and security groups, images not complete (`jbake:complete` not
    /// `true`, deregistered ones aside), and snapshots that no registered complete image uses.
    /// Of `build_id`'s resources only, or of every build (anything tagged `jbake:build-id`, or
    /// named `jbake-…`) with `None`. A complete image and its snapshots are a build's result.
    pub fn leftovers_of(&self, build_id: Option<&str>) -> Vec<String> {
        let ours = |tags: &BTreeMap<String, String>| match build_id {
            Some(id) => tags.get(BUILD_TAG).map(String::as_str) == Some(id),
            None => tags.contains_key(BUILD_TAG),
        };
        let mut left = Vec::new();
        for i in self.live_instances() {
            if ours(&i.tags) {
                left.push(format!("instance {} ({})", i.id, i.state));
            }
        }
        for k in &self.key_pairs {
            if ours(&k.tags) || (build_id.is_none() && k.name.starts_with("jbake-")) {
                left.push(format!("key-pair {}", k.name));
            }
        }
        for g in &self.security_groups {
            if ours(&g.tags) || (build_id.is_none() && g.name.starts_with("jbake-")) {
                left.push(format!("security-group {} ({})", g.id, g.name));
            }
        }
        let complete = |i: &ImageInfo| {
            i.tags.get("jbake:complete").map(String::as_str) == Some("true")
                && i.state.as_deref() != Some("deregistered")
        };
        for im in &self.images {
            if ours(&im.tags) && !complete(im) && im.state.as_deref() != Some("deregistered") {
                left.push(format!("image {} ({:?})", im.id, im.state));
            }
        }
        let used: Vec<&String> = self
            .images
            .iter()
            .filter(|i| complete(i))
            .flat_map(|i| i.snapshot_ids.iter())
            .collect();
        for s in &self.snapshots {
            if ours(&s.tags) && !used.contains(&&s.id) {
                left.push(format!("snapshot {} ({:?})", s.id, s.description));
            }
        }
        left
    }

    /// Key pairs whose name starts with `jbake-`.
    pub fn jbake_key_pairs(&self) -> Vec<&KeyPairInfo> {
        self.key_pairs
            .iter()
            .filter(|k| k.name.starts_with("jbake-"))
            .collect()
    }

    /// Security groups whose name starts with `jbake-`.
    pub fn jbake_security_groups(&self) -> Vec<&SecurityGroupInfo> {
        self.security_groups
            .iter()
            .filter(|g| g.name.starts_with("jbake-"))
            .collect()
    }
}

// ---------------------------------------------------------------- fault proxy

/// One request the [`FaultProxy`] saw.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProxyLogEntry {
    /// The API action ("" when the request had none).
    pub action: String,
    /// The region of the request (its SigV4 credential scope).
    #[serde(default)]
    pub region: String,
    /// True when the proxy answered with an error or dropped the connection.
    pub fault: bool,
    /// The realistic world's fault (`throttle`, `not_found`, `dependency`, `lost`), if any.
    #[serde(default)]
    pub world: Option<String>,
}

/// A reverse proxy in front of moto that injects faults (`fault_proxy.py`); killed by
/// PID on drop. Point clients at [`endpoint`](Self::endpoint), e.g. with
/// `moto.env_with(&proxy.endpoint(), "testing", "testing")`.
pub struct FaultProxy {
    port: u16,
    child: Child,
}

impl FaultProxy {
    /// Starts the proxy on a free 127.0.0.1 port, forwarding to `upstream_endpoint`.
    pub fn start(upstream_endpoint: &str) -> FaultProxy {
        let mut child = super::command("python3")
            .arg(helper("fault_proxy.py"))
            .arg(upstream_endpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 fault_proxy.py");
        let stdout = child.stdout.take().expect("fault proxy stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let Some(port) = line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.trim().parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fault_proxy.py did not start (it printed {line:?}; its stderr is above)");
        };
        FaultProxy { port, child }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Replaces the rules: a JSON list of `{"action", "status", "code", "message",
    /// "times", "delay_ms", "drop"}` (see fault_proxy.py). `"[]"` forwards everything.
    pub fn set(&self, rules_json: &str) {
        match http(
            self.port,
            "POST",
            "/__fault__/rules",
            "application/json",
            rules_json,
        ) {
            Ok((200, _)) => {}
            other => panic!("fault proxy: setting rules {rules_json}: {other:?}"),
        }
    }

    /// Turns the realistic AWS on (a JSON object, see fault_proxy.py: NotFound after create,
    /// pending/stopping/shutting-down/image pending in scaled seconds, throttling bursts, lost
    /// answers, ...) or off (`"null"`). Rules set with [`set`](Self::set) still apply first.
    pub fn world(&self, config_json: &str) {
        match http(
            self.port,
            "POST",
            "/__fault__/world",
            "application/json",
            config_json,
        ) {
            Ok((200, _)) => {}
            other => panic!("fault proxy: setting the world {config_json}: {other:?}"),
        }
    }

    /// What the realistic world injected so far, by kind (`throttle`, `not_found`, `lost`,
    /// `dependency`, `hidden`, `pending`, `stopping`, `shutting-down`, `image_pending`,
    /// `snapshot_pending`); empty when it is off.
    pub fn world_stats(&self) -> BTreeMap<String, u64> {
        match http(self.port, "GET", "/__fault__/world", "text/plain", "") {
            Ok((200, text)) => serde_json::from_str::<Option<BTreeMap<String, u64>>>(&text)
                .unwrap_or_else(|e| panic!("fault proxy world stats are not JSON ({e}): {text}"))
                .unwrap_or_default(),
            other => panic!("fault proxy: reading the world stats: {other:?}"),
        }
    }

    /// Lets the requests held by rules with `"hold": KEY` go on (and any such request that
    /// comes later).
    pub fn release(&self, key: &str) {
        let body = serde_json::json!({ "hold": key }).to_string();
        match http(
            self.port,
            "POST",
            "/__fault__/release",
            "application/json",
            &body,
        ) {
            Ok((200, _)) => {}
            other => panic!("fault proxy: releasing {key}: {other:?}"),
        }
    }

    /// Every request seen so far, in order.
    pub fn log(&self) -> Vec<ProxyLogEntry> {
        match http(self.port, "GET", "/__fault__/log", "text/plain", "") {
            Ok((200, text)) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("fault proxy log is not JSON ({e}): {text}")),
            other => panic!("fault proxy: reading the log: {other:?}"),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----------------------------------------------------------------- cloud-init

/// An instance [`CloudInit`] has served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub instance_id: String,
    /// The host key installed from the user data: `ssh-ed25519 AAAA…`.
    pub host_public_key: String,
    /// The AMI it was launched from.
    pub image_id: String,
    /// For an instance launched from an image made by CreateImage of an instance this stand-in
    /// served: the nspawn machine booted from that image's archive (its name), else `None` (the
    /// instance was served into the machine the stand-in was given).
    pub booted: Option<String>,
}

/// What cloud-init needs from one launched instance (or that it is gone).
#[derive(Debug, Deserialize)]
struct Launched {
    /// `launched` or `terminated`.
    #[serde(default)]
    event: Option<String>,
    instance_id: String,
    #[serde(default)]
    image_id: Option<String>,
    /// The instance CreateImage made `image_id` from, if it did.
    #[serde(default)]
    source_instance: Option<String>,
    public_key: Option<String>,
    user_data: Option<String>,
}

/// Where the keys go.
enum Target {
    Sshd(SshdReload),
    Instance {
        name: String,
        user: String,
        /// The body of the harness's own login key on the machine (a real base AMI does not
        /// have it): taken off before its disk becomes an image.
        harness_key: Option<String>,
    },
}

/// A machine the stand-in booted from an image, for an instance launched from that image.
#[derive(Debug, Clone)]
struct Booted {
    instance_id: String,
    name: String,
    down: bool,
}

/// The state the watcher thread and the test share.
#[derive(Default)]
struct Shared {
    served: Vec<Served>,
    errors: Vec<String>,
    /// Fault proxies told when an instance is served ([`CloudInit::report_to`]).
    report: Vec<u16>,
    /// AMI → its root file system (`.tar.zst`).
    images: BTreeMap<String, PathBuf>,
    booted: Vec<Booted>,
}

/// Plays cloud-init for the instances launched in moto, and EC2's part for the images made
/// from them: a background watcher (`awsctl.py watch`, polling every 100 ms) reports every new
/// running instance.
///
/// - An instance launched from a base image: the user data's `ssh_keys.ed25519_private`
///   becomes the host key of the stand-in server (the quick-tier sshd or the nspawn machine
///   the stand-in was given) and the instance's key pair public key is authorized for its login
///   user, then sshd reloads.
/// - An instance launched from an image CreateImage made of an instance served into the
///   nspawn machine (the boot test's test instance, `jbake test`): that machine is stopped and
///   its root file system archived (once per image: what EC2 snapshots), and a new machine
///   boots from the archive as EC2 boots an AMI (`scripts/instance up --first-boot`: the
///   image's own machine id and host keys, with the user data's host key and the key pair's
///   key installed as cloud-init would). Its address goes to the proxies of
///   [`report_to`](CloudInit::report_to), which show it as the instance's IP. When the
///   instance is terminated, the machine is powered off and removed. Images archived elsewhere
///   can be given with [`add_image`](CloudInit::add_image).
///
/// Stops (watcher killed by PID, the machines it booted removed) on drop.
pub struct CloudInit {
    watcher: Child,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The archives of the images it made (under /var/tmp: they are large).
    work: Arc<TempDir>,
}

impl CloudInit {
    /// Serves instances into the quick-tier `sshd` (for its user `jbake-test`).
    /// After the first one, connect with the key pair's private key and a known_hosts
    /// pinned to the user-data host key ([`Served::host_public_key`]); the
    /// `Sshd::known_hosts` file is rewritten with it, but `Sshd::host_key` keeps the
    /// key it started with.
    pub fn for_sshd(moto: &Moto, sshd: &mut Sshd) -> CloudInit {
        Self::start(moto, None, Target::Sshd(sshd.reload_handle()))
    }

    /// Serves instances into a booted nspawn [`Instance`] (for its login user): the
    /// user-data key becomes its only host key (`Instance::host_key` and
    /// `Instance::known_hosts` keep the old one; use [`Served::host_public_key`]). Instances
    /// of images made from it boot machines of their own.
    pub fn for_instance(moto: &Moto, instance: &Instance) -> CloudInit {
        Self::start(moto, None, Self::target(instance))
    }

    fn target(instance: &Instance) -> Target {
        let harness_key = fs::read_to_string(format!("{}.pub", instance.identity.display()))
            .ok()
            .and_then(|k| k.split_whitespace().nth(1).map(str::to_string));
        Target::Instance {
            name: instance.name.clone(),
            user: instance.user.clone(),
            harness_key,
        }
    }

    /// Serves only instances tagged with `jbake:build-id` (any value), and into `sshd`.
    pub fn for_sshd_tagged(moto: &Moto, sshd: &mut Sshd) -> CloudInit {
        Self::start(moto, Some(BUILD_TAG), Target::Sshd(sshd.reload_handle()))
    }

    /// [`for_instance`](Self::for_instance), serving only instances of `instance_type`: two
    /// builds at once (`--instance-type` told apart) each get their own machine.
    pub fn for_instance_of_type(
        moto: &Moto,
        instance: &Instance,
        instance_type: &str,
    ) -> CloudInit {
        Self::start_filtered(moto, None, Some(instance_type), Self::target(instance))
    }

    /// From now on every instance served is reported to `proxy` (POST /__fault__/ready), whose
    /// realistic world (`"pending_until_ready": true`) shows it `pending` until then: like EC2,
    /// where sshd answers with the user-data host key only once cloud-init installed it. A
    /// machine booted for an instance is given to it as the instance's address first.
    pub fn report_to(&self, proxy: &FaultProxy) {
        let mut s = self.lock();
        if !s.report.contains(&proxy.port) {
            s.report.push(proxy.port);
        }
    }

    /// Boot instances launched from `ami` from this archive (an image made earlier, by another
    /// stand-in, or by the test itself).
    pub fn add_image(&self, ami: &str, archive: &Path) {
        self.lock()
            .images
            .insert(ami.to_string(), archive.to_path_buf());
    }

    /// The archive of `ami`'s root file system, if the stand-in made or was given one.
    pub fn image_archive(&self, ami: &str) -> Option<PathBuf> {
        self.lock().images.get(ami).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(moto: &Moto, tag_key: Option<&str>, target: Target) -> CloudInit {
        Self::start_filtered(moto, tag_key, None, target)
    }

    fn start_filtered(
        moto: &Moto,
        tag_key: Option<&str>,
        instance_type: Option<&str>,
        target: Target,
    ) -> CloudInit {
        let (key, secret) = moto.creds.lock().expect("creds lock").clone();
        let mut cmd = super::command("python3");
        cmd.arg(helper("awsctl.py"))
            .arg("watch")
            .arg(
                serde_json::json!({
                    "tag_key": tag_key,
                    "instance_type": instance_type,
                    "region": REGION,
                    "interval": 0.1,
                })
                .to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        apply(&mut cmd, &moto.env_with(&moto.endpoint(), &key, &secret));
        let mut watcher = cmd.spawn().expect("spawn python3 awsctl.py watch");
        let stdout = watcher.stdout.take().expect("watcher stdout");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(
            tempfile::Builder::new()
                .prefix("jbake-images-")
                .tempdir_in("/var/tmp")
                .expect("create the image archive folder"),
        );
        let thread = {
            let (shared, stop, work) = (shared.clone(), stop.clone(), work.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let launched = match serde_json::from_str::<Launched>(&line) {
                        Ok(l) => l,
                        Err(e) => {
                            let e = format!("watcher printed {line:?}: {e}");
                            eprintln!("CloudInit: {e}");
                            lock(&shared).errors.push(e);
                            continue;
                        }
                    };
                    if launched.event.as_deref() == Some("terminated") {
                        power_off(&shared, &launched.instance_id);
                        continue;
                    }
                    match handle(&target, &shared, work.path(), &launched) {
                        Ok((s, address)) => {
                            let ports = lock(&shared).report.clone();
                            let id = serde_json::json!({ "instance_id": s.instance_id });
                            for port in ports {
                                if let Some(ip) = &address {
                                    let body = serde_json::json!({
                                        "instance_id": s.instance_id,
                                        "ip": ip,
                                    });
                                    let _ = http(
                                        port,
                                        "POST",
                                        "/__fault__/address",
                                        "application/json",
                                        &body.to_string(),
                                    );
                                }
                                let _ = http(
                                    port,
                                    "POST",
                                    "/__fault__/ready",
                                    "application/json",
                                    &id.to_string(),
                                );
                            }
                            lock(&shared).served.push(s)
                        }
                        Err(e) => {
                            eprintln!("CloudInit: {e}");
                            lock(&shared).errors.push(e);
                        }
                    }
                }
            })
        };
        CloudInit {
            watcher,
            shared,
            stop,
            thread: Some(thread),
            work,
        }
    }

    /// The instances served so far, in order.
    pub fn served(&self) -> Vec<Served> {
        self.lock().served.clone()
    }

    /// Instances that could not be served (no user data, no key pair, ...).
    pub fn errors(&self) -> Vec<String> {
        self.lock().errors.clone()
    }

    /// The machines booted for instances of images and not removed yet: `(instance id, name)`.
    pub fn booted_running(&self) -> Vec<(String, String)> {
        self.lock()
            .booted
            .iter()
            .filter(|b| !b.down)
            .map(|b| (b.instance_id.clone(), b.name.clone()))
            .collect()
    }

    /// Waits until at least one instance is served; returns the last one served.
    pub fn wait_served(&self, timeout: Duration) -> Served {
        self.wait_served_n(1, timeout)
    }

    /// Waits until at least `n` instances are served; returns the last one served.
    pub fn wait_served_n(&self, n: usize, timeout: Duration) -> Served {
        let start = Instant::now();
        loop {
            let served = self.served();
            if served.len() >= n {
                if let Some(s) = served.last() {
                    return s.clone();
                }
            }
            assert!(
                start.elapsed() < timeout,
                "CloudInit served {} of {n} instances within {timeout:?}; errors: {:?}",
                served.len(),
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for CloudInit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.watcher.kill();
        let _ = self.watcher.wait();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join(); // its stdout is closed now: the loop ends
        }
        let left: Vec<Booted> = self
            .lock()
            .booted
            .iter()
            .filter(|b| !b.down)
            .cloned()
            .collect();
        for b in left {
            down(&b.name);
        }
        let _ = &self.work;
    }
}

/// `scripts/instance down NAME`, reporting a failure.
fn down(name: &str) {
    match super::command(super::instance::script())
        .args(["down", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        other => eprintln!("CloudInit: scripts/instance down {name}: {other:?}"),
    }
}

/// The instance is terminated: the machine booted for it goes.
fn power_off(shared: &Mutex<Shared>, instance_id: &str) {
    let name = {
        let mut s = lock(shared);
        let Some(b) = s
            .booted
            .iter_mut()
            .find(|b| b.instance_id == instance_id && !b.down)
        else {
            return;
        };
        b.down = true;
        b.name.clone()
    };
    down(&name);
}

/// Serves one launched instance; returns it and, for a machine booted for it, its address.
fn handle(
    target: &Target,
    shared: &Mutex<Shared>,
    work: &Path,
    launched: &Launched,
) -> Result<(Served, Option<String>), String> {
    let image_id = launched.image_id.clone().unwrap_or_default();
    if let Some(archive) = archive_for(target, shared, work, launched)? {
        if !matches!(target, Target::Instance { .. }) {
            return Err(format!(
                "{}: instances of images are booted on the instance tier only",
                launched.instance_id
            ));
        }
        let (name, host, host_public_key) = boot(work, &archive, launched)?;
        lock(shared).booted.push(Booted {
            instance_id: launched.instance_id.clone(),
            name: name.clone(),
            down: false,
        });
        return Ok((
            Served {
                instance_id: launched.instance_id.clone(),
                host_public_key,
                image_id,
                booted: Some(name),
            },
            Some(host),
        ));
    }
    serve(target, launched).map(|s| (s, None))
}

/// The archive to boot `launched` from: the image's, made now from the machine its source
/// instance was served into if there is none yet; `None` for a base image.
fn archive_for(
    target: &Target,
    shared: &Mutex<Shared>,
    work: &Path,
    launched: &Launched,
) -> Result<Option<PathBuf>, String> {
    let Some(ami) = &launched.image_id else {
        return Ok(None);
    };
    if let Some(path) = lock(shared).images.get(ami) {
        return Ok(Some(path.clone()));
    }
    let Some(source) = &launched.source_instance else {
        return Ok(None);
    };
    let served_here = lock(shared)
        .served
        .iter()
        .any(|s| &s.instance_id == source && s.booted.is_none());
    if !served_here {
        return Ok(None);
    }
    let Target::Instance {
        name,
        user,
        harness_key,
    } = target
    else {
        return Err(format!(
            "{ami} was made from {source}, which was served into the quick-tier sshd: only an nspawn machine can become an image"
        ));
    };
    let archive = work.join(format!("{ami}.tar.zst"));
    snapshot(name, user, harness_key.as_deref(), &archive)?;
    lock(shared).images.insert(ami.clone(), archive.clone());
    Ok(Some(archive))
}

fn instance_script(args: &[&str]) -> Result<std::process::Output, String> {
    super::command(super::instance::script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run scripts/instance {}: {e}", args.join(" ")))
}

fn checked(args: &[&str]) -> Result<String, String> {
    let out = instance_script(args)?;
    if !out.status.success() {
        return Err(format!(
            "scripts/instance {} failed: {}{}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// What EC2 does at CreateImage of a stopped instance: the machine is powered off (if jbake's
/// StopInstances has not been played yet) and its root file system archived. The harness's own
/// login key, which a real base AMI does not have, is taken off first.
fn snapshot(
    name: &str,
    user: &str,
    harness_key: Option<&str>,
    archive: &Path,
) -> Result<(), String> {
    let t = Instant::now();
    if let Some(key) = harness_key {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let script = format!(
            "f=$(getent passwd {u} | cut -d: -f6)/.ssh/authorized_keys\n\
             [ -f \"$f\" ] || exit 0\n\
             grep -vF {k} \"$f\" > \"$f.jbake-harness\" || true\n\
             cat \"$f.jbake-harness\" > \"$f\"; rm -f \"$f.jbake-harness\"\n",
            u = quote(user),
            k = quote(key)
        );
        // Only while it still runs (it may be stopped already).
        let _ = instance_script(&["exec", name, "--", "sh", "-c", &script]);
    }
    checked(&["stop", name])?;
    let path = archive.to_str().ok_or("archive path is not UTF-8")?;
    checked(&["snapshot", name, path])?;
    eprintln!(
        "CloudInit: {name} stopped and archived to {} in {:.1?} ({} MB)",
        archive.display(),
        t.elapsed(),
        fs::metadata(archive)
            .map(|m| m.len() / 1_000_000)
            .unwrap_or(0)
    );
    Ok(())
}

/// Boots a machine from `archive` for `launched`, with what cloud-init would install from its
/// user data and key pair; returns its name, address and host key. Does not wait for sshd.
fn boot(
    work: &Path,
    archive: &Path,
    launched: &Launched,
) -> Result<(String, String, String), String> {
    let id = &launched.instance_id;
    let user_data = launched
        .user_data
        .as_deref()
        .ok_or_else(|| format!("{id}: no user data"))?;
    let (private, _) = user_data_host_key(user_data)
        .ok_or_else(|| format!("{id}: no ssh_keys.ed25519_private in the user data"))?;
    let key_file = work.join(format!("{id}.host-key"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)
            .map_err(|e| format!("write {}: {e}", key_file.display()))?;
        f.write_all(private.as_bytes())
            .map_err(|e| format!("write {}: {e}", key_file.display()))?;
    }
    let name = super::instance::unique_name("tst");
    let key_path = key_file.to_str().ok_or("key path is not UTF-8")?;
    let archive_path = archive.to_str().ok_or("archive path is not UTF-8")?;
    let mut args = vec![
        "up",
        &name,
        "--first-boot",
        "--image",
        archive_path,
        "--host-key",
        key_path,
    ];
    let client = launched.public_key.as_deref().map(str::trim);
    if let Some(key) = client {
        args.extend(["--authorized-key", key]);
    }
    let t = Instant::now();
    let env = checked(&args);
    let _ = fs::remove_file(&key_file);
    let env = env?;
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
            .ok_or_else(|| format!("scripts/instance up printed no {k}="))
    };
    let host = get("HOST")?;
    let host_key = get("HOST_KEY")?;
    eprintln!(
        "CloudInit: {id} ({}) boots as {name} at {host} from {} ({:.1?})",
        launched.image_id.as_deref().unwrap_or("?"),
        archive.display(),
        t.elapsed()
    );
    Ok((name, host, host_key))
}

/// The ed25519 host key pair in a cloud-config's `ssh_keys:` (as jbake writes it:
/// `ed25519_private: |` with the PEM indented below, `ed25519_public: ssh-ed25519 …`).
pub fn user_data_host_key(cloud_config: &str) -> Option<(String, String)> {
    let mut private = String::new();
    let mut public = None;
    let mut lines = cloud_config.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("ed25519_private:") {
            let indent = line.len() - trimmed.len();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if next.trim().is_empty() || next_indent <= indent {
                    break;
                }
                private.push_str(next.trim());
                private.push('\n');
                lines.next();
            }
        } else if let Some(rest) = trimmed.strip_prefix("ed25519_public:") {
            public = Some(rest.trim().to_string());
        }
    }
    if private.contains("PRIVATE KEY") {
        Some((private, public.unwrap_or_default()))
    } else {
        None
    }
}

fn serve(target: &Target, launched: &Launched) -> Result<Served, String> {
    let id = &launched.instance_id;
    let user_data = launched
        .user_data
        .as_deref()
        .ok_or_else(|| format!("{id}: no user data"))?;
    let (private, _) = user_data_host_key(user_data)
        .ok_or_else(|| format!("{id}: no ssh_keys.ed25519_private in the user data"))?;
    let client_key = launched.public_key.as_deref().map(str::trim);
    let host_public_key = match target {
        Target::Sshd(sshd) => {
            let public = sshd.write_host_key(&private);
            if let Some(key) = client_key {
                sshd.authorize(key);
            }
            sshd.reload();
            public
        }
        Target::Instance { name, user, .. } => serve_instance(name, user, &private, client_key)?,
    };
    Ok(Served {
        instance_id: id.clone(),
        host_public_key,
        image_id: launched.image_id.clone().unwrap_or_default(),
        booted: None,
    })
}

/// Installs the host key (as the only one, like `ssh_deletekeys: true` with
/// `ssh_genkeytypes: []`) and the authorized key in a booted nspawn instance (through
/// `scripts/instance exec`, as root), reloads its sshd and waits until it answers with
/// the new host key (SIGHUP closes the listener for a moment: an ssh right after it
/// would be refused).
fn serve_instance(
    name: &str,
    user: &str,
    private: &str,
    client_key: Option<&str>,
) -> Result<String, String> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut script = format!(
        "set -e\numask 077\nrm -f /etc/ssh/ssh_host_*\n\
         printf '%s\\n' {pem} > /etc/ssh/ssh_host_ed25519_key\n\
         ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key > /etc/ssh/ssh_host_ed25519_key.pub\n\
         chmod 0644 /etc/ssh/ssh_host_ed25519_key.pub\n",
        pem = quote(private.trim_end())
    );
    if let Some(key) = client_key {
        script.push_str(&format!(
            "home=$(getent passwd {u} | cut -d: -f6)\nmkdir -p \"$home/.ssh\"\n\
             printf '%s\\n' {k} >> \"$home/.ssh/authorized_keys\"\n\
             chown -R {u}: \"$home/.ssh\"\nchmod 0700 \"$home/.ssh\"\nchmod 0600 \"$home/.ssh/authorized_keys\"\n",
            u = quote(user),
            k = quote(key)
        ));
    }
    script.push_str(
        "systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || pkill -HUP -x sshd\n\
         pub=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)\n\
         i=0\n\
         until ssh-keyscan -T 2 -t ed25519 127.0.0.1 2>/dev/null | grep -qF \"$pub\"; do\n\
           i=$((i+1)); if [ $i -ge 150 ]; then echo 'sshd did not answer with the new host key' >&2; exit 1; fi\n\
           sleep 0.1\n\
         done\n\
         cat /etc/ssh/ssh_host_ed25519_key.pub\n",
    );
    let out = super::command(super::instance::script())
        .args(["exec", name, "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run scripts/instance exec: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "installing the keys in {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let public = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    Ok(public)
}

/// `type base64` of an OpenSSH public key file, re-exported for tests.
pub fn public_key(path: &Path) -> String {
    sshd::public_key(path)
}
