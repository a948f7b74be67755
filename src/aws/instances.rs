//! EC2's own view of instances for `jbake roll`: the AMI an instance really runs (the Auto
//! Scaling group's view of an instance's launch template version can be stale).

use super::Error;

#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceImage {
    pub id: String,
    pub image_id: String,
    /// `pending`, `running`, `stopped`, …
    pub state: String,
}

#[derive(Clone)]
pub struct Instances {
    client: aws_sdk_ec2::Client,
    region: String,
}

impl Instances {
    pub fn new(client: aws_sdk_ec2::Client, region: &str) -> Instances {
        Instances {
            client,
            region: region.to_string(),
        }
    }

    /// The given instances (those EC2 no longer knows are left out).
    pub async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceImage>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| {
                Error::new(
                    format!("DescribeInstances {}", ids.join(",")),
                    &self.region,
                    e.into_service_error(),
                )
                .service("ec2")
            })?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| InstanceImage {
                id: i.instance_id().unwrap_or_default().to_string(),
                image_id: i.image_id().unwrap_or_default().to_string(),
                state: i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
            })
            .collect())
    }
}
