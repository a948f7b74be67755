//! Launch template calls for `jbake roll`: read a version, create a copy of it with another AMI,
//! make a version the default.
//!
//! A new version is made by EC2 itself from the version it replaces (`SourceVersion`), with
//! only the changed field in the request (`ImageId`): everything else, including settings this
//! jbake's SDK does not know yet, is EC2's own copy. The new version is then read back and
//! compared field by field (typed equality of the SDK's values, no text): only the ImageId may
//! differ. (moto 5.2.5 ignores `SourceVersion`; the test harness teaches it, see
//! tests/support/moto_server.py.)

use aws_sdk_ec2::types::{
    LaunchTemplateVersion, RequestLaunchTemplateData, ResponseLaunchTemplateData,
};

use super::Error;

/// One version of a launch template.
#[derive(Debug, Clone)]
pub struct TemplateVersion {
    pub template_id: String,
    pub template_name: String,
    pub number: i64,
    pub is_default: bool,
    pub description: Option<String>,
    pub image_id: Option<String>,
    pub data: ResponseLaunchTemplateData,
}

impl TemplateVersion {
    fn from(v: &LaunchTemplateVersion) -> TemplateVersion {
        let data = v
            .launch_template_data()
            .cloned()
            .unwrap_or_else(|| ResponseLaunchTemplateData::builder().build());
        TemplateVersion {
            template_id: v.launch_template_id().unwrap_or_default().to_string(),
            template_name: v.launch_template_name().unwrap_or_default().to_string(),
            number: v.version_number().unwrap_or(0),
            is_default: v.default_version().unwrap_or(false),
            description: v.version_description().map(str::to_string),
            image_id: data.image_id().map(str::to_string),
            data,
        }
    }
}

#[derive(Clone)]
pub struct LaunchTemplates {
    client: aws_sdk_ec2::Client,
    region: String,
}

impl LaunchTemplates {
    pub fn new(client: aws_sdk_ec2::Client, region: &str) -> LaunchTemplates {
        LaunchTemplates {
            client,
            region: region.to_string(),
        }
    }

    fn err<E>(&self, what: impl Into<String>, e: E) -> Error
    where
        E: std::error::Error + aws_smithy_types::error::metadata::ProvideErrorMetadata + 'static,
    {
        Error::new(what, &self.region, e).service("ec2")
    }

    /// One version: a number, `$Latest` or `$Default`.
    pub async fn version(
        &self,
        template_id: &str,
        version: &str,
    ) -> Result<Option<TemplateVersion>, Error> {
        let out = self
            .client
            .describe_launch_template_versions()
            .launch_template_id(template_id)
            .versions(version)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeLaunchTemplateVersions {template_id} version {version}"),
                    e.into_service_error(),
                )
            })?;
        Ok(out
            .launch_template_versions()
            .first()
            .map(TemplateVersion::from))
    }

    /// Every version of the template, newest first (all pages, with the SDK's paginator).
    pub async fn versions(&self, template_id: &str) -> Result<Vec<TemplateVersion>, Error> {
        let mut items = self
            .client
            .describe_launch_template_versions()
            .launch_template_id(template_id)
            .into_paginator()
            .items()
            .send();
        let mut all = Vec::new();
        while let Some(v) = items.next().await {
            let v = v.map_err(|e| {
                self.err(
                    format!("DescribeLaunchTemplateVersions {template_id}"),
                    e.into_service_error(),
                )
            })?;
            all.push(TemplateVersion::from(&v));
        }
        all.sort_by_key(|v| std::cmp::Reverse(v.number));
        Ok(all)
    }

    /// Creates a new version from `from` (EC2 copies its data: `SourceVersion`) with `image_id`
    /// instead of its AMI. Returns the new version number.
    pub async fn create_version_with_image(
        &self,
        from: &TemplateVersion,
        image_id: &str,
        description: &str,
    ) -> Result<i64, Error> {
        let out = self
            .client
            .create_launch_template_version()
            .launch_template_id(&from.template_id)
            .source_version(from.number.to_string())
            .version_description(description)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(image_id)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!(
                        "CreateLaunchTemplateVersion {} from version {}",
                        from.template_id, from.number
                    ),
                    e.into_service_error(),
                )
            })?;
        out.launch_template_version()
            .and_then(|v| v.version_number())
            .ok_or_else(|| {
                Error::other(
                    "CreateLaunchTemplateVersion",
                    &self.region,
                    "no version number in the answer",
                )
            })
    }

    /// Makes `version` the template's default version.
    pub async fn set_default_version(&self, template_id: &str, version: i64) -> Result<(), Error> {
        self.client
            .modify_launch_template()
            .launch_template_id(template_id)
            .default_version(version.to_string())
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("ModifyLaunchTemplate {template_id} default version {version}"),
                    e.into_service_error(),
                )
            })?;
        Ok(())
    }
}

/// Why two instances cannot run from `d` at the same time (a handover runs the old and the new
/// controller side by side): an existing network interface or a fixed private IP address can
/// belong to one instance only.
pub fn handover_blockers(d: &ResponseLaunchTemplateData) -> Vec<String> {
    let mut out = Vec::new();
    for (n, ni) in d.network_interfaces().iter().enumerate() {
        let which = ni
            .device_index()
            .map(|i| format!("network interface {i}"))
            .unwrap_or_else(|| format!("network interface #{}", n + 1));
        if let Some(id) = ni.network_interface_id() {
            out.push(format!("{which} is the existing interface {id}"));
        }
        if let Some(ip) = ni.private_ip_address() {
            out.push(format!("{which} has the fixed private IP address {ip}"));
        }
        for ip in ni.private_ip_addresses() {
            if let Some(a) = ip.private_ip_address() {
                out.push(format!("{which} has the fixed private IP address {a}"));
            }
        }
    }
    out.dedup();
    out
}

/// Compares the named fields of two versions' data by the SDK's typed equality; the API names
/// of those that differ.
macro_rules! differing_fields {
    ($a:expr, $b:expr; $($field:ident => $name:literal),* $(,)?) => {{
        let mut out: Vec<&'static str> = Vec::new();
        $( if $a.$field != $b.$field { out.push($name); } )*
        out
    }};
}

/// The fields (API names) in which two versions' data differ, ignoring ImageId and what EC2
/// reports about a version rather than what it says (the metadata options' `State`).
pub fn differences(a: &ResponseLaunchTemplateData, b: &ResponseLaunchTemplateData) -> Vec<String> {
    let strip = |d: &ResponseLaunchTemplateData| {
        let mut d = d.clone();
        d.image_id = None;
        if let Some(m) = d.metadata_options.as_mut() {
            m.state = None;
        }
        d
    };
    let (a, b) = (strip(a), strip(b));
    if a == b {
        return Vec::new();
    }
    let mut diff = differing_fields!(a, b;
        kernel_id => "KernelId",
        ebs_optimized => "EbsOptimized",
        iam_instance_profile => "IamInstanceProfile",
        block_device_mappings => "BlockDeviceMappings",
        network_interfaces => "NetworkInterfaces",
        instance_type => "InstanceType",
        key_name => "KeyName",
        monitoring => "Monitoring",
        placement => "Placement",
        ram_disk_id => "RamDiskId",
        disable_api_termination => "DisableApiTermination",
        instance_initiated_shutdown_behavior => "InstanceInitiatedShutdownBehavior",
        user_data => "UserData",
        tag_specifications => "TagSpecifications",
        elastic_gpu_specifications => "ElasticGpuSpecifications",
        elastic_inference_accelerators => "ElasticInferenceAccelerators",
        security_group_ids => "SecurityGroupIds",
        security_groups => "SecurityGroups",
        instance_market_options => "InstanceMarketOptions",
        credit_specification => "CreditSpecification",
        cpu_options => "CpuOptions",
        capacity_reservation_specification => "CapacityReservationSpecification",
        license_specifications => "LicenseSpecifications",
        hibernation_options => "HibernationOptions",
        metadata_options => "MetadataOptions",
        enclave_options => "EnclaveOptions",
        instance_requirements => "InstanceRequirements",
        private_dns_name_options => "PrivateDnsNameOptions",
        maintenance_options => "MaintenanceOptions",
        disable_api_stop => "DisableApiStop",
        operator => "Operator",
        network_performance_options => "NetworkPerformanceOptions",
        secondary_interfaces => "SecondaryInterfaces",
    )
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    if diff.is_empty() {
        // A field newer than the list above.
        diff.push("a field this jbake does not name".to_string());
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{
        InstanceType, LaunchTemplateBlockDeviceMapping, LaunchTemplateEbsBlockDevice,
        LaunchTemplateHttpTokensState, LaunchTemplateInstanceMetadataOptions,
        LaunchTemplateInstanceNetworkInterfaceSpecification, LaunchTemplateTagSpecification,
        PrivateIpAddressSpecification, ResourceType, Tag, VolumeType,
    };

    fn full() -> ResponseLaunchTemplateData {
        ResponseLaunchTemplateData::builder()
            .image_id("ami-00000000000000001")
            .instance_type(InstanceType::T3Small)
            .key_name("ops")
            .user_data("I2Nsb3VkLWNvbmZpZwo=")
            .security_group_ids("sg-1")
            .ebs_optimized(true)
            .block_device_mappings(
                LaunchTemplateBlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(
                        LaunchTemplateEbsBlockDevice::builder()
                            .volume_size(16)
                            .volume_type(VolumeType::Gp3)
                            .encrypted(true)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(
                LaunchTemplateTagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("Name").value("jenkins").build())
                    .build(),
            )
            .metadata_options(
                LaunchTemplateInstanceMetadataOptions::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .http_put_response_hop_limit(2)
                    .build(),
            )
            .build()
    }

    #[test]
    fn differences_ignore_the_image_and_name_the_fields_by_typed_equality() {
        let a = full();
        let mut b = full();
        b.image_id = Some("ami-2".into());
        assert!(differences(&a, &b).is_empty());
        if let Some(m) = b.metadata_options.as_mut() {
            m.state = Some(aws_sdk_ec2::types::LaunchTemplateInstanceMetadataOptionsState::Pending);
        }
        assert!(differences(&a, &b).is_empty());
        // UserData is redacted by Debug, compared by value here.
        b.user_data = Some("I2Nsb3VkLWNvbmZpZwp4Cg==".into());
        assert_eq!(differences(&a, &b), ["UserData"]);
        b.user_data = None;
        b.key_name = None;
        assert_eq!(differences(&a, &b), ["KeyName", "UserData"]);
        // A nested value: the volume size inside the block device mapping.
        let mut c = full();
        c.block_device_mappings.as_mut().expect("mappings")[0]
            .ebs
            .as_mut()
            .expect("ebs")
            .volume_size = Some(32);
        assert_eq!(differences(&a, &c), ["BlockDeviceMappings"]);
    }

    #[test]
    fn a_fixed_interface_or_address_blocks_a_handover() {
        assert!(handover_blockers(&full()).is_empty());
        let mut d = full();
        d.network_interfaces = Some(vec![
            LaunchTemplateInstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .network_interface_id("eni-1")
                .build(),
            LaunchTemplateInstanceNetworkInterfaceSpecification::builder()
                .device_index(1)
                .private_ip_addresses(
                    PrivateIpAddressSpecification::builder()
                        .private_ip_address("10.0.0.5")
                        .build(),
                )
                .build(),
        ]);
        assert_eq!(
            handover_blockers(&d),
            [
                "network interface 0 is the existing interface eni-1",
                "network interface 1 has the fixed private IP address 10.0.0.5"
            ]
        );
    }
}
