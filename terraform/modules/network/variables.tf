variable "name" {
  description = "Prefix of every name (VPC, subnets, gateways, endpoints)."
  type        = string
  default     = "jenkins"
}

variable "cidr_block" {
  description = "The VPC's IPv4 range. Public subnets take the first three /20s, private subnets the next three (with the default /16)."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zones" {
  description = "Exactly three availability zones (one public and one private subnet each). Empty: the region's first three."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || length(var.availability_zones) == 3
    error_message = "Give exactly three availability zones, or none (the region's first three)."
  }
}

variable "subnet_newbits" {
  description = "Bits added to the VPC's prefix for each subnet (4: a /16 becomes /20s of 4,091 usable addresses)."
  type        = number
  default     = 4
}

variable "single_nat_gateway" {
  description = "One NAT gateway for the three private subnets (cheaper; an AZ outage cuts the private subnets' internet access) instead of one per AZ."
  type        = bool
  default     = true
}

variable "interface_endpoints" {
  description = "Interface VPC endpoints for the private instances, one per private subnet each (billed per endpoint and AZ: see terraform/README.md): the SSM parameters and Session Manager (ssm, ssmmessages, ec2messages); add logs and monitoring for the CloudWatch agent. Empty: none (the traffic goes through the NAT gateway)."
  type        = list(string)
  default     = ["ssm", "ssmmessages", "ec2messages"]
}

variable "flow_log_retention_days" {
  description = "Days the VPC flow logs are kept in CloudWatch Logs."
  type        = number
  default     = 365
}

variable "kms_key_arn" {
  description = "KMS key that encrypts the flow log group (its key policy must allow logs.<region>.amazonaws.com: the kms module's does)."
  type        = string
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
