variable "region" {
  description = "The AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Prefix of every name (at most 21 characters)."
  type        = string
  default     = "jenkins"
}

variable "tags" {
  description = "Tags on every resource (provider default_tags)."
  type        = map(string)
  default     = { "jbake:system" = "jenkins" }
}

variable "create_instances" {
  description = "False for the first apply (no controller image yet); true once the controller and agent images are baked."
  type        = bool
  default     = true
}

variable "vpc_cidr" {
  description = "The VPC's range."
  type        = string
  default     = "10.40.0.0/16"
}

variable "single_nat_gateway" {
  description = "One NAT gateway instead of three (see terraform/README.md's cost table)."
  type        = bool
  default     = true
}

variable "certificate_arn" {
  description = "ACM certificate for domain_name, in this region."
  type        = string
}

variable "domain_name" {
  description = "Jenkins' name, e.g. jenkins.example.com."
  type        = string
  default     = null
}

variable "route53_zone_id" {
  description = "Hosted zone of domain_name (null: make the DNS record yourself)."
  type        = string
  default     = null
}

variable "allowed_cidrs" {
  description = "Who may reach Jenkins: the office, the VPN's client range."
  type        = list(string)
}

variable "ssh_cidrs" {
  description = "SSH to the controller from these ranges (bastion, VPN). Empty: Session Manager only."
  type        = list(string)
  default     = []
}

variable "internal_load_balancer" {
  description = "Jenkins only inside the VPC (reached through the VPN: see terraform/README.md)."
  type        = bool
  default     = false
}

variable "controller_image_source" {
  description = "tags, ssm or id (controller module)."
  type        = string
  default     = "tags"
}

variable "agent_image_source" {
  description = "tags, ssm or id (agents module)."
  type        = string
  default     = "tags"
}

variable "require_tested_images" {
  description = "Only images tagged jbake:tested=true."
  type        = bool
  default     = true
}

variable "controller_instance_type" {
  description = "The controller's instance type."
  type        = string
  default     = "t3.medium"
}

variable "agent_instance_type" {
  description = "The agents' instance type."
  type        = string
  default     = "t3.medium"
}

variable "agents_max" {
  description = "Most agents at once."
  type        = number
  default     = 4
}

variable "agent_private_key_parameter" {
  description = "SecureString with the agents' SSH private key (recipes/controller.yaml ssm_agent_key_parameter)."
  type        = string
  default     = "/devops-tools/jenkins/id_rsa"
}

variable "agent_public_key_parameter" {
  description = "Parameter with the controller's SSH public key (recipes/agent.yaml ssm_public_key_parameter)."
  type        = string
  default     = "/devops-tools/jenkins/id_rsa.pub"
}

variable "backup_retention_days" {
  description = "Days each daily backup of JENKINS_HOME is kept."
  type        = number
  default     = 35
}

variable "alarm_emails" {
  description = "Who gets the alarms."
  type        = list(string)
  default     = []
}

variable "operator_role_names" {
  description = "IAM roles that run jbake (nightly bake and roll): they get the operator policies of iam/*.json."
  type        = list(string)
  default     = []
}
