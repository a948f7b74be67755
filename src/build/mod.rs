//! `jbake build`: the bake pipeline on EC2, what Packer's amazon-ebs builder does, done safer.
//!
//! resolve base image → skip if unchanged → key pair → security group → launch → wait running →
//! connect (pinned host key) → recipe steps and checks → image hygiene → stop → create image →
//! wait available → tag → clean up → manifest.
//!
//! Every temporary resource is recorded in [`Undo`] the moment it exists, and undone in reverse
//! on any exit: success, failure, Ctrl-C/SIGTERM. Everything is tagged `jbake:build-id` and
//! `jbake:expires-at`, so what a SIGKILLed jbake leaves is found by `jbake gc`, and the instance
//! itself shuts down (and terminates) at its TTL.

pub mod cloud_init;
pub mod hash;
pub mod undo;

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PublicKeyBase64};

use crate::aws::ec2::{self, Launch, Tags};
use crate::aws::{self, wait, Aws};
use crate::exec::{self, Executor};
use crate::manifest;
use crate::progress::Progress;
use crate::recipe::{self, Action, BaseImage, Builtins, LoadOptions, Origin, Phase, Plan, Step};
use crate::ssh::{ConnectOptions, HostKeyPolicy, Identity, Jump, Target};
use crate::util::fmt_duration;

pub use undo::{Resource, Undo};

/// Tag keys jbake puts on what it makes.
pub mod tags {
    pub const BUILD_ID: &str = "jbake:build-id";
    pub const RECIPE: &str = "jbake:recipe";
    pub const EXPIRES_AT: &str = "jbake:expires-at";
    pub const CREATED_AT: &str = "jbake:created-at";
    pub const VERSION: &str = "jbake:version";
    pub const CONTENT_HASH: &str = "jbake:content-hash";
    pub const BASE_AMI: &str = "jbake:base-ami";
    pub const JBAKE_VERSION: &str = "jbake:jbake-version";
    /// "false" from CreateImage until the image is available and tagged: gc removes a "false"
    /// image whose build is over.
    pub const COMPLETE: &str = "jbake:complete";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SshInterface {
    Public,
    Private,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Remove every temporary resource (the default).
    Cleanup,
    /// Leave them for debugging, and print what was left and the `jbake gc` command.
    Abort,
}

impl From<exec::Error> for Error {
    fn from(e: exec::Error) -> Error {
        Error::Exec(Box::new(e))
    }
}

/// Everything `jbake build` needs, already validated offline.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub recipe: PathBuf,
    pub load: LoadOptions,
    pub aws: aws::AwsOptions,
    pub base_override: Option<BaseImage>,
    pub instance_type: Option<String>,
    pub subnet_id: Option<String>,
    pub iam_instance_profile: Option<String>,
    pub ssh_interface: SshInterface,
    pub ssh_host: Option<String>,
    pub ssh_port: u16,
    pub ssh_cidr: Option<String>,
    /// Reach the instance through this jump host.
    pub jump: Option<Jump>,
    pub force: bool,
    pub on_error: OnError,
    pub manifest: PathBuf,
    pub ttl: Duration,
    pub connect_timeout: Duration,
    pub image_timeout: Duration,
}

/// The outcome of a build.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub ami_id: String,
    pub name: String,
    pub version: String,
    pub content_hash: String,
    pub base_ami: String,
    pub skipped_unchanged: bool,
    pub build_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Recipe(#[from] recipe::Error),
    #[error(transparent)]
    Aws(#[from] aws::Error),
    #[error(transparent)]
    Exec(Box<exec::Error>),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error("{0}")]
    Base(String),
    #[error("{what} timed out after {}: it is still {state}", fmt_duration(*waited))]
    Timeout {
        what: String,
        state: String,
        waited: Duration,
    },
    #[error("{0}")]
    Other(String),
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn new_build_id() -> String {
    let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let stamp: String = t.chars().filter(|c| c.is_ascii_digit()).take(14).collect();
    format!(
        "{}-{}-{:06x}",
        &stamp[..8.min(stamp.len())],
        &stamp[8.min(stamp.len())..],
        rand::thread_rng().gen::<u32>() & 0xff_ffff
    )
}

fn ed25519(comment: &str) -> PrivateKey {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill(&mut seed);
    let mut key: PrivateKey = Ed25519Keypair::from_seed(&seed).into();
    key.set_comment(comment);
    key
}

/// Loads the recipe for the content hash: `build_id` and `version` stay placeholders.
pub fn load_for_hash(opts: &BuildOptions, base_ami: Option<String>) -> Result<Plan, recipe::Error> {
    let mut load = opts.load.clone();
    load.builtins = Builtins {
        region: Some(opts.aws.region.clone()),
        build_id: None,
        version: None,
        base_ami,
    };
    recipe::load(&opts.recipe, &load)
}

/// One build, its temporary resources recorded in `undo`. The caller runs `undo` afterwards
/// (whatever happened), which is what makes cleanup independent of how this future ends.
pub async fn run(
    opts: &BuildOptions,
    aws: &Aws,
    undo: &Undo,
    build_id: &str,
    progress: &mut Progress,
    broker_pid: Arc<AtomicU32>,
) -> Result<Built, Error> {
    let started = now_rfc3339();
    let t0 = Instant::now();
    // The recipe as written (offline checks were done by the caller).
    let first = load_for_hash(opts, None)?;
    let base_spec = opts
        .base_override
        .clone()
        .unwrap_or_else(|| first.base.image.clone());
    progress.info(
        "stage",
        &format!("resolving the base image ({})", describe_base(&base_spec)),
    );
    let base = resolve_base(aws, &base_spec).await?;
    progress.info("stage", &format!("base image {} ({})", base.id, base.name));

    let hashed = load_for_hash(opts, Some(base.id.clone()))?;
    let content_hash = hash::content_hash(&hashed, &base.id).map_err(|e| {
        Error::Other(format!(
            "cannot read an uploaded file for the content hash: {e}"
        ))
    })?;
    if !opts.force {
        let same = aws
            .ec2
            .own_images_tagged(tags::CONTENT_HASH, &content_hash)
            .await?;
        if let Some(img) = same.iter().find(|i| {
            ec2::image_available(&i.state)
                && i.tag(tags::RECIPE) == Some(hashed.name.as_str())
                && i.tag(tags::COMPLETE) != Some("false")
        }) {
            progress.info(
                "unchanged",
                &format!(
                    "unchanged: {} ({}) was built from the same inputs (content hash {}); nothing to do (--force rebuilds)",
                    img.id,
                    img.name,
                    &content_hash[..12]
                ),
            );
            let built = Built {
                ami_id: img.id.clone(),
                name: img.name.clone(),
                version: img.tag(tags::VERSION).unwrap_or_default().to_string(),
                content_hash: content_hash.clone(),
                base_ami: base.id.clone(),
                skipped_unchanged: true,
                build_id: build_id.to_string(),
            };
            write_manifest(opts, aws, &built, &hashed.name, &started)?;
            return Ok(built);
        }
    }

    let version = next_version(aws, &hashed.name).await?;
    let image_name = format!("{}-{version}", hashed.name);
    let mut load = opts.load.clone();
    load.builtins = Builtins {
        region: Some(opts.aws.region.clone()),
        build_id: Some(build_id.to_string()),
        version: Some(version.clone()),
        base_ami: Some(base.id.clone()),
    };
    let plan = recipe::load(&opts.recipe, &load)?;

    let expires = SystemTime::now() + opts.ttl;
    let common: Tags = vec![
        (tags::BUILD_ID.into(), build_id.to_string()),
        (tags::RECIPE.into(), plan.name.clone()),
        (tags::CREATED_AT.into(), started.clone()),
        (
            tags::EXPIRES_AT.into(),
            humantime::format_rfc3339_seconds(expires).to_string(),
        ),
    ];
    let with_name = |name: String| {
        let mut t = common.clone();
        t.push(("Name".to_string(), name));
        t
    };

    // Temporary key pair: generated here; only the public half leaves this process.
    let client_key = Arc::new(ed25519(&format!("jbake-{build_id}")));
    let host_key = ed25519(&format!("jbake-host-{build_id}"));
    let key_name = format!("jbake-{build_id}");
    let public = client_key
        .public_key()
        .to_openssh()
        .map_err(|e| Error::Other(format!("cannot encode the temporary key: {e}")))?;
    progress.info("stage", &format!("importing temporary key pair {key_name}"));
    aws.ec2
        .import_key_pair(&key_name, &public, &with_name(key_name.clone()))
        .await?;
    undo.push(Resource::KeyPair {
        name: key_name.clone(),
    });

    // Temporary security group: SSH from the builder only.
    let (vpc_id, vpc_cidr) = aws.ec2.vpc_for(opts.subnet_id.as_deref()).await?;
    let cidr = match (&opts.ssh_cidr, opts.ssh_interface) {
        (Some(c), _) => c.clone(),
        (None, SshInterface::Private) => vpc_cidr.ok_or_else(|| {
            Error::Other(format!("VPC {vpc_id} has no CIDR block: pass --ssh-cidr"))
        })?,
        (None, SshInterface::Public) => format!("{}/32", public_ip().await?),
    };
    progress.info(
        "stage",
        &format!("creating temporary security group (SSH from {cidr} only)"),
    );
    let sg = aws
        .ec2
        .create_ssh_security_group(&key_name, &vpc_id, &cidr, &with_name(key_name.clone()))
        .await;
    let sg = match sg {
        Ok(id) => id,
        Err(e) => {
            // It may exist without its ingress rule: find it by tag and undo it too.
            if let Ok(groups) = aws.ec2.security_groups_tagged(tags::BUILD_ID).await {
                for (id, t) in groups {
                    if t.iter().any(|(k, v)| k == tags::BUILD_ID && v == build_id) {
                        undo.push(Resource::SecurityGroup { id });
                    }
                }
            }
            return Err(e.into());
        }
    };
    undo.push(Resource::SecurityGroup { id: sg.clone() });

    // Launch.
    let instance_type = opts
        .instance_type
        .clone()
        .unwrap_or_else(|| plan.instance.instance_type.clone());
    let ttl_minutes = opts.ttl.as_secs().div_ceil(60).max(1);
    let user_data = cloud_init::user_data(&host_key, ttl_minutes).map_err(Error::Other)?;
    progress.info(
        "stage",
        &format!("launching a {instance_type} from {}", base.id),
    );
    let instance_id = aws
        .ec2
        .run_instance(&Launch {
            image_id: base.id.clone(),
            instance_type: instance_type.clone(),
            key_name: key_name.clone(),
            security_group_id: sg.clone(),
            subnet_id: opts.subnet_id.clone(),
            iam_instance_profile: opts.iam_instance_profile.clone(),
            root_device: base
                .root_device
                .clone()
                .unwrap_or_else(|| "/dev/xvda".to_string()),
            volume_gb: plan.instance.volume_gb as i32,
            user_data,
            tags: with_name(format!("jbake build {} {build_id}", plan.name)),
        })
        .await?;
    undo.push(Resource::Instance {
        id: instance_id.clone(),
    });
    progress.info("launched", &format!("instance {instance_id} launched"));

    let instance = wait_for(
        progress,
        &format!("instance {instance_id} to run"),
        Duration::from_secs(600),
        || async {
            Ok::<_, aws::Error>(match aws.ec2.instance(&instance_id).await? {
                Some(i) if i.state == "running" => wait::Poll::Ready(i),
                Some(i) if i.state == "terminated" || i.state == "shutting-down" => {
                    return Err(aws::Error::other(
                        format!("launching {instance_id}"),
                        aws.ec2.region(),
                        format!("the instance is {} (see its console output)", i.state),
                    ))
                }
                Some(i) => wait::Poll::Pending(i.state),
                None => wait::Poll::Pending("not visible yet".to_string()),
            })
        },
    )
    .await?;

    // Connect, verifying the host key we gave the instance.
    let host = match (&opts.ssh_host, opts.ssh_interface) {
        (Some(h), _) => h.clone(),
        (None, SshInterface::Public) => instance.public_ip.clone().ok_or_else(|| {
            Error::Other(format!(
                "{instance_id} has no public IP: use --ssh-interface private (from inside the VPC), --bastion, or a subnet that assigns public IPs"
            ))
        })?,
        (None, SshInterface::Private) => instance.private_ip.clone().ok_or_else(|| {
            Error::Other(format!("{instance_id} has no private IP yet"))
        })?,
    };
    let connect = ConnectOptions {
        target: Target {
            user: plan.base.ssh_user.clone(),
            host,
            port: opts.ssh_port,
        },
        identity: Identity::Key(client_key.clone()),
        host_key: HostKeyPolicy::Pinned(host_key.public_key().clone()),
        deadline: opts.connect_timeout,
        keepalive: Duration::from_secs(15),
        jump: opts.jump.clone(),
    };
    let mut ex = Executor::connect(
        connect,
        instance_id.clone(),
        plan.secrets(),
        progress,
        broker_pid,
    )
    .await?;
    let report = ex.run_plan(&plan).await;
    if let Err((e, report)) = report {
        ex.close().await;
        progress.summary(&report.rows, report.elapsed, false);
        return Err(e.into());
    }
    let hygiene = Plan {
        steps: vec![internal_step(
            "Image hygiene",
            cloud_init::hygiene_script(&client_key.public_key_base64()),
        )],
        validate: Vec::new(),
        ..plan.clone()
    };
    let hygiene_report = ex.run_plan(&hygiene).await;
    ex.close().await;
    let mut rows = match report {
        Ok(r) => r.rows,
        Err(_) => Vec::new(),
    };
    match hygiene_report {
        Ok(r) => rows.extend(r.rows),
        Err((e, _)) => return Err(e.into()),
    }
    progress.summary(&rows, t0.elapsed(), true);

    // Stop, snapshot, wait.
    progress.info("stage", &format!("stopping {instance_id}"));
    aws.ec2.stop_instance(&instance_id).await?;
    wait_for(
        progress,
        &format!("instance {instance_id} to stop"),
        Duration::from_secs(900),
        || async {
            Ok::<_, aws::Error>(match aws.ec2.instance(&instance_id).await? {
                Some(i) if i.state == "stopped" => wait::Poll::Ready(()),
                Some(i) => wait::Poll::Pending(i.state),
                None => wait::Poll::Pending("not visible".to_string()),
            })
        },
    )
    .await?;

    let mut image_tags = common.clone();
    image_tags.extend([
        ("Name".to_string(), image_name.clone()),
        (tags::VERSION.to_string(), version.clone()),
        (tags::CONTENT_HASH.to_string(), content_hash.clone()),
        (tags::BASE_AMI.to_string(), base.id.clone()),
        (
            tags::JBAKE_VERSION.to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (tags::COMPLETE.to_string(), "false".to_string()),
    ]);
    // The recipe's own tags (`tags:`, e.g. the controller's jbake:efs-id); jbake's keys are
    // refused at validate, so they cannot override the ones above.
    image_tags.extend(plan.tags.iter().cloned());
    let description = format!(
        "{} {version} by jbake {} from {} ({})",
        plan.name,
        env!("CARGO_PKG_VERSION"),
        base.id,
        plan.description.clone().unwrap_or_default()
    );
    progress.info("stage", &format!("creating image {image_name}"));
    let image_id = aws
        .ec2
        .create_image(&instance_id, &image_name, &description, &image_tags)
        .await?;
    let kept = Resource::Image {
        id: image_id.clone(),
        snapshots: Vec::new(),
    };
    undo.push(kept.clone());
    let image = wait_for(
        progress,
        &format!("image {image_id} to be available"),
        opts.image_timeout,
        || async {
            Ok::<_, aws::Error>(match aws.ec2.image(&image_id).await? {
                Some(i) if ec2::image_available(&i.state) => wait::Poll::Ready(i),
                Some(i) if ec2::image_failed(&i.state) => {
                    return Err(aws::Error::other(
                        format!("creating image {image_id}"),
                        aws.ec2.region(),
                        format!("the image is {}", i.state),
                    ))
                }
                Some(i) => wait::Poll::Pending(i.state),
                None => wait::Poll::Pending("not visible yet".to_string()),
            })
        },
    )
    .await?;
    undo.set_snapshots(&image_id, &image.snapshots);
    let mut snap_tags = image_tags.clone();
    snap_tags.retain(|(k, _)| k != tags::COMPLETE);
    aws.ec2.create_tags(&image.snapshots, &snap_tags).await?;
    aws.ec2
        .create_tags(
            std::slice::from_ref(&image_id),
            &vec![(tags::COMPLETE.to_string(), "true".to_string())],
        )
        .await?;
    // The image is done: it is the one thing the build keeps.
    let kept = Resource::Image {
        id: image_id.clone(),
        snapshots: image.snapshots.clone(),
    };
    undo.keep(&kept);

    let built = Built {
        ami_id: image_id,
        name: image_name,
        version,
        content_hash,
        base_ami: base.id,
        skipped_unchanged: false,
        build_id: build_id.to_string(),
    };
    write_manifest(opts, aws, &built, &plan.name, &started)?;
    Ok(built)
}

fn write_manifest(
    opts: &BuildOptions,
    aws: &Aws,
    b: &Built,
    recipe: &str,
    started: &str,
) -> Result<(), Error> {
    manifest::append(
        &opts.manifest,
        manifest::Build {
            build_id: b.build_id.clone(),
            recipe: recipe.to_string(),
            name: b.name.clone(),
            ami_id: b.ami_id.clone(),
            region: aws.region.clone(),
            version: b.version.clone(),
            content_hash: b.content_hash.clone(),
            base_ami: b.base_ami.clone(),
            jbake_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: started.to_string(),
            finished_at: now_rfc3339(),
            skipped_unchanged: b.skipped_unchanged,
        },
    )?;
    Ok(())
}

/// A step jbake adds itself (image hygiene), shown like the recipe's own.
fn internal_step(name: &str, script: String) -> Step {
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

async fn wait_for<T, F, Fut>(
    progress: &Progress,
    what: &str,
    deadline: Duration,
    check: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<wait::Poll<T>, aws::Error>>,
{
    let t = Instant::now();
    let r = wait::until(
        deadline,
        Duration::from_secs(10),
        |s| progress.info("waiting", &format!("waiting for {what}: {s}")),
        check,
    )
    .await;
    match r {
        Ok(Ok(v)) => {
            progress.info(
                "waited",
                &format!("{what}: done in {}", fmt_duration(t.elapsed())),
            );
            Ok(v)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(state) => Err(Error::Timeout {
            what: format!("waiting for {what}"),
            state,
            waited: deadline,
        }),
    }
}

fn describe_base(b: &BaseImage) -> String {
    match b {
        BaseImage::Ami(id) => id.clone(),
        BaseImage::SsmParameter(p) => format!("SSM parameter {p}"),
        BaseImage::Filter { name, owners, .. } => {
            format!("name {name} owned by {}", owners.join(","))
        }
    }
}

/// Finds the base image: it must exist and be available.
pub async fn resolve_base(aws: &Aws, spec: &BaseImage) -> Result<ec2::ImageInfo, Error> {
    let id = match spec {
        BaseImage::Ami(id) => id.clone(),
        BaseImage::SsmParameter(p) => {
            let out = aws.ssm.get_parameter().name(p).send().await.map_err(|e| {
                aws::Error::new(
                    format!("reading SSM parameter {p}"),
                    &aws.region,
                    e.into_service_error(),
                )
                .action("ssm:GetParameter")
            })?;
            out.parameter()
                .and_then(|p| p.value())
                .map(str::to_string)
                .ok_or_else(|| Error::Base(format!("SSM parameter {p} has no value")))?
        }
        BaseImage::Filter {
            name,
            owners,
            most_recent,
        } => {
            let mut found = aws.ec2.images_named(name, owners).await?;
            found.retain(|i| ec2::image_available(&i.state));
            found.sort_by(|a, b| b.creation_date.cmp(&a.creation_date));
            match found.len() {
                0 => {
                    return Err(Error::Base(format!(
                        "no available image is named {name} (owners {})",
                        owners.join(",")
                    )))
                }
                1 => found[0].id.clone(),
                _ if *most_recent => found[0].id.clone(),
                n => {
                    let list: Vec<String> = found
                        .iter()
                        .take(5)
                        .map(|i| format!("{} ({})", i.id, i.name))
                        .collect();
                    return Err(Error::Base(format!(
                        "{n} images match name {name}: {}; narrow the filter or set most_recent: true",
                        list.join(", ")
                    )));
                }
            }
        }
    };
    let image =
        aws.ec2.image(&id).await?.ok_or_else(|| {
            Error::Base(format!("base image {id} does not exist in {}", aws.region))
        })?;
    if !ec2::image_available(&image.state) {
        return Err(Error::Base(format!(
            "base image {id} is {}, not available",
            image.state
        )));
    }
    Ok(image)
}

/// `YYYY.MM.DD-N`, N one more than the highest of today's images of this recipe.
async fn next_version(aws: &Aws, recipe: &str) -> Result<String, Error> {
    let today = now_rfc3339()
        .get(..10)
        .unwrap_or("1970-01-01")
        .replace('-', ".");
    let prefix = format!("{recipe}-{today}-");
    let existing = aws.ec2.images_named(&format!("{prefix}*"), &[]).await?;
    let n = existing
        .iter()
        .filter_map(|i| {
            i.name
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<u32>().ok())
        })
        .max()
        .unwrap_or(0);
    Ok(format!("{today}-{}", n + 1))
}

/// The caller's public IPv4 address, for the security group (`--ssh-cidr` overrides).
async fn public_ip() -> Result<String, Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("checkip.amazonaws.com", 80)).await?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: checkip.amazonaws.com\r\nUser-Agent: jbake\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).to_string())
    };
    let fail = |why: String| {
        Error::Other(format!(
            "cannot discover this machine's public IP for the security group ({why}): pass --ssh-cidr (e.g. --ssh-cidr 203.0.113.7/32)"
        ))
    };
    let text = tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .map_err(|_| fail("no answer within 10s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let ip = text
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    ip.parse::<std::net::Ipv4Addr>()
        .map(|a| a.to_string())
        .map_err(|_| fail(format!("unexpected answer {ip:?}")))
}

/// A fresh build id: `YYYYMMDD-HHMMSS-xxxxxx`.
pub fn build_id() -> String {
    new_build_id()
}
