//! Stages key-pair and security-group: the build's one-time access to its instance (and the
//! boot test's, to its test instance: [`import_key_pair`], [`create_group`]).

use std::sync::Arc;

use rand::Rng;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::PrivateKey;

use crate::aws::ec2::Tags;
use crate::aws::wait::{self, not_yet_visible};

use super::super::ledger::{Entry, Resource};
use super::super::{public_ip, tags, Error, SshInterface};
use super::base::Resolved;
use super::{settle, Bake};

/// The build's SSH keys: the client key (its public half is the key pair) and the one-time host
/// key the instance gets in its user data. The private halves never leave this process.
pub struct Keys {
    pub client: Arc<PrivateKey>,
    pub host: PrivateKey,
    /// The key pair's name: `jbake-<build id>`.
    pub name: String,
    /// Its entry in the ledger.
    pub entry: Entry,
}

/// The build's security group.
pub struct Group {
    pub id: String,
    /// Its VPC.
    pub vpc: String,
    /// Where SSH may come from.
    pub cidr: String,
    /// Its entry in the ledger.
    pub entry: Entry,
}

fn ed25519(comment: &str) -> PrivateKey {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill(&mut seed);
    let mut key: PrivateKey = Ed25519Keypair::from_seed(&seed).into();
    key.set_comment(comment);
    key
}

/// The name of the build's key pair and security group.
pub fn access_name(build_id: &str) -> String {
    format!("jbake-{build_id}")
}

pub async fn key_pair(b: &mut Bake, r: &Resolved) -> Result<Keys, Error> {
    let name = access_name(&b.build_id);
    let host = format!("jbake-host-{}", b.build_id);
    let tags = r.tags_named(name.clone());
    import_key_pair(b, name, &host, &tags).await
}

/// A one-time client key imported as key pair `name`, and a one-time host key (comment
/// `host_comment`), recorded in the ledger before the import.
pub async fn import_key_pair(
    b: &mut Bake,
    name: String,
    host_comment: &str,
    tags: &Tags,
) -> Result<Keys, Error> {
    let client = Arc::new(ed25519(&name));
    let host = ed25519(host_comment);
    let public = client.public_key().to_openssh().map_err(Error::Key)?;
    b.progress
        .info("stage", &format!("importing temporary key pair {name}"));
    // Recorded first: deleting a key pair by name is harmless if the import never happened.
    let entry = b.ledger.record(Resource::KeyPair { name: name.clone() });
    match b.aws.ec2.import_key_pair(&name, &public, tags).await {
        Ok(()) => {}
        // The first answer was lost and the SDK tried again: the name is this build's own.
        Err(e) if e.is_code("InvalidKeyPair.Duplicate") => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Keys {
        client,
        host,
        name,
        entry,
    })
}

/// The VPC to build in and where SSH may come from (`--ssh-cidr`, the VPC's CIDR for private
/// access, or this machine's public IP, asked over HTTPS).
pub async fn vpc_and_cidr(b: &Bake) -> Result<(String, String), Error> {
    let (vpc_id, vpc_cidr) = b.aws.ec2.vpc_for(b.opts.subnet_id.as_deref()).await?;
    let cidr = match (&b.opts.ssh_cidr, b.opts.ssh_interface) {
        (Some(c), _) => c.clone(),
        (None, SshInterface::Private) => vpc_cidr.ok_or_else(|| Error::NoVpcCidr {
            vpc: vpc_id.clone(),
        })?,
        (None, SshInterface::Public) => {
            let url = public_ip::url()?;
            format!("{}/32", public_ip::lookup(&url).await?)
        }
    };
    Ok((vpc_id, cidr))
}

pub async fn security_group(b: &mut Bake, r: &Resolved) -> Result<Group, Error> {
    let (vpc, cidr) = vpc_and_cidr(b).await?;
    let name = access_name(&b.build_id);
    let tags = r.tags_named(name.clone());
    b.progress.info(
        "stage",
        &format!("creating temporary security group (SSH from {cidr} only)"),
    );
    create_group(
        b,
        GroupSpec {
            name,
            description: "jbake build: SSH from the builder only (temporary)",
            vpc,
            cidr,
            tags,
        },
    )
    .await
}

/// A temporary security group to make.
pub struct GroupSpec {
    pub name: String,
    pub description: &'static str,
    pub vpc: String,
    /// SSH (TCP 22) from here only.
    pub cidr: String,
    pub tags: Tags,
}

/// Makes the group (recorded in the ledger first, adopted after a lost answer), and lets SSH in
/// from `cidr`.
pub async fn create_group(b: &mut Bake, spec: GroupSpec) -> Result<Group, Error> {
    let GroupSpec {
        name,
        description,
        vpc: vpc_id,
        cidr,
        tags,
    } = spec;
    let entry = b.ledger.record(Resource::SecurityGroup {
        name: name.clone(),
        vpc: vpc_id.clone(),
        id: None,
    });
    let id = match b
        .aws
        .ec2
        .create_security_group(&name, description, &vpc_id, &tags)
        .await
    {
        Ok(id) => id,
        // A retry after a lost answer: adopt the group, once EC2 shows it (it is this build's
        // by its name, and it must carry this build's tag).
        Err(e) if e.is_code("InvalidGroup.Duplicate") => {
            let (aws, build_id) = (&b.aws, b.build_id.as_str());
            settle(
                &b.progress,
                &format!("security group {name} (its answer was lost)"),
                || async {
                    Ok(match aws.ec2.security_group_named(&name, &vpc_id).await? {
                        Some(g) if g.tag(tags::BUILD_ID) == Some(build_id) => {
                            wait::Poll::Ready(Ok(g.id))
                        }
                        Some(g) => wait::Poll::Ready(Err(g.id)),
                        None => wait::Poll::Pending("not visible yet".into()),
                    })
                },
            )
            .await?
            .map_err(|other| {
                crate::aws::Error::other(
                    format!("CreateSecurityGroup {name}"),
                    &b.aws.region,
                    format!("{other} has that name but is not this build's: remove it or its tag"),
                )
            })?
        }
        Err(e) if e.refused() => {
            b.ledger.never_made(entry);
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    b.ledger.update(entry, |res| {
        if let Resource::SecurityGroup { id: slot, .. } = res {
            *slot = Some(id.clone());
        }
    });
    // Right after CreateSecurityGroup, EC2 may not know the group yet.
    let created = std::time::Instant::now();
    let aws = &b.aws;
    settle(
        &b.progress,
        &format!("security group {id} to accept its SSH rule"),
        || async {
            match aws.ec2.authorize_ssh(&id, &cidr).await {
                Ok(()) => Ok(wait::Poll::Ready(())),
                // A retry after a lost answer.
                Err(e) if e.is_code("InvalidPermission.Duplicate") => Ok(wait::Poll::Ready(())),
                Err(e) if e.is_not_found() && not_yet_visible(created) => {
                    Ok(wait::Poll::Pending("not visible yet".into()))
                }
                Err(e) => Err(e),
            }
        },
    )
    .await?;
    b.ledger.seen(entry);
    Ok(Group {
        id,
        vpc: vpc_id,
        cidr,
        entry,
    })
}

/// Takes every outbound rule from the group: its instance answers SSH and reaches nothing.
pub async fn no_way_out(b: &Bake, group: &Group) -> Result<(), Error> {
    let (aws, id) = (&b.aws, group.id.as_str());
    settle(
        &b.progress,
        &format!("security group {id} to drop its outbound rules"),
        || async {
            match aws.ec2.revoke_all_egress(id).await {
                Ok(()) => Ok(wait::Poll::Ready(())),
                // A retry after a lost answer: the rules are gone already.
                Err(e) if e.is_code("InvalidPermission.NotFound") => Ok(wait::Poll::Ready(())),
                Err(e) if e.is_not_found() => Ok(wait::Poll::Pending("not visible yet".into())),
                Err(e) => Err(e),
            }
        },
    )
    .await
}
