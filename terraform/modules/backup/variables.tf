variable "name" {
  description = "Prefix of every name."
  type        = string
  default     = "jenkins"
}

variable "efs_arn" {
  description = "The EFS file system holding JENKINS_HOME (efs module's file_system_arn)."
  type        = string
}

variable "kms_key_arn" {
  description = "KMS key of the vault (kms module)."
  type        = string
}

variable "schedule" {
  description = "When the daily backup starts (cron in UTC)."
  type        = string
  default     = "cron(0 3 * * ? *)"
}

variable "retention_days" {
  description = "Days each daily recovery point is kept."
  type        = number
  default     = 35

  validation {
    condition     = var.retention_days >= 1
    error_message = "Keep each backup at least one day."
  }
}

variable "vault_lock_min_retention_days" {
  description = "Lock the vault (WORM): recovery points cannot be deleted before this many days. Null: no lock."
  type        = number
  default     = null
}

variable "partition" {
  description = "AWS partition of the managed policies' ARNs."
  type        = string
  default     = "aws"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
