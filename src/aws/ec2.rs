//! The EC2 calls a bake makes, each with the context a user needs when it fails.
//!
//! Lists go through the SDK's paginators (`into_paginator()`), so an account with more images,
//! instances, groups or snapshots than one answer holds is read whole. Lookups by id are single
//! calls (an id names at most one resource; AWS refuses `MaxResults` with ids). Errors keep the
//! service's code ([`Error::is_code`]): what a `NotFound` right after a create means is the
//! caller's decision (see [`super::wait::PROPAGATION`]).

use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    AttributeValue, BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState,
    IamInstanceProfileSpecification, Image, ImageState, Instance, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, IpPermission, IpRange, LaunchPermission,
    LaunchPermissionModifications, ResourceType, ShutdownBehavior, Snapshot, Tag, TagSpecification,
    VolumeType,
};

use super::Error;

/// Tags as `(key, value)` pairs.
pub type Tags = Vec<(String, String)>;

fn tag_spec(kind: ResourceType, tags: &Tags) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

fn tags_of(tags: &[Tag]) -> Tags {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn find_tag<'a>(tags: &'a Tags, key: &str) -> Option<&'a str> {
    tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn tag_filter(key: &str, value: Option<&str>) -> Filter {
    match value {
        Some(v) => Filter::builder()
            .name(format!("tag:{key}"))
            .values(v)
            .build(),
        None => Filter::builder().name("tag-key").values(key).build(),
    }
}

/// A base or built image, as jbake needs it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    pub state: String,
    pub creation_date: String,
    pub root_device: Option<String>,
    pub snapshots: Vec<String>,
    pub tags: Tags,
}

impl ImageInfo {
    fn from(i: &Image) -> ImageInfo {
        ImageInfo {
            id: i.image_id().unwrap_or_default().to_string(),
            name: i.name().unwrap_or_default().to_string(),
            state: i
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            creation_date: i.creation_date().unwrap_or_default().to_string(),
            root_device: i.root_device_name().map(str::to_string),
            snapshots: i
                .block_device_mappings()
                .iter()
                .filter_map(|b| b.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
                .collect(),
            tags: tags_of(i.tags()),
        }
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        find_tag(&self.tags, key)
    }
}

/// An instance, as jbake needs it.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub id: String,
    pub state: String,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub vpc_id: Option<String>,
    pub key_name: Option<String>,
    pub security_groups: Vec<String>,
    pub tags: Tags,
}

impl InstanceInfo {
    fn from(i: &Instance) -> InstanceInfo {
        InstanceInfo {
            id: i.instance_id().unwrap_or_default().to_string(),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_default(),
            public_ip: i.public_ip_address().map(str::to_string),
            private_ip: i.private_ip_address().map(str::to_string),
            vpc_id: i.vpc_id().map(str::to_string),
            key_name: i.key_name().map(str::to_string),
            security_groups: i
                .security_groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string))
                .collect(),
            tags: tags_of(i.tags()),
        }
    }

    pub fn tag(&self, key: &str) -> Option<&str> {
        find_tag(&self.tags, key)
    }
}

/// A security group, key pair or snapshot: its id (or name) and tags.
#[derive(Debug, Clone)]
pub struct Tagged {
    /// The id (`sg-…`, `snap-…`), or the name of a key pair.
    pub id: String,
    /// The group's or key pair's name; a snapshot's description.
    pub name: String,
    pub tags: Tags,
    /// A snapshot's state (`pending`, `completed`, `error`); empty for the others.
    pub state: String,
}

impl Tagged {
    pub fn tag(&self, key: &str) -> Option<&str> {
        find_tag(&self.tags, key)
    }

    fn snapshot(s: &Snapshot) -> Tagged {
        Tagged {
            id: s.snapshot_id().unwrap_or_default().to_string(),
            name: s.description().unwrap_or_default().to_string(),
            tags: tags_of(s.tags()),
            state: s
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
        }
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct Launch {
    pub image_id: String,
    pub instance_type: String,
    pub key_name: String,
    pub security_group_id: String,
    pub subnet_id: Option<String>,
    pub iam_instance_profile: Option<String>,
    pub root_device: String,
    pub volume_gb: i32,
    /// Base64 of the cloud-config.
    pub user_data: String,
    pub tags: Tags,
    /// Makes RunInstances idempotent: a retry whose first answer was lost gets the same
    /// instance instead of a second one.
    pub client_token: String,
    /// The KMS key of the root volume (and so of the image's snapshots); `None`: the
    /// account's default EBS key in the region.
    pub kms_key_id: Option<String>,
}

/// What CopyImage makes: a copy of an image of another region, in this client's region.
#[derive(Debug, Clone)]
pub struct CopyImage {
    pub source_id: String,
    pub source_region: String,
    pub name: String,
    pub description: String,
    /// The copy's snapshots are encrypted with this key; `None`: the region's default EBS key.
    pub kms_key_id: Option<String>,
    /// Makes CopyImage idempotent: a retry whose first answer was lost gets the same copy.
    pub client_token: String,
    pub image_tags: Tags,
    pub snapshot_tags: Tags,
}

/// How a snapshot is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotKey {
    pub id: String,
    pub encrypted: bool,
    /// The key's ARN, when encrypted.
    pub kms_key_id: Option<String>,
}

#[derive(Clone)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    region: String,
}

impl Ec2 {
    pub fn new(client: aws_sdk_ec2::Client, region: &str) -> Ec2 {
        Ec2 {
            client,
            region: region.to_string(),
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    fn err<E>(&self, what: impl Into<String>, e: E) -> Error
    where
        E: std::error::Error + aws_smithy_types::error::metadata::ProvideErrorMetadata + 'static,
    {
        Error::new(what, &self.region, e).service("ec2")
    }

    /// One image by id; `None` when EC2 does not know it (never existed, deregistered long
    /// ago, or not visible yet).
    pub async fn image(&self, id: &str) -> Result<Option<ImageInfo>, Error> {
        let out = self.client.describe_images().image_ids(id).send().await;
        match out {
            Ok(o) => Ok(o.images().first().map(ImageInfo::from)),
            Err(e) => {
                let e = self.err(format!("DescribeImages {id}"), e.into_service_error());
                if e.is_code("InvalidAMIID.NotFound") || e.is_code("InvalidAMIID.Malformed") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn images(
        &self,
        what: String,
        owners: &[String],
        filters: Vec<Filter>,
    ) -> Result<Vec<ImageInfo>, Error> {
        let owners = if owners.is_empty() {
            vec!["self".to_string()]
        } else {
            owners.to_vec()
        };
        let images = self
            .client
            .describe_images()
            .set_owners(Some(owners))
            .set_filters(Some(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| self.err(what, e.into_service_error()))?;
        Ok(images.iter().map(ImageInfo::from).collect())
    }

    /// Images matching a name pattern, owned by `owners` (or by this account when empty).
    pub async fn images_named(
        &self,
        pattern: &str,
        owners: &[String],
    ) -> Result<Vec<ImageInfo>, Error> {
        self.images(
            format!("DescribeImages name={pattern}"),
            owners,
            vec![Filter::builder().name("name").values(pattern).build()],
        )
        .await
    }

    /// This account's images carrying `tag=value`.
    pub async fn own_images_tagged(&self, tag: &str, value: &str) -> Result<Vec<ImageInfo>, Error> {
        self.images(
            format!("DescribeImages tag:{tag}"),
            &[],
            vec![tag_filter(tag, Some(value))],
        )
        .await
    }

    /// This account's images carrying the tag key `tag`.
    pub async fn own_images_with_tag_key(&self, tag: &str) -> Result<Vec<ImageInfo>, Error> {
        self.images(
            format!("DescribeImages tag-key={tag}"),
            &[],
            vec![tag_filter(tag, None)],
        )
        .await
    }

    /// This account's snapshots carrying `tag` (with this value, or any).
    pub async fn snapshots_tagged(
        &self,
        tag: &str,
        value: Option<&str>,
    ) -> Result<Vec<Tagged>, Error> {
        let snaps = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .filters(tag_filter(tag, value))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeSnapshots tag:{tag}"),
                    e.into_service_error(),
                )
            })?;
        Ok(snaps.iter().map(Tagged::snapshot).collect())
    }

    pub async fn import_key_pair(
        &self,
        name: &str,
        public_key: &str,
        tags: &Tags,
    ) -> Result<(), Error> {
        self.client
            .import_key_pair()
            .key_name(name)
            .public_key_material(Blob::new(public_key.as_bytes()))
            .tag_specifications(tag_spec(ResourceType::KeyPair, tags))
            .send()
            .await
            .map_err(|e| self.err(format!("ImportKeyPair {name}"), e.into_service_error()))?;
        Ok(())
    }

    /// Deletes a key pair (EC2 answers success for a name it does not know).
    pub async fn delete_key_pair(&self, name: &str) -> Result<(), Error> {
        self.client
            .delete_key_pair()
            .key_name(name)
            .send()
            .await
            .map_err(|e| self.err(format!("DeleteKeyPair {name}"), e.into_service_error()))?;
        Ok(())
    }

    /// The VPC of a subnet, or the region's default VPC: `(id, IPv4 CIDR)`.
    pub async fn vpc_for(&self, subnet: Option<&str>) -> Result<(String, Option<String>), Error> {
        if let Some(subnet) = subnet {
            let out = self
                .client
                .describe_subnets()
                .subnet_ids(subnet)
                .send()
                .await
                .map_err(|e| {
                    self.err(format!("DescribeSubnets {subnet}"), e.into_service_error())
                })?;
            let s = out.subnets().first().ok_or_else(|| {
                Error::other(
                    "DescribeSubnets",
                    &self.region,
                    format!("subnet {subnet} does not exist"),
                )
            })?;
            return Ok((
                s.vpc_id().unwrap_or_default().to_string(),
                s.cidr_block().map(str::to_string),
            ));
        }
        let vpcs = self
            .client
            .describe_vpcs()
            .filters(Filter::builder().name("is-default").values("true").build())
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| self.err("DescribeVpcs (default VPC)", e.into_service_error()))?;
        let v = vpcs.first().ok_or_else(|| {
            Error::other(
                "finding the default VPC",
                &self.region,
                "this region has no default VPC: pass --subnet-id",
            )
        })?;
        Ok((
            v.vpc_id().unwrap_or_default().to_string(),
            v.cidr_block().map(str::to_string),
        ))
    }

    /// Creates a security group (no ingress yet: [`authorize_ssh`](Self::authorize_ssh)).
    /// Returns its id.
    pub async fn create_security_group(
        &self,
        name: &str,
        description: &str,
        vpc_id: &str,
        tags: &Tags,
    ) -> Result<String, Error> {
        let out = self
            .client
            .create_security_group()
            .group_name(name)
            .description(description)
            .vpc_id(vpc_id)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, tags))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("CreateSecurityGroup {name}"),
                    e.into_service_error(),
                )
            })?;
        out.group_id().map(str::to_string).ok_or_else(|| {
            Error::other(
                format!("CreateSecurityGroup {name}"),
                &self.region,
                "no group id in the answer",
            )
        })
    }

    /// Allows SSH (TCP 22) from `cidr` only.
    pub async fn authorize_ssh(&self, group_id: &str, cidr: &str) -> Result<(), Error> {
        self.client
            .authorize_security_group_ingress()
            .group_id(group_id)
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(22)
                    .to_port(22)
                    .ip_ranges(
                        IpRange::builder()
                            .cidr_ip(cidr)
                            .description("jbake builder")
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("AuthorizeSecurityGroupIngress {group_id}"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    async fn security_groups(
        &self,
        what: String,
        filters: Vec<Filter>,
    ) -> Result<Vec<Tagged>, Error> {
        let groups = self
            .client
            .describe_security_groups()
            .set_filters(Some(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| self.err(what, e.into_service_error()))?;
        Ok(groups
            .iter()
            .map(|g| Tagged {
                id: g.group_id().unwrap_or_default().to_string(),
                name: g.group_name().unwrap_or_default().to_string(),
                tags: tags_of(g.tags()),
                state: String::new(),
            })
            .collect())
    }

    /// The security group called `name` in `vpc_id`, if there is one.
    pub async fn security_group_named(
        &self,
        name: &str,
        vpc_id: &str,
    ) -> Result<Option<Tagged>, Error> {
        let found = self
            .security_groups(
                format!("DescribeSecurityGroups group-name={name}"),
                vec![
                    Filter::builder().name("group-name").values(name).build(),
                    Filter::builder().name("vpc-id").values(vpc_id).build(),
                ],
            )
            .await?;
        Ok(found.into_iter().next())
    }

    /// Security groups carrying the tag key `tag`.
    pub async fn security_groups_tagged(&self, tag: &str) -> Result<Vec<Tagged>, Error> {
        self.security_groups(
            format!("DescribeSecurityGroups tag-key={tag}"),
            vec![tag_filter(tag, None)],
        )
        .await
    }

    /// Removes every outbound rule of the group (a new group allows all outbound traffic):
    /// an instance in it can answer SSH and reach nothing. Its egress rules as EC2 shows them
    /// are revoked; a group with none left is done.
    pub async fn revoke_all_egress(&self, group_id: &str) -> Result<(), Error> {
        let out = self
            .client
            .describe_security_groups()
            .group_ids(group_id)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeSecurityGroups {group_id}"),
                    e.into_service_error(),
                )
            })?;
        let rules: Vec<IpPermission> = out
            .security_groups()
            .iter()
            .flat_map(|g| g.ip_permissions_egress().iter().cloned())
            .collect();
        if rules.is_empty() {
            return Ok(());
        }
        self.client
            .revoke_security_group_egress()
            .group_id(group_id)
            .set_ip_permissions(Some(rules))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("RevokeSecurityGroupEgress {group_id}"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    pub async fn delete_security_group(&self, id: &str) -> Result<(), Error> {
        self.client
            .delete_security_group()
            .group_id(id)
            .send()
            .await
            .map_err(|e| self.err(format!("DeleteSecurityGroup {id}"), e.into_service_error()))?;
        Ok(())
    }

    /// Launches one instance (IMDSv2 required, encrypted gp3 root volume, terminate on
    /// shutdown, tagged instance and volume, idempotent by its client token). Returns its id.
    pub async fn run_instance(&self, l: &Launch) -> Result<String, Error> {
        let mut req = self
            .client
            .run_instances()
            .client_token(&l.client_token)
            .image_id(&l.image_id)
            .instance_type(InstanceType::from(l.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .key_name(&l.key_name)
            .security_group_ids(&l.security_group_id)
            .user_data(&l.user_data)
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_put_response_hop_limit(1)
                    .build(),
            )
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(&l.root_device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(l.volume_gb)
                            .volume_type(VolumeType::Gp3)
                            .encrypted(true)
                            .set_kms_key_id(l.kms_key_id.clone())
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance, &l.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &l.tags));
        if let Some(s) = &l.subnet_id {
            req = req.subnet_id(s);
        }
        if let Some(p) = &l.iam_instance_profile {
            req = req
                .iam_instance_profile(IamInstanceProfileSpecification::builder().name(p).build());
        }
        let out = req.send().await.map_err(|e| {
            self.err(
                format!("RunInstances from {}", l.image_id),
                e.into_service_error(),
            )
        })?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_string)
            .ok_or_else(|| Error::other("RunInstances", &self.region, "no instance in the answer"))
    }

    /// One instance by id; `None` when EC2 does not know it. `InvalidInstanceID.NotFound` is
    /// returned as an error: right after RunInstances it means "not visible yet".
    pub async fn instance(&self, id: &str) -> Result<Option<InstanceInfo>, Error> {
        let out = self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| self.err(format!("DescribeInstances {id}"), e.into_service_error()))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id))
            .map(InstanceInfo::from))
    }

    /// Instances carrying `tag` (any value when `value` is None), terminated ones included.
    pub async fn instances_tagged(
        &self,
        tag: &str,
        value: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, Error> {
        let reservations = self
            .client
            .describe_instances()
            .filters(tag_filter(tag, value))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeInstances tag:{tag}"),
                    e.into_service_error(),
                )
            })?;
        Ok(reservations
            .iter()
            .flat_map(|r| r.instances())
            .map(InstanceInfo::from)
            .collect())
    }

    /// Key pairs carrying `tag` (with this value, or any). DescribeKeyPairs has no pages.
    pub async fn key_pairs_tagged(
        &self,
        tag: &str,
        value: Option<&str>,
    ) -> Result<Vec<Tagged>, Error> {
        let out = self
            .client
            .describe_key_pairs()
            .filters(tag_filter(tag, value))
            .send()
            .await
            .map_err(|e| self.err("DescribeKeyPairs", e.into_service_error()))?;
        Ok(out
            .key_pairs()
            .iter()
            .map(|k| Tagged {
                id: k.key_name().unwrap_or_default().to_string(),
                name: k.key_name().unwrap_or_default().to_string(),
                tags: tags_of(k.tags()),
                state: String::new(),
            })
            .collect())
    }

    pub async fn stop_instance(&self, id: &str) -> Result<(), Error> {
        self.client
            .stop_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| self.err(format!("StopInstances {id}"), e.into_service_error()))?;
        Ok(())
    }

    pub async fn terminate_instance(&self, id: &str) -> Result<(), Error> {
        self.client
            .terminate_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(|e| self.err(format!("TerminateInstances {id}"), e.into_service_error()))?;
        Ok(())
    }

    /// Creates the image, tagging it and its snapshots at creation (so a half-made image and
    /// its snapshots are always found by tag). CreateImage has no client token: a retry after
    /// a lost answer gets `InvalidAMIName.Duplicate`, and the caller adopts its own image.
    pub async fn create_image(
        &self,
        instance_id: &str,
        name: &str,
        description: &str,
        image_tags: &Tags,
        snapshot_tags: &Tags,
    ) -> Result<String, Error> {
        let out = self
            .client
            .create_image()
            .instance_id(instance_id)
            .name(name)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Image, image_tags))
            .tag_specifications(tag_spec(ResourceType::Snapshot, snapshot_tags))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("CreateImage {name} from {instance_id}"),
                    e.into_service_error(),
                )
            })?;
        out.image_id()
            .map(str::to_string)
            .ok_or_else(|| Error::other("CreateImage", &self.region, "no image id in the answer"))
    }

    /// Instances launched from the image use IMDSv2 only (`ImdsSupport` `v2.0`; it cannot be
    /// undone, by design).
    pub async fn require_imds_v2(&self, image_id: &str) -> Result<(), Error> {
        self.client
            .modify_image_attribute()
            .image_id(image_id)
            .imds_support(AttributeValue::builder().value("v2.0").build())
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("ModifyImageAttribute {image_id} ImdsSupport=v2.0"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    pub async fn create_tags(&self, ids: &[String], tags: &Tags) -> Result<(), Error> {
        if ids.is_empty() || tags.is_empty() {
            return Ok(());
        }
        self.client
            .create_tags()
            .set_resources(Some(ids.to_vec()))
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("CreateTags {}", ids.join(",")),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// Deregisters the image and asks EC2 to delete its snapshots with it
    /// (`DeleteAssociatedSnapshots`); the caller still deletes the snapshots it finds by tag,
    /// for endpoints that ignore the flag.
    pub async fn deregister_image(&self, id: &str) -> Result<(), Error> {
        self.client
            .deregister_image()
            .image_id(id)
            .delete_associated_snapshots(true)
            .send()
            .await
            .map_err(|e| self.err(format!("DeregisterImage {id}"), e.into_service_error()))?;
        Ok(())
    }

    /// Copies an image of another region into this one, encrypted (with `kms_key_id`, or the
    /// region's default EBS key), the copy and its snapshots tagged at creation. Returns the
    /// copy's id (at once: the copy is `pending` for minutes, tens of them across regions).
    pub async fn copy_image(&self, c: &CopyImage) -> Result<String, Error> {
        let out = self
            .client
            .copy_image()
            .source_image_id(&c.source_id)
            .source_region(&c.source_region)
            .name(&c.name)
            .description(&c.description)
            .encrypted(true)
            .set_kms_key_id(c.kms_key_id.clone())
            .client_token(&c.client_token)
            .tag_specifications(tag_spec(ResourceType::Image, &c.image_tags))
            .tag_specifications(tag_spec(ResourceType::Snapshot, &c.snapshot_tags))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!(
                        "CopyImage {} from {} ({})",
                        c.name, c.source_id, c.source_region
                    ),
                    e.into_service_error(),
                )
            })?;
        out.image_id()
            .map(str::to_string)
            .ok_or_else(|| Error::other("CopyImage", &self.region, "no image id in the answer"))
    }

    /// Lets these accounts launch instances from the image (adds launch permissions; the
    /// image's snapshots need no permission of their own for a launch).
    pub async fn share_image(&self, image_id: &str, accounts: &[String]) -> Result<(), Error> {
        if accounts.is_empty() {
            return Ok(());
        }
        let add: Vec<LaunchPermission> = accounts
            .iter()
            .map(|a| LaunchPermission::builder().user_id(a).build())
            .collect();
        self.client
            .modify_image_attribute()
            .image_id(image_id)
            .launch_permission(
                LaunchPermissionModifications::builder()
                    .set_add(Some(add))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!(
                        "ModifyImageAttribute {image_id} launchPermission add {}",
                        accounts.join(",")
                    ),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }

    /// The account's default KMS key for EBS encryption in this region: `alias/aws/ebs` (the
    /// AWS managed key) unless it was changed, else the key's ARN.
    pub async fn ebs_default_kms_key_id(&self) -> Result<String, Error> {
        let out = self
            .client
            .get_ebs_default_kms_key_id()
            .send()
            .await
            .map_err(|e| self.err("GetEbsDefaultKmsKeyId", e.into_service_error()))?;
        Ok(out
            .kms_key_id()
            .unwrap_or(crate::bake::distribute::AWS_EBS_KEY)
            .to_string())
    }

    /// How these snapshots are encrypted.
    pub async fn snapshot_keys(&self, ids: &[String]) -> Result<Vec<SnapshotKey>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .describe_snapshots()
            .set_snapshot_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeSnapshots {}", ids.join(",")),
                    e.into_service_error(),
                )
            })?;
        Ok(out
            .snapshots()
            .iter()
            .map(|s| SnapshotKey {
                id: s.snapshot_id().unwrap_or_default().to_string(),
                encrypted: s.encrypted().unwrap_or(false),
                kms_key_id: s.kms_key_id().map(str::to_string),
            })
            .collect())
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), Error> {
        self.client
            .delete_snapshot()
            .snapshot_id(id)
            .send()
            .await
            .map_err(|e| self.err(format!("DeleteSnapshot {id}"), e.into_service_error()))?;
        Ok(())
    }
}

/// Whether an image state means "done, successfully".
pub fn image_available(state: &str) -> bool {
    state == ImageState::Available.as_str()
}

/// Whether an image state means it will never become available.
pub fn image_failed(state: &str) -> bool {
    state == ImageState::Failed.as_str()
        || state == ImageState::Error.as_str()
        || state == ImageState::Invalid.as_str()
        || state == ImageState::Deregistered.as_str()
}
