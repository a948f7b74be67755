variable "name" {
  description = "Prefix of every name; the key's alias is alias/<name>, and it encrypts the log groups /jbake/<name>/*."
  type        = string
  default     = "jenkins"
}

variable "deletion_window_in_days" {
  description = "Days between scheduling the key's deletion and its deletion (7-30): everything it encrypted is lost with it."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
