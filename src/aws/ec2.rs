//! The EC2 calls a build makes, each with the context a user needs when it fails.

use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Image, ImageState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, IpPermission, IpRange, ResourceType, ShutdownBehavior, Tag,
    TagSpecification, VolumeType,
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
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
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
    pub tags: Tags,
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

    /// Images matching a name pattern, owned by `owners` (or by this account when empty).
    pub async fn images_named(
        &self,
        pattern: &str,
        owners: &[String],
    ) -> Result<Vec<ImageInfo>, Error> {
        let mut req = self
            .client
            .describe_images()
            .filters(Filter::builder().name("name").values(pattern).build());
        if owners.is_empty() {
            req = req.owners("self");
        } else {
            for o in owners {
                req = req.owners(o);
            }
        }
        let out = req.send().await.map_err(|e| {
            self.err(
                format!("DescribeImages name={pattern}"),
                e.into_service_error(),
            )
        })?;
        Ok(out.images().iter().map(ImageInfo::from).collect())
    }

    /// This account's images carrying `tag=value`.
    pub async fn own_images_tagged(&self, tag: &str, value: &str) -> Result<Vec<ImageInfo>, Error> {
        let out = self
            .client
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name(format!("tag:{tag}"))
                    .values(value)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.err(format!("DescribeImages tag:{tag}"), e.into_service_error()))?;
        Ok(out.images().iter().map(ImageInfo::from).collect())
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

    pub async fn delete_key_pair(&self, name: &str) -> Result<(), Error> {
        self.client
            .delete_key_pair()
            .key_name(name)
            .send()
            .await
            .map_err(|e| self.err(format!("DeleteKeyPair {name}"), e.into_service_error()))?;
        Ok(())
    }

    /// The VPC of a subnet, or the region's default VPC.
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
        let out = self
            .client
            .describe_vpcs()
            .filters(Filter::builder().name("is-default").values("true").build())
            .send()
            .await
            .map_err(|e| self.err("DescribeVpcs (default VPC)", e.into_service_error()))?;
        let v = out.vpcs().first().ok_or_else(|| {
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

    /// A security group that allows SSH from `cidr` only. Returns its id.
    pub async fn create_ssh_security_group(
        &self,
        name: &str,
        vpc_id: &str,
        cidr: &str,
        tags: &Tags,
    ) -> Result<String, Error> {
        let out = self
            .client
            .create_security_group()
            .group_name(name)
            .description("jbake build: SSH from the builder only (temporary)")
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
        let id = out.group_id().unwrap_or_default().to_string();
        self.client
            .authorize_security_group_ingress()
            .group_id(&id)
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
                    format!("AuthorizeSecurityGroupIngress {id}"),
                    e.into_service_error(),
                )
            })
            .map(|_| id)
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
    /// shutdown, tagged instance and volume). Returns its id.
    pub async fn run_instance(&self, l: &Launch) -> Result<String, Error> {
        let mut req = self
            .client
            .run_instances()
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
            .map(|i| InstanceInfo {
                id: id.to_string(),
                state: i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
                public_ip: i.public_ip_address().map(str::to_string),
                private_ip: i.private_ip_address().map(str::to_string),
                vpc_id: i.vpc_id().map(str::to_string),
                tags: tags_of(i.tags()),
            }))
    }

    /// Instances (not terminated) carrying `tag` (any value when `value` is None).
    pub async fn instances_tagged(
        &self,
        tag: &str,
        value: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, Error> {
        let filter = match value {
            Some(v) => Filter::builder()
                .name(format!("tag:{tag}"))
                .values(v)
                .build(),
            None => Filter::builder().name("tag-key").values(tag).build(),
        };
        let out = self
            .client
            .describe_instances()
            .filters(filter)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeInstances tag:{tag}"),
                    e.into_service_error(),
                )
            })?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated))
            .map(|i| InstanceInfo {
                id: i.instance_id().unwrap_or_default().to_string(),
                state: i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
                public_ip: i.public_ip_address().map(str::to_string),
                private_ip: i.private_ip_address().map(str::to_string),
                vpc_id: i.vpc_id().map(str::to_string),
                tags: tags_of(i.tags()),
            })
            .collect())
    }

    /// Key pairs carrying the tag key `tag`: `(name, tags)`.
    pub async fn key_pairs_tagged(&self, tag: &str) -> Result<Vec<(String, Tags)>, Error> {
        let out = self
            .client
            .describe_key_pairs()
            .filters(Filter::builder().name("tag-key").values(tag).build())
            .send()
            .await
            .map_err(|e| self.err("DescribeKeyPairs", e.into_service_error()))?;
        Ok(out
            .key_pairs()
            .iter()
            .map(|k| {
                (
                    k.key_name().unwrap_or_default().to_string(),
                    tags_of(k.tags()),
                )
            })
            .collect())
    }

    /// Security groups carrying the tag key `tag`: `(id, tags)`.
    pub async fn security_groups_tagged(&self, tag: &str) -> Result<Vec<(String, Tags)>, Error> {
        let out = self
            .client
            .describe_security_groups()
            .filters(Filter::builder().name("tag-key").values(tag).build())
            .send()
            .await
            .map_err(|e| self.err("DescribeSecurityGroups", e.into_service_error()))?;
        Ok(out
            .security_groups()
            .iter()
            .map(|g| {
                (
                    g.group_id().unwrap_or_default().to_string(),
                    tags_of(g.tags()),
                )
            })
            .collect())
    }

    /// This account's images carrying the tag key `tag`.
    pub async fn own_images_with_tag_key(&self, tag: &str) -> Result<Vec<ImageInfo>, Error> {
        let out = self
            .client
            .describe_images()
            .owners("self")
            .filters(Filter::builder().name("tag-key").values(tag).build())
            .send()
            .await
            .map_err(|e| self.err("DescribeImages", e.into_service_error()))?;
        Ok(out.images().iter().map(ImageInfo::from).collect())
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
        match self
            .client
            .terminate_instances()
            .instance_ids(id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = self.err(format!("TerminateInstances {id}"), e.into_service_error());
                if e.is_code("InvalidInstanceID.NotFound") {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Creates the image (tagged at creation, so a half-made image is always findable).
    pub async fn create_image(
        &self,
        instance_id: &str,
        name: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<String, Error> {
        let out = self
            .client
            .create_image()
            .instance_id(instance_id)
            .name(name)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Image, tags))
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

    pub async fn create_tags(&self, ids: &[String], tags: &Tags) -> Result<(), Error> {
        if ids.is_empty() {
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

    pub async fn deregister_image(&self, id: &str) -> Result<(), Error> {
        self.client
            .deregister_image()
            .image_id(id)
            .send()
            .await
            .map_err(|e| self.err(format!("DeregisterImage {id}"), e.into_service_error()))?;
        Ok(())
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
