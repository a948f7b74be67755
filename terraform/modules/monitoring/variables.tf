variable "name" {
  description = "Prefix of every name; log groups /jbake/<name>/..."
  type        = string
  default     = "jenkins"
}

variable "kms_key_arn" {
  description = "KMS key of the log groups and the topic (kms module: its policy lets CloudWatch Logs, CloudWatch alarms and Auto Scaling use it)."
  type        = string
}

variable "log_retention_days" {
  description = "Days the logs are kept."
  type        = number
  default     = 365
}

variable "alarm_emails" {
  description = "Addresses subscribed to the alarms topic (each must confirm the subscription)."
  type        = list(string)
  default     = []
}

variable "controller_group_name" {
  description = "The controller's Auto Scaling group (controller module)."
  type        = string
}

variable "controller_group_exists" {
  description = "False before the controller's group is created (the first apply): no notifications and alarms on the group yet."
  type        = bool
  default     = true
}

variable "load_balancer_arn_suffix" {
  description = "The load balancer's CloudWatch dimension (controller module)."
  type        = string
}

variable "target_group_arn_suffix" {
  description = "The controller target group's CloudWatch dimension (controller module)."
  type        = string
}

variable "unhealthy_minutes" {
  description = "Minutes a target may fail its health check before the alarm (longer than a roll's handover)."
  type        = number
  default     = 15
}

variable "efs_id" {
  description = "The EFS file system holding JENKINS_HOME (efs module)."
  type        = string
}

variable "efs_burst_credit_threshold_bytes" {
  description = "Alarm below this EFS burst credit balance (a new file system starts with 2.1 TB worth)."
  type        = number
  default     = 500000000000
}

variable "efs_throughput_percent" {
  description = "Alarm above this share of the permitted EFS throughput."
  type        = number
  default     = 80
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
