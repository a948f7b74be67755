//! The AWS harness itself works against a real moto server: start/stop, the
//! recorder, resource snapshots, the fault proxy, IAM enforcement and the
//! cloud-init stand-in.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::instance::Instance;
use crate::support::moto::{self, CloudInit, FaultProxy, Moto};
use crate::support::prereq;
use crate::support::sshd::{self, Sshd};

/// Runs a boto3 script with `env` (a `Moto::env*`); `ec2`, `ssm` clients are ready,
/// retries off so that one injected fault is one error.
fn boto(env: &[(String, String)], script: &str) -> Output {
    let prelude = "import boto3, botocore.config, json, sys\n\
        cfg = botocore.config.Config(retries={'total_max_attempts': 1, 'mode': 'standard'}, connect_timeout=5, read_timeout=60)\n\
        ec2 = boto3.client('ec2', config=cfg)\nssm = boto3.client('ssm', config=cfg)\n";
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(format!("{prelude}{script}"))
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("run python3")
}

fn boto_ok(env: &[(String, String)], script: &str) -> String {
    let out = boto(env, script);
    assert!(
        out.status.success(),
        "boto3 script failed:\n{script}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "jbake-harness-aws",
            "-f",
        ])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    sshd::public_key(&path.with_extension("pub"))
}

/// Imports a key pair (`DIR/client`) and launches an instance with user data shaped
/// like src/bake/cloud_init.rs's (host key `DIR/host`); returns the instance id and
/// the host public key.
fn launch_like_jbake(moto: &Moto, dir: &Path) -> (String, String) {
    let host_pub = keygen(&dir.join("host"));
    let client_pub = keygen(&dir.join("client"));
    let host_private = std::fs::read_to_string(dir.join("host")).expect("read the host key");
    let mut block = String::new();
    for line in host_private.lines() {
        block.push_str("    ");
        block.push_str(line);
        block.push('\n');
    }
    let user_data = format!(
        "#cloud-config\nssh_deletekeys: true\nssh_genkeytypes: []\nssh_keys:\n  ed25519_private: |\n{block}  ed25519_public: {host_pub}\n\
         bootcmd:\n  - [sh, -c, \"shutdown -h +60 'jbake: build TTL expired' || true\"]\n"
    );
    let id = boto_ok(
        &moto.env(),
        &format!(
            "ec2.import_key_pair(KeyName='jbake-k', PublicKeyMaterial={client_pub:?}.encode())\n\
             img = ec2.describe_images(Owners=['137112412989'])['Images'][0]['ImageId']\n\
             r = ec2.run_instances(ImageId=img, MinCount=1, MaxCount=1, KeyName='jbake-k', UserData={user_data:?},\n\
                 TagSpecifications=[{{'ResourceType': 'instance', 'Tags': [{{'Key': 'jbake:build-id', 'Value': 'b-2'}}]}}])\n\
             print(r['Instances'][0]['InstanceId'])"
        ),
    );
    (id, host_pub)
}

/// `ssh -i DIR/client` with a known_hosts that pins `host_pub` only.
fn ssh_pinned(dir: &Path, user: &str, host: &str, port: u16, host_pub: &str) -> Output {
    let known_hosts = dir.join("known_hosts");
    let name = if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    };
    std::fs::write(&known_hosts, format!("{name} {host_pub}\n")).expect("write known_hosts");
    Command::new("ssh")
        .arg("-i")
        .arg(dir.join("client"))
        .args(["-p", &port.to_string()])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
        ])
        .arg(format!("{user}@{host}"))
        .arg("sudo -n id -u")
        .stdin(Stdio::null())
        .output()
        .expect("run ssh")
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn harness_aws_moto_starts_answers_and_stops_on_drop() {
    if !prereq::moto() {
        return;
    }
    let started = Instant::now();
    let moto = Moto::start();
    eprintln!("moto started in {:?}", started.elapsed());
    let pid = moto.pid();
    assert!(alive(pid));
    assert!(moto.endpoint().starts_with("http://127.0.0.1:"));
    let env = moto.env();
    for key in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        assert!(env.iter().any(|(k, _)| k == key), "env() lacks {key}");
    }
    let images = boto_ok(&env, "print(len(ec2.describe_images()['Images']))");
    assert!(
        images.parse::<usize>().expect("a count") > 100,
        "built-in AMIs: {images}"
    );
    drop(moto);
    assert!(!alive(pid), "moto (pid {pid}) still runs after drop");
}

#[test]
fn harness_aws_recorder_sees_query_and_json_protocol_actions() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    boto_ok(&moto.env(), "ec2.describe_regions()"); // before: not recorded
    moto.start_recording();
    boto_ok(&moto.env(), "ec2.describe_images(Owners=['self'])");
    moto.put_parameter("/jbake/test/x", "1", true); // SSM: JSON protocol (X-Amz-Target)
    moto.stop_recording();
    boto_ok(&moto.env(), "ec2.describe_vpcs()"); // after: not recorded
    assert_eq!(
        moto.recorded_actions(),
        vec!["DescribeImages".to_string(), "PutParameter".to_string()]
    );
    moto.start_recording(); // starts from an empty recording
    moto.stop_recording();
    assert!(moto.recorded_actions().is_empty());
}

#[test]
fn harness_aws_resources_list_tagged_instance_key_pair_group_and_image() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let dir = tempfile::tempdir().expect("temp folder");
    let client_pub = keygen(&dir.path().join("id"));
    let base = moto.create_image_fixture("jbake-base-fixture", &[("purpose", "base")]);
    let script = format!(
        "tags = lambda rt: [{{'ResourceType': rt, 'Tags': [{{'Key': 'jbake:build-id', 'Value': 'b-1'}}]}}]\n\
         ec2.import_key_pair(KeyName='jbake-b-1', PublicKeyMaterial={client_pub:?}.encode(), TagSpecifications=tags('key-pair'))\n\
         sg = ec2.create_security_group(GroupName='jbake-b-1', Description='x', TagSpecifications=tags('security-group'))['GroupId']\n\
         r = ec2.run_instances(ImageId='{base}', MinCount=1, MaxCount=1, KeyName='jbake-b-1', SecurityGroupIds=[sg],\n\
             UserData='#cloud-config\\nhello\\n', TagSpecifications=tags('instance'))\n\
         print(r['Instances'][0]['InstanceId'])"
    );
    let id = boto_ok(&moto.env(), &script);
    let started = Instant::now();
    let res = moto.resources(moto::REGION);
    eprintln!("resources() took {:?}", started.elapsed());
    let instance = res
        .instances
        .iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("{id} not in {:?}", res.instances));
    assert_eq!(instance.state, "running");
    assert_eq!(instance.image_id.as_deref(), Some(base.as_str()));
    assert_eq!(instance.key_name.as_deref(), Some("jbake-b-1"));
    assert_eq!(
        instance.user_data.as_deref(),
        Some("#cloud-config\nhello\n")
    );
    assert_eq!(
        instance.tags.get("jbake:build-id").map(String::as_str),
        Some("b-1")
    );
    assert_eq!(res.live_instances().len(), 1);
    assert_eq!(res.jbake_key_pairs().len(), 1);
    assert_eq!(res.jbake_security_groups().len(), 1);
    let image = res
        .images
        .iter()
        .find(|i| i.id == base)
        .expect("the fixture image");
    assert_eq!(image.tags.get("purpose").map(String::as_str), Some("base"));
    assert_eq!(image.snapshot_ids.len(), 1);
    let mut tagged = res.tagged_with_build("b-1");
    tagged.sort();
    assert_eq!(tagged.len(), 3, "{tagged:?}");
    assert!(tagged[0].starts_with("instance i-"), "{tagged:?}");
    assert_eq!(tagged[1], "key-pair jbake-b-1");
    assert!(tagged[2].starts_with("security-group sg-"), "{tagged:?}");
    assert!(res.tagged_with_build("other").is_empty());

    boto_ok(
        &moto.env(),
        &format!("ec2.terminate_instances(InstanceIds=['{id}'])"),
    );
    let res = moto.resources(moto::REGION);
    assert!(res.live_instances().is_empty());
    assert_eq!(res.tagged_with_build("b-1").len(), 2); // key pair and group remain
}

#[test]
fn harness_aws_fault_proxy_injects_once_then_forwards_and_drops() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    let env = moto.env_with(&proxy.endpoint(), "testing", "testing");
    proxy.set(
        r#"[{"action": "DescribeImages", "status": 500, "code": "InternalError",
             "message": "injected", "times": 1}]"#,
    );
    let script = "try:\n    ec2.describe_images(Owners=['self']); print('ok')\n\
                  except Exception as e:\n    print(e.response['Error']['Code'], e.response['ResponseMetadata']['HTTPStatusCode'])";
    assert_eq!(boto_ok(&env, script), "InternalError 500");
    assert_eq!(boto_ok(&env, script), "ok");
    boto_ok(&env, "ec2.describe_vpcs()");
    let log: Vec<(String, bool)> = proxy
        .log()
        .into_iter()
        .map(|e| (e.action, e.fault))
        .collect();
    assert_eq!(
        log,
        vec![
            ("DescribeImages".to_string(), true),
            ("DescribeImages".to_string(), false),
            ("DescribeVpcs".to_string(), false),
        ]
    );

    // drop: the connection closes without an answer.
    proxy.set(r#"[{"action": "RunInstances", "drop": true}]"#);
    let port: u16 = proxy
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("proxy port");
    let answer = moto::http(
        port,
        "POST",
        "/",
        "application/x-www-form-urlencoded",
        "Action=RunInstances&Version=2016-11-15",
    );
    assert!(
        answer.is_err(),
        "a dropped request got an answer: {answer:?}"
    );
    let out = boto(
        &env,
        "ec2.run_instances(ImageId='ami-x', MinCount=1, MaxCount=1)",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Connection"),
        "boto3 did not see a closed connection: {stderr}"
    );
    // An empty rule list forwards everything again.
    proxy.set("[]");
    boto_ok(&env, "ec2.describe_images(Owners=['self'])");
    let faults = proxy.log().iter().filter(|e| e.fault).count();
    assert_eq!(faults, 3, "{:?}", proxy.log());
    let pid = proxy.pid();
    drop(proxy);
    assert!(!alive(pid), "fault proxy (pid {pid}) still runs after drop");
}

#[test]
fn harness_aws_iam_auth_denies_outside_the_policy() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let (key, secret) = moto.iam_user(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["ec2:DescribeImages"], "Resource": "*"}]}"#,
    );
    moto.enable_iam_auth();
    let user = moto.env_with(&moto.endpoint(), &key, &secret);
    let call = |env: &[(String, String)], method: &str| {
        boto_ok(
            env,
            &format!(
                "try:\n    ec2.{method}(); print('ok')\n\
                 except Exception as e:\n    print(e.response['Error']['Code'])"
            ),
        )
    };
    assert_eq!(call(&user, "describe_images"), "ok");
    let denied = call(&user, "describe_instances");
    assert!(
        denied == "AccessDenied" || denied == "UnauthorizedOperation",
        "describe_instances outside the policy: {denied}"
    );
    let anonymous = call(&moto.env(), "describe_images");
    eprintln!("outside the policy: {denied}; unknown access key: {anonymous}");
    assert_ne!(anonymous, "ok", "testing creds pass");
    // The harness's own helpers keep working (as an admin user).
    assert!(moto.resources(moto::REGION).instances.is_empty());
    moto.disable_iam_auth();
    assert_eq!(call(&moto.env(), "describe_instances"), "ok");
}

#[test]
fn harness_aws_cloud_init_for_sshd_serves_user_data_host_key_and_key_pair() {
    if !(prereq::moto() && prereq::quick_tier()) {
        return;
    }
    let moto = Moto::start();
    let mut sshd = Sshd::start();
    let cloud = CloudInit::for_sshd(&moto, &mut sshd);
    let dir = tempfile::tempdir().expect("temp folder");
    let launched = Instant::now();
    let (id, host_pub) = launch_like_jbake(&moto, dir.path());
    let served = cloud.wait_served(Duration::from_secs(20));
    eprintln!("served {id} {:?} after RunInstances", launched.elapsed());
    assert_eq!(served.instance_id, id);
    assert_eq!(served.host_public_key, host_pub);
    assert!(cloud.errors().is_empty(), "{:?}", cloud.errors());

    let out = ssh_pinned(dir.path(), sshd.user(), "127.0.0.1", sshd.port(), &host_pub);
    assert!(
        out.status.success(),
        "ssh with the key pair and the user-data host key failed: {}\nsshd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    // The test's own identity still works, and Sshd::known_hosts now pins the new key.
    let out = sshd.ssh("true").output().expect("run ssh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cloud.served().len(), 1);
}

#[test]
fn harness_aws_cloud_init_for_instance_serves_user_data_host_key_and_key_pair() {
    if !(prereq::moto() && prereq::instance_tier()) {
        return;
    }
    let moto = Moto::start();
    let vm = Instance::builder("cloudinit").up();
    let cloud = CloudInit::for_instance(&moto, &vm);
    let dir = tempfile::tempdir().expect("temp folder");
    let launched = Instant::now();
    let (id, host_pub) = launch_like_jbake(&moto, dir.path());
    let served = cloud.wait_served(Duration::from_secs(30));
    eprintln!("served {id} {:?} after RunInstances", launched.elapsed());
    assert_eq!(served.instance_id, id);
    assert_eq!(served.host_public_key, host_pub);
    let out = ssh_pinned(dir.path(), &vm.user, &vm.host, vm.port, &host_pub);
    assert!(
        out.status.success(),
        "ssh to the instance with the key pair and the user-data host key failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[test]
fn harness_aws_the_realistic_world_behaves_like_ec2() {
    if !prereq::moto() {
        return;
    }
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    proxy.world(
        r#"{"not_found": 2, "hide_s": 30, "pending_s": 30, "stopping_s": 30, "shutting_down_s": 30,
            "image_pending_s": 30, "lose_once": ["CreateSecurityGroup"], "lose_how": ["500"],
            "throttle_every": 25, "throttle_burst": 2}"#,
    );
    let env = moto.env_with(&proxy.endpoint(), "testing", "testing");
    // boto3 with retries off: every refusal of the world is seen.
    let seen = boto_ok(
        &env,
        "out = {}\n\
         def code(f):\n    try:\n        f(); return 'ok'\n    except Exception as e:\n        return e.response['Error']['Code']\n\
         img = ec2.describe_images(Owners=['137112412989'])['Images'][0]['ImageId']\n\
         iid = ec2.run_instances(ImageId=img, MinCount=1, MaxCount=1)['Instances'][0]['InstanceId']\n\
         out['describe'] = [code(lambda: ec2.describe_instances(InstanceIds=[iid])) for _ in range(3)]\n\
         out['state'] = ec2.describe_instances(InstanceIds=[iid])['Reservations'][0]['Instances'][0]['State']['Name']\n\
         out['listed'] = any(i['InstanceId'] == iid for r in ec2.describe_instances()['Reservations'] for i in r['Instances'])\n\
         ec2.stop_instances(InstanceIds=[iid])\n\
         out['stopping'] = ec2.describe_instances(InstanceIds=[iid])['Reservations'][0]['Instances'][0]['State']['Name']\n\
         out['lost'] = code(lambda: ec2.create_security_group(GroupName='g', Description='d'))\n\
         ami = ec2.create_image(InstanceId=iid, Name='n-1')['ImageId']\n\
         out['image'] = [code(lambda: ec2.describe_images(ImageIds=[ami])) for _ in range(3)]\n\
         im = ec2.describe_images(ImageIds=[ami])['Images'][0]\n\
         out['image_state'] = im['State']\n\
         out['mappings'] = len(im.get('BlockDeviceMappings', []))\n\
         out['listed_snapshots'] = len(ec2.describe_snapshots(OwnerIds=['self'], Filters=[{'Name': 'description', 'Values': ['*' + ami + '*']}])['Snapshots'])\n\
         out['ami'] = ami\n\
         print(json.dumps(out))",
    );
    let seen: serde_json::Value = serde_json::from_str(&seen).expect("JSON");
    assert_eq!(
        seen["describe"],
        serde_json::json!([
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.NotFound",
            "ok"
        ]),
        "{seen}"
    );
    assert_eq!(seen["state"], "pending", "{seen}");
    assert_eq!(
        seen["listed"], false,
        "new instances are missing from lists: {seen}"
    );
    assert_eq!(seen["stopping"], "stopping", "{seen}");
    assert_eq!(seen["lost"], "InternalError", "{seen}");
    assert_eq!(
        seen["image"],
        serde_json::json!(["InvalidAMIID.NotFound", "InvalidAMIID.NotFound", "ok"]),
        "{seen}"
    );
    assert_eq!(seen["image_state"], "pending", "{seen}");
    assert_eq!(seen["mappings"], 0, "{seen}");
    // Its snapshot is missing from lists while the image is new, and pending with it.
    assert_eq!(seen["listed_snapshots"], 0, "{seen}");
    let ami = seen["ami"].as_str().expect("ami");
    let snapshot = moto
        .resources(moto::REGION)
        .snapshots
        .into_iter()
        .find(|s| s.description.as_deref().is_some_and(|d| d.contains(ami)))
        .expect("moto has the image's snapshot");
    let state = boto_ok(
        &env,
        &format!(
            "print(ec2.describe_snapshots(SnapshotIds=['{}'])['Snapshots'][0]['State'])",
            snapshot.id
        ),
    );
    assert_eq!(state, "pending");
    // The lost CreateSecurityGroup took effect; moto (the truth) has the group.
    let res = moto.resources(moto::REGION);
    assert!(
        res.security_groups.iter().any(|g| g.name == "g"),
        "{:?}",
        res.security_groups
    );
    let stats = proxy.world_stats();
    for kind in [
        "not_found",
        "pending",
        "hidden",
        "stopping",
        "lost",
        "image_pending",
        "snapshot_pending",
    ] {
        assert!(
            stats.get(kind).copied().unwrap_or(0) > 0,
            "{kind}: {stats:?}"
        );
    }
    // Throttling: with retries off, a burst is seen as HTTP 503 RequestLimitExceeded.
    let throttled = boto_ok(
        &env,
        "codes = []\n\
         for _ in range(30):\n    try:\n        ec2.describe_vpcs(); codes.append('ok')\n    except Exception as e:\n        codes.append(str(e.response['ResponseMetadata']['HTTPStatusCode']) + ' ' + e.response['Error']['Code'])\n\
         print(json.dumps(codes))",
    );
    assert!(
        throttled.contains("503 RequestLimitExceeded"),
        "{throttled}"
    );
    proxy.world("null");
    assert!(proxy.world_stats().is_empty());
}
