//! KMS, read only: which key a region's copies are encrypted with, whether it exists there and
//! is enabled, and whether it is an AWS managed key (`aws/ebs`), whose key policy cannot let
//! another account use it — an image encrypted with it cannot be shared.

use aws_sdk_kms::types::{KeyManagerType, KeyState};

use super::Error;

/// Who manages a key: AWS (`alias/aws/ebs` and the other `aws/…` keys; their policy cannot be
/// changed) or the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Manager {
    Aws,
    Customer,
}

/// A key, as jbake needs it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub arn: String,
    pub manager: Manager,
    /// `Enabled`, `Disabled`, `PendingDeletion`, …
    pub state: String,
}

impl KeyInfo {
    pub fn usable(&self) -> bool {
        self.state == KeyState::Enabled.as_str()
    }
}

#[derive(Clone)]
pub struct Kms {
    client: aws_sdk_kms::Client,
    region: String,
}

impl Kms {
    pub fn new(client: aws_sdk_kms::Client, region: &str) -> Kms {
        Kms {
            client,
            region: region.to_string(),
        }
    }

    /// The key `key` names (a key id, key ARN, `alias/NAME` or alias ARN) in this region;
    /// `None` when KMS knows no such key here.
    pub async fn describe(&self, key: &str) -> Result<Option<KeyInfo>, Error> {
        let out = match self.client.describe_key().key_id(key).send().await {
            Ok(out) => out,
            Err(e) => {
                let e = e.into_service_error();
                if e.is_not_found_exception() {
                    return Ok(None);
                }
                return Err(
                    Error::new(format!("DescribeKey {key}"), &self.region, e).service("kms")
                );
            }
        };
        let Some(m) = out.key_metadata() else {
            return Ok(None);
        };
        Ok(Some(KeyInfo {
            arn: m.arn().unwrap_or(m.key_id()).to_string(),
            manager: match m.key_manager() {
                Some(KeyManagerType::Aws) => Manager::Aws,
                _ => Manager::Customer,
            },
            state: m
                .key_state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
        }))
    }
}
