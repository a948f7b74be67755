variable "name" {
  description = "Prefix of every name: group and template <name>-controller, load balancer <name> (at most 21 characters: target group names are limited to 32)."
  type        = string
  default     = "jenkins"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,20}$", var.name))
    error_message = "name: lowercase letters, digits and '-', at most 21 characters."
  }
}

variable "vpc_id" {
  description = "The VPC (network module)."
  type        = string
}

variable "public_subnet_ids" {
  description = "Subnets of the load balancer (network module's public_subnet_ids)."
  type        = list(string)
}

variable "private_subnet_ids" {
  description = "Subnets of the controller (network module's private_subnet_ids): several AZs, so that a roll's successor and a replacement can start in any of them."
  type        = list(string)
}

# ------------------------------------------------------------------ image

variable "create_group" {
  description = "Create the launch template and the Auto Scaling group. False for the first apply, before a controller image has been baked for the EFS: the security groups and the load balancer exist, the controller does not."
  type        = bool
  default     = true
}

variable "image_source" {
  description = "Where the first launch template version's image comes from: tags (the newest jbake controller image for efs_id, see image_recipe and require_tested_image), ssm (resolve:ssm:<image_ssm_parameter>, resolved by EC2 at each launch) or id (image_id). After the first apply jbake roll chooses the image."
  type        = string
  default     = "tags"

  validation {
    condition     = contains(["tags", "ssm", "id"], var.image_source)
    error_message = "image_source is tags, ssm or id."
  }
}

variable "efs_id" {
  description = "The EFS file system holding JENKINS_HOME (efs module). With image_source = tags only an image baked for it (tag jbake:efs-id) is chosen."
  type        = string
}

variable "image_recipe" {
  description = "jbake:recipe tag of the controller images (jbake roll --recipe)."
  type        = string
  default     = "jenkins-controller"
}

variable "require_tested_image" {
  description = "With image_source = tags, choose only images tagged jbake:tested=true."
  type        = bool
  default     = true
}

variable "image_ssm_parameter" {
  description = "With image_source = ssm: the parameter holding the controller image id."
  type        = string
  default     = "/jbake/jenkins-controller/latest"
}

variable "image_id" {
  description = "With image_source = id: the controller image."
  type        = string
  default     = null
}

# ------------------------------------------------------------------ instance

variable "instance_type" {
  description = "The controller's instance type (4 GiB of memory is a sensible minimum for Jenkins)."
  type        = string
  default     = "t3.medium"
}

variable "root_volume_size" {
  description = "Root volume in GiB (at least the image's: jbake's controller recipe bakes 16). JENKINS_HOME is on EFS, not here."
  type        = number
  default     = 16
}

variable "root_device_name" {
  description = "The image's root device (Debian's images: /dev/xvda)."
  type        = string
  default     = "/dev/xvda"
}

variable "ebs_kms_key_arn" {
  description = "KMS key of the root volume. Null: the account's default EBS key (aws/ebs)."
  type        = string
  default     = null
}

variable "instance_profile_name" {
  description = "The controller's instance profile (iam module's controller_instance_profile_name)."
  type        = string
}

variable "key_name" {
  description = "EC2 key pair for SSH from the bastion/VPN range. Null: none (Session Manager still works)."
  type        = string
  default     = null
}

variable "detailed_monitoring" {
  description = "One-minute EC2 metrics."
  type        = bool
  default     = true
}

variable "extra_security_group_ids" {
  description = "More security groups for the controller."
  type        = list(string)
  default     = []
}

variable "efs_security_group_id" {
  description = "The EFS mount targets' security group (efs module): the controller's NFS egress goes to it only."
  type        = string
}

variable "ssh_cidrs" {
  description = "Ranges SSH to the controller is allowed from: the bastion's or the VPN's, never 0.0.0.0/0. Empty: no SSH."
  type        = list(string)
  default     = []

  validation {
    condition     = !contains(var.ssh_cidrs, "0.0.0.0/0")
    error_message = "SSH from anywhere is refused: give the bastion's or VPN's range."
  }
}

# ------------------------------------------------------------------ Jenkins and the health check

variable "jenkins_port" {
  description = "Jenkins' HTTP port on the controller (recipes/controller.yaml jenkins_port)."
  type        = number
  default     = 8080
}

variable "health_check_path" {
  description = "What the load balancer asks Jenkins (jbake roll verifies /login too)."
  type        = string
  default     = "/login"
}

variable "health_check_interval" {
  description = "Seconds between health checks (5-300)."
  type        = number
  default     = 10
}

variable "health_check_timeout" {
  description = "Seconds a health check may take (less than the interval)."
  type        = number
  default     = 5
}

variable "healthy_threshold" {
  description = "Consecutive successes before a target is healthy: with the interval, what a roll adds to the downtime once Jenkins answers (2 x 10 s)."
  type        = number
  default     = 2
}

variable "unhealthy_threshold" {
  description = "Consecutive failures before a target is unhealthy (3 x 10 s)."
  type        = number
  default     = 3
}

variable "deregistration_delay" {
  description = "Seconds the load balancer lets requests to a stopping controller finish; the group waits this long before terminating it, so it adds to every roll."
  type        = number
  default     = 30
}

variable "health_check_grace_period" {
  description = "Seconds after launch before a failing health check replaces the instance: Jenkins' start on a large JENKINS_HOME can take minutes."
  type        = number
  default     = 600
}

# ------------------------------------------------------------------ load balancer

variable "allowed_cidrs" {
  description = "Ranges allowed to reach Jenkins (HTTPS; HTTP is redirected): the office, the VPN's client range. No default: choose."
  type        = list(string)
}

variable "internal" {
  description = "An internal load balancer in the private subnets (Jenkins reachable only through a VPN or peering), instead of an internet-facing one in the public subnets."
  type        = bool
  default     = false
}

variable "certificate_arn" {
  description = "ACM certificate of the HTTPS listener (for domain_name)."
  type        = string
}

variable "ssl_policy" {
  description = "TLS policy of the HTTPS listener: TLS 1.3 and 1.2 with forward secrecy only."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"
}

variable "idle_timeout" {
  description = "Seconds an idle connection is kept (Jenkins' log streaming keeps connections open)."
  type        = number
  default     = 120
}

variable "deletion_protection" {
  description = "Refuse to delete the load balancer (turn off before terraform destroy)."
  type        = bool
  default     = true
}

variable "access_logs_bucket" {
  description = "S3 bucket for the load balancer's access logs (its policy must allow the regional ELB account). Null: no access logs."
  type        = string
  default     = null
}

variable "route53_zone_id" {
  description = "Hosted zone for an alias record domain_name -> load balancer. Null: no record."
  type        = string
  default     = null
}

variable "domain_name" {
  description = "Jenkins' name (jenkins.example.com): the record in route53_zone_id, and the URL in the jenkins_url output."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for every resource (propagated to the instances)."
  type        = map(string)
  default     = {}
}
