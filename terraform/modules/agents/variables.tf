variable "name" {
  description = "Prefix of every name: group <name>-agents, template <name>-agent."
  type        = string
  default     = "jenkins"
}

variable "vpc_id" {
  description = "The VPC (network module)."
  type        = string
}

variable "private_subnet_ids" {
  description = "The agents' subnets (network module's private_subnet_ids)."
  type        = list(string)
}

variable "controller_security_group_id" {
  description = "The controller's security group (controller module): the only SSH source."
  type        = string
}

variable "instance_profile_name" {
  description = "The agents' instance profile (iam module's agent_instance_profile_name)."
  type        = string
}

variable "image_source" {
  description = "tags (the newest jbake agent image, see image_recipe and require_tested_image), ssm (resolve:ssm:<image_ssm_parameter>, at each launch) or id (image_id)."
  type        = string
  default     = "tags"

  validation {
    condition     = contains(["tags", "ssm", "id"], var.image_source)
    error_message = "image_source is tags, ssm or id."
  }
}

variable "image_recipe" {
  description = "jbake:recipe tag of the agent images."
  type        = string
  default     = "jenkins-agent"
}

variable "require_tested_image" {
  description = "With image_source = tags, choose only images tagged jbake:tested=true."
  type        = bool
  default     = true
}

variable "image_ssm_parameter" {
  description = "With image_source = ssm: the parameter holding the agent image id."
  type        = string
  default     = "/jbake/jenkins-agent/latest"
}

variable "image_id" {
  description = "With image_source = id: the agent image."
  type        = string
  default     = null
}

variable "instance_type" {
  description = "The agents' instance type."
  type        = string
  default     = "t3.medium"
}

variable "root_volume_size" {
  description = "Root volume in GiB (workspaces live here)."
  type        = number
  default     = 30
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

variable "metadata_hop_limit" {
  description = "IMDSv2 hop limit: 2 lets containers of a build (docker) reach the instance role; 1 keeps them out."
  type        = number
  default     = 1
}

variable "detailed_monitoring" {
  description = "One-minute EC2 metrics."
  type        = bool
  default     = true
}

variable "egress_ports" {
  description = "TCP ports the builds may open to the internet."
  type        = list(number)
  default     = [22, 80, 443]
}

variable "min_size" {
  description = "Fewest agents."
  type        = number
  default     = 0
}

variable "max_size" {
  description = "Most agents."
  type        = number
  default     = 4
}

variable "desired_capacity" {
  description = "Agents at creation (Jenkins sizes the group afterwards)."
  type        = number
  default     = 1
}

variable "tags" {
  description = "Tags for every resource (propagated to the instances)."
  type        = map(string)
  default     = {}
}
