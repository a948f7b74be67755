//! SSM parameters that publish an image id (`jbake build --publish-ssm`): a `String` parameter
//! of data type `aws:ec2:image`, which EC2 launch templates (`resolve:ssm:NAME`), CloudFormation
//! (`AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>`) and Terraform (`aws_ssm_parameter`) read.
//!
//! With that data type SSM checks the value is an AMI the account can use, asynchronously: the
//! new version is confirmed by reading it back ([`Params::get`]).

use super::Error;

/// The data type that makes SSM check the value is an image id.
pub const IMAGE_DATA_TYPE: &str = "aws:ec2:image";

/// A parameter's value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub value: String,
    pub version: i64,
}

#[derive(Clone)]
pub struct Params {
    client: aws_sdk_ssm::Client,
    region: String,
}

impl Params {
    pub fn new(client: aws_sdk_ssm::Client, region: &str) -> Params {
        Params {
            client,
            region: region.to_string(),
        }
    }

    /// The parameter (its latest version, or `name:VERSION`); `None` when it does not exist.
    pub async fn get(&self, name: &str) -> Result<Option<Param>, Error> {
        match self.client.get_parameter().name(name).send().await {
            Ok(out) => Ok(out.parameter().map(|p| Param {
                value: p.value().unwrap_or_default().to_string(),
                version: p.version(),
            })),
            Err(e) => {
                let e = e.into_service_error();
                if e.is_parameter_not_found() || e.is_parameter_version_not_found() {
                    Ok(None)
                } else {
                    Err(
                        Error::new(format!("reading SSM parameter {name}"), &self.region, e)
                            .action("ssm:GetParameter"),
                    )
                }
            }
        }
    }

    /// Writes `image_id` as the parameter's new version (data type `aws:ec2:image`, overwriting);
    /// returns the version SSM gave it.
    pub async fn put_image(
        &self,
        name: &str,
        image_id: &str,
        description: &str,
    ) -> Result<i64, Error> {
        let out = self
            .client
            .put_parameter()
            .name(name)
            .value(image_id)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type(IMAGE_DATA_TYPE)
            .description(description)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| {
                Error::new(
                    format!("writing SSM parameter {name}"),
                    &self.region,
                    e.into_service_error(),
                )
                .action("ssm:PutParameter")
            })?;
        Ok(out.version())
    }

    /// Deletes the parameter (nothing to do when it does not exist).
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        match self.client.delete_parameter().name(name).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = e.into_service_error();
                if e.is_parameter_not_found() {
                    Ok(())
                } else {
                    Err(
                        Error::new(format!("deleting SSM parameter {name}"), &self.region, e)
                            .action("ssm:DeleteParameter"),
                    )
                }
            }
        }
    }
}
