//! Stages launch, connect, provision, hygiene and stop: the build instance.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use russh::keys::PublicKeyBase64;

use crate::aws::ec2::{InstanceInfo, Launch};
use crate::aws::wait::{self, not_yet_visible};
use crate::aws::{self};
use crate::exec::{self, Executor};
use crate::progress::StepRow;
use crate::recipe::{Action, Origin, Phase, Plan, Step};
use crate::ssh::{ConnectOptions, HostKeyPolicy, Identity, Target};

use super::super::ledger::{Entry, Resource};
use super::super::{cloud_init, Error, SshInterface};
use super::access::{Group, Keys};
use super::base::Resolved;
use super::{settle, wait_for, Bake};

/// The running build instance.
pub struct Launched {
    pub id: String,
    pub entry: Entry,
    pub info: InstanceInfo,
}

pub async fn launch(
    b: &mut Bake,
    r: &Resolved,
    keys: &Keys,
    group: &Group,
) -> Result<Launched, Error> {
    let instance_type = b
        .opts
        .instance_type
        .clone()
        .unwrap_or_else(|| r.plan.instance.instance_type.clone());
    let ttl_minutes = b.opts.ttl.as_secs().div_ceil(60).max(1);
    let user_data = cloud_init::user_data(&keys.host, ttl_minutes).map_err(Error::Key)?;
    b.progress.info(
        "stage",
        &format!("launching a {instance_type} from {}", r.base.id),
    );
    let launch = Launch {
        image_id: r.base.id.clone(),
        instance_type: instance_type.clone(),
        key_name: keys.name.clone(),
        security_group_id: group.id.clone(),
        subnet_id: b.opts.subnet_id.clone(),
        iam_instance_profile: b.opts.iam_instance_profile.clone(),
        root_device: r
            .base
            .root_device
            .clone()
            .unwrap_or_else(|| "/dev/xvda".to_string()),
        volume_gb: i32::try_from(r.plan.instance.volume_gb).unwrap_or(i32::MAX),
        user_data,
        tags: r.tags_named(format!("jbake build {} {}", r.plan.name, b.build_id)),
        // The same token on every try: EC2 launches once, however often the call is repeated.
        client_token: format!("jbake-{}", b.build_id),
        // --kms-key-id for this region: the image's snapshots are encrypted with it.
        kms_key_id: b
            .opts
            .distribution
            .kms
            .for_region(&b.aws.region)
            .map(str::to_string),
    };
    run_instance(b, &launch).await
}

/// Launches `launch` (recorded in the ledger first, adopted by its client token after a lost
/// answer) and waits until it runs.
pub async fn run_instance(b: &mut Bake, launch: &Launch) -> Result<Launched, Error> {
    let group = &launch.security_group_id;
    // Recorded first: if the answer is lost, the undo finds the instance by the build's tag.
    let entry = b.ledger.record(Resource::Instance { id: None });
    let created = Instant::now();
    let aws = &b.aws;
    let launched = settle(
        &b.progress,
        &format!("security group {group} to be usable"),
        || async {
            match aws.ec2.run_instance(launch).await {
                Ok(id) => Ok(wait::Poll::Ready(Ok(id))),
                // The group was just made: EC2 may not know it everywhere yet.
                Err(e) if e.is_code("InvalidGroup.NotFound") && not_yet_visible(created) => {
                    Ok(wait::Poll::Pending("not visible yet".into()))
                }
                Err(e) => Ok(wait::Poll::Ready(Err(e))),
            }
        },
    )
    .await?;
    let id = match launched {
        Ok(id) => id,
        Err(e) => {
            if e.refused() {
                b.ledger.never_made(entry);
            }
            return Err(e.into());
        }
    };
    b.ledger.update(entry, |res| {
        *res = Resource::Instance {
            id: Some(id.clone()),
        }
    });
    b.progress
        .info("launched", &format!("instance {id} launched"));
    let (ledger, id_ref) = (&b.ledger, id.as_str());
    let info = wait_for(
        &b.progress,
        &format!("instance {id} to run"),
        Duration::from_secs(600),
        || async {
            let i = match aws.ec2.instance(id_ref).await {
                Ok(Some(i)) => i,
                Ok(None) => return Ok(wait::Poll::Pending("not visible yet".to_string())),
                Err(e) if e.is_not_found() && not_yet_visible(created) => {
                    return Ok(wait::Poll::Pending("not visible yet".to_string()))
                }
                Err(e) => return Err(e),
            };
            ledger.seen(entry);
            Ok(match i.state.as_str() {
                "running" => wait::Poll::Ready(Ok(i)),
                "pending" => wait::Poll::Pending(i.state),
                _ => wait::Poll::Ready(Err(i.state)),
            })
        },
    )
    .await?
    .map_err(|state| Error::InstanceGone {
        id: id.clone(),
        state,
    })?;
    Ok(Launched { id, entry, info })
}

/// Where and how to connect: the instance's IP (or `--ssh-host`), the build's client key, the
/// one-time host key pinned.
pub fn target(
    b: &Bake,
    r: &Resolved,
    keys: &Keys,
    launched: &Launched,
) -> Result<ConnectOptions, Error> {
    connect_options(
        b,
        &r.plan.base.ssh_user,
        keys,
        launched,
        b.opts.ssh_host.as_deref(),
    )
}

/// How to reach `launched` as `user` with `keys`: at `host` when given, else at the instance's
/// IP (`--ssh-interface`), through `--bastion` if there is one.
pub fn connect_options(
    b: &Bake,
    user: &str,
    keys: &Keys,
    launched: &Launched,
    host: Option<&str>,
) -> Result<ConnectOptions, Error> {
    let host = match (host, b.opts.ssh_interface) {
        (Some(h), _) => h.to_string(),
        (None, SshInterface::Public) => {
            launched
                .info
                .public_ip
                .clone()
                .ok_or_else(|| Error::NoAddress {
                    instance: launched.id.clone(),
                    interface: "public",
                    hint: "use --ssh-interface private (from inside the VPC), --bastion, or a subnet that assigns public IPs",
                })?
        }
        (None, SshInterface::Private) => {
            launched
                .info
                .private_ip
                .clone()
                .ok_or_else(|| Error::NoAddress {
                    instance: launched.id.clone(),
                    interface: "private",
                    hint: "EC2 has not given it one yet",
                })?
        }
    };
    Ok(ConnectOptions {
        target: Target {
            user: user.to_string(),
            host,
            port: b.opts.ssh_port,
        },
        identity: Identity::Key(keys.client.clone()),
        host_key: HostKeyPolicy::Pinned(keys.host.public_key().clone()),
        deadline: b.opts.connect_timeout,
        keepalive: Duration::from_secs(15),
        jump: b.opts.jump.clone(),
    })
}

/// The recipe's steps and checks.
/// The recipe's steps and checks, then its `facts:` (read on the machine, for the image's
/// tags). Returns the rows of all three and the facts.
pub async fn provision(
    ex: &mut Executor<'_>,
    plan: &Plan,
) -> Result<(Vec<StepRow>, Vec<(String, String)>), (exec::Error, exec::Report)> {
    let mut rows = ex.run_plan(plan).await?.rows;
    match ex.read_facts(&plan.facts).await {
        Ok((facts, report)) => {
            rows.extend(report.rows);
            Ok((rows, facts))
        }
        Err((e, mut report)) => {
            rows.append(&mut report.rows);
            report.rows = rows;
            Err((e, report))
        }
    }
}

/// Image hygiene, always, as the last thing on the machine.
pub async fn hygiene(
    ex: &mut Executor<'_>,
    plan: &Plan,
    keys: &Keys,
) -> Result<Vec<StepRow>, (exec::Error, exec::Report)> {
    let hygiene = Plan {
        steps: vec![internal_step(
            "Image hygiene",
            cloud_init::hygiene_script(
                &keys.client.public_key_base64(),
                &keys.host.public_key().public_key_base64(),
            ),
        )],
        validate: Vec::new(),
        ..plan.clone()
    };
    ex.run_plan(&hygiene).await.map(|r| r.rows)
}

/// The build machine's machine id, read before the hygiene empties it (so that the boot test
/// can tell an instance of the image that kept it); `None` when it is not a machine id.
pub async fn machine_id(ex: &mut Executor<'_>) -> Result<Option<String>, exec::Error> {
    let step = internal_step("Read the machine id", "cat /etc/machine-id".to_string());
    let (code, out) = ex.query(&step).await?;
    let id = String::from_utf8_lossy(&out).trim().to_string();
    let valid = id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit());
    Ok((code == 0 && valid).then_some(id))
}

/// A step jbake adds itself (image hygiene), shown like the recipe's own.
pub(crate) fn internal_step(name: &str, script: String) -> Step {
    Step {
        number: 1,
        phase: Phase::Steps,
        name: name.to_string(),
        origin: Origin {
            file: PathBuf::from("<jbake>"),
            line: 0,
            column: 0,
        },
        action: Action::Run { script },
        user: None,
        env: Vec::new(),
        retries: 0,
        delay: Duration::from_secs(1),
        timeout: Some(Duration::from_secs(600)),
        when: None,
        creates: None,
    }
}

pub async fn stop(b: &mut Bake, launched: &Launched) -> Result<(), Error> {
    let id = launched.id.as_str();
    b.progress.info("stage", &format!("stopping {id}"));
    b.aws.ec2.stop_instance(id).await?;
    let aws = &b.aws;
    wait_for(
        &b.progress,
        &format!("instance {id} to stop"),
        Duration::from_secs(900),
        || async {
            Ok::<_, aws::Error>(match aws.ec2.instance(id).await? {
                Some(i) if i.state == "stopped" => wait::Poll::Ready(Ok(())),
                Some(i) if i.state == "terminated" || i.state == "shutting-down" => {
                    wait::Poll::Ready(Err(i.state))
                }
                Some(i) => wait::Poll::Pending(i.state),
                None => wait::Poll::Pending("not visible".to_string()),
            })
        },
    )
    .await?
    .map_err(|state| Error::InstanceGone {
        id: id.to_string(),
        state,
    })
}
