variable "name" {
  description = "Prefix of every name: roles and profiles <name>-controller and <name>-agent, policies <name>-<file>."
  type        = string
  default     = "jenkins"
}

variable "controller_ssm_parameters" {
  description = "The only SSM parameters the controller may read: the agents' SSH private key (recipes/controller.yaml ssm_agent_key_parameter) and the CloudWatch agent's configuration."
  type        = list(string)
  default     = ["/devops-tools/jenkins/id_rsa"]

  validation {
    condition     = length(var.controller_ssm_parameters) > 0 && alltrue([for p in var.controller_ssm_parameters : can(regex("^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", p))])
    error_message = "Name each parameter in full from the root (/devops-tools/jenkins/id_rsa): no wildcards, no trailing slash."
  }
}

variable "agent_ssm_parameters" {
  description = "The only SSM parameters an agent may read: the controller's SSH public key (recipes/agent.yaml ssm_public_key_parameter) and the CloudWatch agent's configuration."
  type        = list(string)
  default     = ["/devops-tools/jenkins/id_rsa.pub"]

  validation {
    condition     = length(var.agent_ssm_parameters) > 0 && alltrue([for p in var.agent_ssm_parameters : can(regex("^/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$", p))])
    error_message = "Name each parameter in full from the root (/devops-tools/jenkins/id_rsa.pub): no wildcards, no trailing slash."
  }
}

variable "ssm_kms_key_arn" {
  description = "Customer managed KMS key of the SecureString parameters. Null: the AWS managed key alias/aws/ssm, whose key policy already lets SSM decrypt for the account's principals."
  type        = string
  default     = null
}

variable "controller_log_group_arns" {
  description = "Log groups the controller's CloudWatch agent writes (monitoring module's controller_log_group_arns)."
  type        = list(string)
  default     = []
}

variable "agent_log_group_arns" {
  description = "Log groups the agents' CloudWatch agent writes (monitoring module's agent_log_group_arns)."
  type        = list(string)
  default     = []
}

variable "metrics_namespace" {
  description = "The only CloudWatch metrics namespace the instances may write (the CloudWatch agent's default)."
  type        = string
  default     = "CWAgent"
}

variable "agents_group_name" {
  description = "The agents' Auto Scaling group, which the controller may size and whose instances it may terminate (Jenkins EC2 Fleet plugin). Null: the controller gets no Auto Scaling permission."
  type        = string
  default     = null
}

variable "agent_extra_policy_arns" {
  description = "Managed policies the agents' builds need (they build infrastructure: give them exactly that)."
  type        = list(string)
  default     = []
}

variable "operator_policy_dir" {
  description = "Folder of the operator policies, one JSON file per policy. Null: the iam/ folder of the jbake repository this module is part of."
  type        = string
  default     = null
}

variable "operator_role_names" {
  description = "IAM roles that run jbake (the nightly build and roll job: a CI role, an instance role): each gets every operator policy."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
