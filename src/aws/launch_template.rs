//! Launch template calls for `jbake roll`: read a version, create a copy of it with another AMI,
//! make a version the default.
//!
//! A new version is written from ALL the data of the version it replaces, copied field by field
//! (`SourceVersion` alone is not relied on: moto ignores it, and a copy we make ourselves can be
//! checked). A field jbake cannot copy yet makes it refuse before writing anything, and after
//! writing, the new version is read back and compared with the old one: only the ImageId may
//! differ.

use aws_sdk_ec2::types::{
    CapacityReservationTarget, CreditSpecificationRequest, LaunchTemplateBlockDeviceMappingRequest,
    LaunchTemplateCapacityReservationSpecificationRequest, LaunchTemplateCpuOptionsRequest,
    LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateEnclaveOptionsRequest,
    LaunchTemplateHibernationOptionsRequest, LaunchTemplateIamInstanceProfileSpecificationRequest,
    LaunchTemplateInstanceMaintenanceOptionsRequest, LaunchTemplateInstanceMarketOptionsRequest,
    LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest,
    LaunchTemplateLicenseConfigurationRequest, LaunchTemplateNetworkPerformanceOptionsRequest,
    LaunchTemplatePlacementRequest, LaunchTemplatePrivateDnsNameOptionsRequest,
    LaunchTemplateSpotMarketOptionsRequest, LaunchTemplateTagSpecificationRequest,
    LaunchTemplateVersion, LaunchTemplatesMonitoringRequest, RequestLaunchTemplateData,
    ResponseLaunchTemplateData,
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

    /// Every version of the template, newest first (all pages).
    pub async fn versions(&self, template_id: &str) -> Result<Vec<TemplateVersion>, Error> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_launch_template_versions()
                .launch_template_id(template_id)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| {
                    self.err(
                        format!("DescribeLaunchTemplateVersions {template_id}"),
                        e.into_service_error(),
                    )
                })?;
            all.extend(
                out.launch_template_versions()
                    .iter()
                    .map(TemplateVersion::from),
            );
            match out.next_token() {
                Some(t) if !t.is_empty() && Some(t) != token.as_deref() => {
                    token = Some(t.to_string())
                }
                _ => break,
            }
        }
        all.sort_by_key(|v| std::cmp::Reverse(v.number));
        Ok(all)
    }

    /// Creates a new version holding all of `from`'s data with `image_id` instead of its AMI.
    /// Returns the new version number.
    pub async fn create_version_with_image(
        &self,
        from: &TemplateVersion,
        image_id: &str,
        description: &str,
    ) -> Result<i64, Error> {
        let data = request_data(&from.data, image_id).map_err(|fields| {
            Error::other(
                format!(
                    "copying launch template {} version {}",
                    from.template_id, from.number
                ),
                &self.region,
                format!(
                    "it uses {}, which jbake cannot copy yet; nothing was changed (update the \
                     launch template by hand, or remove those settings)",
                    fields.join(", ")
                ),
            )
        })?;
        let out = self
            .client
            .create_launch_template_version()
            .launch_template_id(&from.template_id)
            // Also the real API's own copy; the data above is complete without it.
            .source_version(from.number.to_string())
            .version_description(description)
            .launch_template_data(data)
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

/// The fields of `data` that [`request_data`] does not copy and that are set: a copy would
/// silently lose them.
pub fn uncopied_fields(d: &ResponseLaunchTemplateData) -> Vec<&'static str> {
    let mut out = Vec::new();
    if !d.elastic_gpu_specifications().is_empty() {
        out.push("ElasticGpuSpecifications");
    }
    if !d.elastic_inference_accelerators().is_empty() {
        out.push("ElasticInferenceAccelerators");
    }
    if d.instance_requirements().is_some() {
        out.push("InstanceRequirements");
    }
    if d.operator().is_some() {
        out.push("Operator");
    }
    if !d.secondary_interfaces().is_empty() {
        out.push("SecondaryInterfaces");
    }
    if let Some(c) = d.cpu_options() {
        if c.amd_sev_snp().is_some() || c.nested_virtualization().is_some() {
            out.push("CpuOptions.AmdSevSnp/NestedVirtualization");
        }
    }
    for ni in d.network_interfaces() {
        if !ni.ipv6_addresses().is_empty()
            || ni.ipv6_address_count().is_some()
            || !ni.ipv4_prefixes().is_empty()
            || ni.ipv4_prefix_count().is_some()
            || !ni.ipv6_prefixes().is_empty()
            || ni.ipv6_prefix_count().is_some()
            || ni.primary_ipv6().is_some()
            || ni.ena_srd_specification().is_some()
            || ni.connection_tracking_specification().is_some()
        {
            out.push("NetworkInterfaces IPv6/prefix/ENA Express/connection tracking settings");
            break;
        }
    }
    out
}

/// The request that recreates `d` with `image_id` as its AMI. Err: the fields it cannot copy.
pub fn request_data(
    d: &ResponseLaunchTemplateData,
    image_id: &str,
) -> Result<RequestLaunchTemplateData, Vec<&'static str>> {
    let missing = uncopied_fields(d);
    if !missing.is_empty() {
        return Err(missing);
    }
    let s = |o: Option<&str>| o.map(str::to_string);
    let list = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
    let b = RequestLaunchTemplateData::builder()
        .image_id(image_id)
        .set_kernel_id(s(d.kernel_id()))
        .set_ebs_optimized(d.ebs_optimized())
        .set_iam_instance_profile(d.iam_instance_profile().map(|p| {
            LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .set_arn(s(p.arn()))
                .set_name(s(p.name()))
                .build()
        }))
        .set_block_device_mappings((!d.block_device_mappings().is_empty()).then(|| {
            d.block_device_mappings()
                .iter()
                .map(|m| {
                    LaunchTemplateBlockDeviceMappingRequest::builder()
                        .set_device_name(s(m.device_name()))
                        .set_virtual_name(s(m.virtual_name()))
                        .set_no_device(s(m.no_device()))
                        .set_ebs(m.ebs().map(|e| {
                            LaunchTemplateEbsBlockDeviceRequest::builder()
                                .set_encrypted(e.encrypted())
                                .set_delete_on_termination(e.delete_on_termination())
                                .set_iops(e.iops())
                                .set_kms_key_id(s(e.kms_key_id()))
                                .set_snapshot_id(s(e.snapshot_id()))
                                .set_volume_size(e.volume_size())
                                .set_volume_type(e.volume_type().cloned())
                                .set_throughput(e.throughput())
                                .set_volume_initialization_rate(e.volume_initialization_rate())
                                .set_ebs_card_index(e.ebs_card_index())
                                .build()
                        }))
                        .build()
                })
                .collect()
        }))
        .set_network_interfaces((!d.network_interfaces().is_empty()).then(|| {
            d.network_interfaces()
                .iter()
                .map(|n| {
                    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                        .set_associate_carrier_ip_address(n.associate_carrier_ip_address())
                        .set_associate_public_ip_address(n.associate_public_ip_address())
                        .set_delete_on_termination(n.delete_on_termination())
                        .set_description(s(n.description()))
                        .set_device_index(n.device_index())
                        .set_groups(list(n.groups()))
                        .set_interface_type(s(n.interface_type()))
                        .set_network_interface_id(s(n.network_interface_id()))
                        .set_private_ip_address(s(n.private_ip_address()))
                        .set_private_ip_addresses(
                            (!n.private_ip_addresses().is_empty())
                                .then(|| n.private_ip_addresses().to_vec()),
                        )
                        .set_secondary_private_ip_address_count(
                            n.secondary_private_ip_address_count(),
                        )
                        .set_subnet_id(s(n.subnet_id()))
                        .set_network_card_index(n.network_card_index())
                        .set_ena_queue_count(n.ena_queue_count())
                        .build()
                })
                .collect()
        }))
        .set_instance_type(d.instance_type().cloned())
        .set_key_name(s(d.key_name()))
        .set_monitoring(d.monitoring().map(|m| {
            LaunchTemplatesMonitoringRequest::builder()
                .set_enabled(m.enabled())
                .build()
        }))
        .set_placement(d.placement().map(|p| {
            LaunchTemplatePlacementRequest::builder()
                .set_availability_zone(s(p.availability_zone()))
                .set_availability_zone_id(s(p.availability_zone_id()))
                .set_affinity(s(p.affinity()))
                .set_group_name(s(p.group_name()))
                .set_host_id(s(p.host_id()))
                .set_tenancy(p.tenancy().cloned())
                .set_spread_domain(s(p.spread_domain()))
                .set_host_resource_group_arn(s(p.host_resource_group_arn()))
                .set_partition_number(p.partition_number())
                .set_group_id(s(p.group_id()))
                .build()
        }))
        .set_ram_disk_id(s(d.ram_disk_id()))
        .set_disable_api_termination(d.disable_api_termination())
        .set_instance_initiated_shutdown_behavior(d.instance_initiated_shutdown_behavior().cloned())
        .set_user_data(s(d.user_data()))
        .set_tag_specifications((!d.tag_specifications().is_empty()).then(|| {
            d.tag_specifications()
                .iter()
                .map(|t| {
                    LaunchTemplateTagSpecificationRequest::builder()
                        .set_resource_type(t.resource_type().cloned())
                        .set_tags(Some(t.tags().to_vec()))
                        .build()
                })
                .collect()
        }))
        .set_security_group_ids(list(d.security_group_ids()))
        .set_security_groups(list(d.security_groups()))
        .set_instance_market_options(d.instance_market_options().map(|m| {
            LaunchTemplateInstanceMarketOptionsRequest::builder()
                .set_market_type(m.market_type().cloned())
                .set_spot_options(m.spot_options().map(|o| {
                    LaunchTemplateSpotMarketOptionsRequest::builder()
                        .set_max_price(s(o.max_price()))
                        .set_spot_instance_type(o.spot_instance_type().cloned())
                        .set_block_duration_minutes(o.block_duration_minutes())
                        .set_valid_until(o.valid_until().cloned())
                        .set_instance_interruption_behavior(
                            o.instance_interruption_behavior().cloned(),
                        )
                        .build()
                }))
                .build()
        }))
        .set_credit_specification(d.credit_specification().map(|c| {
            CreditSpecificationRequest::builder()
                .set_cpu_credits(s(c.cpu_credits()))
                .build()
        }))
        .set_cpu_options(d.cpu_options().map(|c| {
            LaunchTemplateCpuOptionsRequest::builder()
                .set_core_count(c.core_count())
                .set_threads_per_core(c.threads_per_core())
                .build()
        }))
        .set_capacity_reservation_specification(d.capacity_reservation_specification().map(|c| {
            LaunchTemplateCapacityReservationSpecificationRequest::builder()
                .set_capacity_reservation_preference(c.capacity_reservation_preference().cloned())
                .set_capacity_reservation_target(c.capacity_reservation_target().map(|t| {
                    CapacityReservationTarget::builder()
                        .set_capacity_reservation_id(s(t.capacity_reservation_id()))
                        .set_capacity_reservation_resource_group_arn(s(
                            t.capacity_reservation_resource_group_arn()
                        ))
                        .build()
                }))
                .build()
        }))
        .set_license_specifications((!d.license_specifications().is_empty()).then(|| {
            d.license_specifications()
                .iter()
                .map(|l| {
                    LaunchTemplateLicenseConfigurationRequest::builder()
                        .set_license_configuration_arn(s(l.license_configuration_arn()))
                        .build()
                })
                .collect()
        }))
        .set_hibernation_options(d.hibernation_options().map(|h| {
            LaunchTemplateHibernationOptionsRequest::builder()
                .set_configured(h.configured())
                .build()
        }))
        .set_metadata_options(d.metadata_options().map(|m| {
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .set_http_tokens(m.http_tokens().cloned())
                .set_http_put_response_hop_limit(m.http_put_response_hop_limit())
                .set_http_endpoint(m.http_endpoint().cloned())
                .set_http_protocol_ipv6(m.http_protocol_ipv6().cloned())
                .set_instance_metadata_tags(m.instance_metadata_tags().cloned())
                .build()
        }))
        .set_enclave_options(d.enclave_options().map(|e| {
            LaunchTemplateEnclaveOptionsRequest::builder()
                .set_enabled(e.enabled())
                .build()
        }))
        .set_private_dns_name_options(d.private_dns_name_options().map(|p| {
            LaunchTemplatePrivateDnsNameOptionsRequest::builder()
                .set_hostname_type(p.hostname_type().cloned())
                .set_enable_resource_name_dns_a_record(p.enable_resource_name_dns_a_record())
                .set_enable_resource_name_dns_aaaa_record(p.enable_resource_name_dns_aaaa_record())
                .build()
        }))
        .set_maintenance_options(d.maintenance_options().map(|m| {
            LaunchTemplateInstanceMaintenanceOptionsRequest::builder()
                .set_auto_recovery(m.auto_recovery().cloned())
                .build()
        }))
        .set_disable_api_stop(d.disable_api_stop())
        .set_network_performance_options(d.network_performance_options().map(|n| {
            LaunchTemplateNetworkPerformanceOptionsRequest::builder()
                .set_bandwidth_weighting(n.bandwidth_weighting().cloned())
                .build()
        }));
    Ok(b.build())
}

/// The top-level fields in which two versions' data differ, ignoring ImageId.
pub fn differences(a: &ResponseLaunchTemplateData, b: &ResponseLaunchTemplateData) -> Vec<String> {
    let strip = |d: &ResponseLaunchTemplateData| {
        let mut d = d.clone();
        d.image_id = None;
        // Output only (pending/applied), not part of what a version says.
        if let Some(m) = d.metadata_options.as_mut() {
            m.state = None;
        }
        d
    };
    // Debug redacts UserData (sensitive): compare it by value.
    let user_data_differs = a.user_data() != b.user_data();
    let (a, b) = (strip(a), strip(b));
    if format!("{a:?}") == format!("{b:?}") {
        return if user_data_differs {
            vec!["user_data".to_string()]
        } else {
            Vec::new()
        };
    }
    // Debug prints `Name { field: value, … }`; compare field by field for a useful message.
    let fields = |d: &ResponseLaunchTemplateData| -> Vec<(String, String)> {
        let text = format!("{d:#?}");
        let mut out: Vec<(String, String)> = Vec::new();
        for line in text.lines().skip(1) {
            if let Some(rest) = line.strip_prefix("    ") {
                if !rest.starts_with(' ') {
                    if let Some((k, v)) = rest.split_once(": ") {
                        out.push((k.to_string(), v.to_string()));
                        continue;
                    }
                }
            }
            if let Some(last) = out.last_mut() {
                last.1.push_str(line.trim());
            }
        }
        out
    };
    let (fa, fb) = (fields(&a), fields(&b));
    let mut diff: Vec<String> = fa
        .iter()
        .filter(|(k, v)| fb.iter().find(|(k2, _)| k2 == k).map(|(_, v2)| v2) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    if user_data_differs && !diff.iter().any(|k| k == "user_data") {
        diff.push("user_data".to_string());
    }
    if diff.is_empty() {
        diff.push("(unknown)".to_string());
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{
        InstanceType, LaunchTemplateBlockDeviceMapping, LaunchTemplateEbsBlockDevice,
        LaunchTemplateHttpTokensState, LaunchTemplateInstanceMetadataOptions,
        LaunchTemplateTagSpecification, ResourceType, Tag, VolumeType,
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
    fn the_copy_keeps_everything_but_the_ami_and_carries_user_data() {
        let r = request_data(&full(), "ami-00000000000000002").expect("copyable");
        assert_eq!(r.image_id(), Some("ami-00000000000000002"));
        assert_eq!(r.user_data(), Some("I2Nsb3VkLWNvbmZpZwo="));
        assert_eq!(r.key_name(), Some("ops"));
        assert_eq!(r.instance_type(), Some(&InstanceType::T3Small));
        assert_eq!(r.security_group_ids(), ["sg-1"]);
        assert_eq!(r.ebs_optimized(), Some(true));
        let ebs = r.block_device_mappings()[0].ebs().expect("ebs");
        assert_eq!(ebs.volume_size(), Some(16));
        assert_eq!(ebs.encrypted(), Some(true));
        assert_eq!(r.tag_specifications()[0].tags()[0].value(), Some("jenkins"));
        assert_eq!(
            r.metadata_options()
                .and_then(|m| m.http_put_response_hop_limit()),
            Some(2)
        );
    }

    #[test]
    fn refuses_what_it_cannot_copy() {
        let mut d = full();
        d.instance_requirements = Some(aws_sdk_ec2::types::InstanceRequirements::builder().build());
        assert_eq!(
            request_data(&d, "ami-1").err(),
            Some(vec!["InstanceRequirements"])
        );
    }

    #[test]
    fn differences_ignore_the_image_and_name_the_field() {
        let a = full();
        let mut b = full();
        b.image_id = Some("ami-2".into());
        assert!(differences(&a, &b).is_empty());
        if let Some(m) = b.metadata_options.as_mut() {
            m.state = Some(aws_sdk_ec2::types::LaunchTemplateInstanceMetadataOptionsState::Pending);
        }
        assert!(differences(&a, &b).is_empty());
        b.user_data = None;
        assert_eq!(differences(&a, &b), ["user_data"]);
        b.key_name = None;
        assert_eq!(differences(&a, &b), ["key_name", "user_data"]);
    }
}
