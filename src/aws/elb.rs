//! The Elastic Load Balancing (v2) calls `jbake roll` and `jbake status` make: read-only.
//! Target groups come with their health check settings (they set how long a roll's switch-over
//! takes), targets with the reason of their state (a successor waiting for the JENKINS_HOME lease
//! answers 503: `unhealthy`, `Target.ResponseCodeMismatch`).

use super::Error;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetGroupInfo {
    pub arn: String,
    pub name: String,
    pub port: Option<i32>,
    pub load_balancer_arns: Vec<String>,
    pub health_check: HealthCheck,
}

/// A target group's health check: how fast a target is found healthy or unhealthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub interval_secs: Option<i32>,
    pub timeout_secs: Option<i32>,
    pub healthy_threshold: Option<i32>,
    pub unhealthy_threshold: Option<i32>,
    /// The HTTP codes counted as healthy (`200`, `200-399`).
    pub matcher: Option<String>,
}

impl HealthCheck {
    /// Seconds from a target's first good answer until it is healthy (at most), and from its
    /// last good answer until it is unhealthy: threshold × interval.
    pub fn delays(&self) -> Option<(i64, i64)> {
        let i = i64::from(self.interval_secs?);
        Some((
            i.checked_mul(i64::from(self.healthy_threshold?))?,
            i.checked_mul(i64::from(self.unhealthy_threshold?))?,
        ))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadBalancerInfo {
    pub arn: String,
    pub name: String,
    pub dns_name: String,
    /// `(protocol, port)` of each listener.
    pub listeners: Vec<(String, i32)>,
}

impl LoadBalancerInfo {
    /// The URL Jenkins answers on through this load balancer: HTTPS if it listens on it.
    pub fn url(&self) -> String {
        let pick = self
            .listeners
            .iter()
            .find(|(p, _)| p == "HTTPS")
            .or_else(|| self.listeners.iter().find(|(p, _)| p == "HTTP"));
        match pick {
            Some((p, 443)) if p == "HTTPS" => format!("https://{}", self.dns_name),
            Some((p, port)) if p == "HTTPS" => format!("https://{}:{port}", self.dns_name),
            Some((_, 80)) | None => format!("http://{}", self.dns_name),
            Some((_, port)) => format!("http://{}:{port}", self.dns_name),
        }
    }
}

/// The health of one registered target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetHealth {
    pub id: String,
    pub port: Option<i32>,
    /// `initial`, `healthy`, `unhealthy`, `unused`, `draining`, `unavailable`.
    pub state: String,
    pub reason: Option<String>,
    pub description: Option<String>,
}

#[derive(Clone)]
pub struct Elb {
    client: aws_sdk_elasticloadbalancingv2::Client,
    region: String,
}

impl Elb {
    pub fn new(client: aws_sdk_elasticloadbalancingv2::Client, region: &str) -> Elb {
        Elb {
            client,
            region: region.to_string(),
        }
    }

    fn err<E>(&self, what: impl Into<String>, e: E) -> Error
    where
        E: std::error::Error + aws_smithy_types::error::metadata::ProvideErrorMetadata + 'static,
    {
        Error::new(what, &self.region, e).service("elasticloadbalancing")
    }

    pub async fn target_groups(&self, arns: &[String]) -> Result<Vec<TargetGroupInfo>, Error> {
        if arns.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .describe_target_groups()
            .set_target_group_arns(Some(arns.to_vec()))
            .send()
            .await
            .map_err(|e| self.err("DescribeTargetGroups", e.into_service_error()))?;
        Ok(out
            .target_groups()
            .iter()
            .map(|t| TargetGroupInfo {
                arn: t.target_group_arn().unwrap_or_default().to_string(),
                name: t.target_group_name().unwrap_or_default().to_string(),
                port: t.port(),
                load_balancer_arns: t.load_balancer_arns().to_vec(),
                health_check: HealthCheck {
                    path: t.health_check_path().map(str::to_string),
                    interval_secs: t.health_check_interval_seconds(),
                    timeout_secs: t.health_check_timeout_seconds(),
                    healthy_threshold: t.healthy_threshold_count(),
                    unhealthy_threshold: t.unhealthy_threshold_count(),
                    matcher: t.matcher().and_then(|m| m.http_code()).map(str::to_string),
                },
            })
            .collect())
    }

    pub async fn load_balancers(&self, arns: &[String]) -> Result<Vec<LoadBalancerInfo>, Error> {
        if arns.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .describe_load_balancers()
            .set_load_balancer_arns(Some(arns.to_vec()))
            .send()
            .await
            .map_err(|e| self.err("DescribeLoadBalancers", e.into_service_error()))?;
        let mut found = Vec::new();
        for lb in out.load_balancers() {
            let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
            let listeners = self
                .client
                .describe_listeners()
                .load_balancer_arn(&arn)
                .send()
                .await
                .map_err(|e| {
                    self.err(format!("DescribeListeners {arn}"), e.into_service_error())
                })?;
            found.push(LoadBalancerInfo {
                name: lb.load_balancer_name().unwrap_or_default().to_string(),
                dns_name: lb.dns_name().unwrap_or_default().to_string(),
                listeners: listeners
                    .listeners()
                    .iter()
                    .map(|l| {
                        (
                            l.protocol()
                                .map(|p| p.as_str().to_string())
                                .unwrap_or_default(),
                            l.port().unwrap_or(0),
                        )
                    })
                    .collect(),
                arn,
            });
        }
        Ok(found)
    }

    /// The health of every target registered in the group (filter by instance id yourself:
    /// a terminated instance's target can linger and report healthy).
    pub async fn target_health(&self, target_group_arn: &str) -> Result<Vec<TargetHealth>, Error> {
        let out = self
            .client
            .describe_target_health()
            .target_group_arn(target_group_arn)
            .send()
            .await
            .map_err(|e| {
                self.err(
                    format!("DescribeTargetHealth {target_group_arn}"),
                    e.into_service_error(),
                )
            })?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .map(|d| TargetHealth {
                id: d
                    .target()
                    .and_then(|t| t.id())
                    .map(str::to_string)
                    .unwrap_or_default(),
                port: d.target().and_then(|t| t.port()),
                state: d
                    .target_health()
                    .and_then(|h| h.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                reason: d
                    .target_health()
                    .and_then(|h| h.reason())
                    .map(|r| r.as_str().to_string()),
                description: d
                    .target_health()
                    .and_then(|h| h.description())
                    .map(str::to_string),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(listeners: &[(&str, i32)]) -> LoadBalancerInfo {
        LoadBalancerInfo {
            arn: "arn".into(),
            name: "jenkins".into(),
            dns_name: "jenkins-1.elb.amazonaws.com".into(),
            listeners: listeners.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn jenkins_url_prefers_https() {
        assert_eq!(
            lb(&[("HTTP", 80)]).url(),
            "http://jenkins-1.elb.amazonaws.com"
        );
        assert_eq!(
            lb(&[("HTTP", 80), ("HTTPS", 443)]).url(),
            "https://jenkins-1.elb.amazonaws.com"
        );
        assert_eq!(
            lb(&[("HTTP", 8080)]).url(),
            "http://jenkins-1.elb.amazonaws.com:8080"
        );
        assert_eq!(lb(&[]).url(), "http://jenkins-1.elb.amazonaws.com");
    }
}
