variable "name" {
  description = "Prefix of every name."
  type        = string
  default     = "jenkins"
}

variable "vpc_id" {
  description = "The VPC (network module)."
  type        = string
}

variable "subnet_ids" {
  description = "The private subnets: one mount target in each (network module's private_subnet_ids)."
  type        = list(string)
}

variable "client_security_group_ids" {
  description = "Security groups allowed to mount the file system (NFS, 2049): the controller's, nothing else."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "Customer managed KMS key that encrypts the file system (kms module)."
  type        = string
}

variable "throughput_mode" {
  description = "bursting (throughput grows with the data stored, spends burst credits: watch the monitoring module's alarm), elastic (pay per use), or provisioned."
  type        = string
  default     = "bursting"

  validation {
    condition     = contains(["bursting", "elastic", "provisioned"], var.throughput_mode)
    error_message = "throughput_mode is bursting, elastic or provisioned."
  }
}

variable "provisioned_throughput_in_mibps" {
  description = "Throughput with throughput_mode = provisioned."
  type        = number
  default     = 10
}

variable "automatic_backups" {
  description = "Also enable EFS's automatic backups (AWS Backup's default plan). Off: the backup module's plan is the one."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
