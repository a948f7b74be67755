output "file_system_id" {
  description = "The id to bake the controller image for (jbake controller --efs-id ...); known once the mount targets and the NFS rule exist."
  value       = aws_efs_file_system.this.id

  depends_on = [aws_efs_mount_target.this, aws_vpc_security_group_ingress_rule.nfs_from_clients]
}

output "file_system_arn" {
  description = "The file system's ARN (the backup module's selection)."
  value       = aws_efs_file_system.this.arn
}

output "dns_name" {
  description = "<id>.efs.<region>.amazonaws.com: what the controller image's /etc/fstab mounts."
  value       = aws_efs_file_system.this.dns_name

  depends_on = [aws_efs_mount_target.this, aws_vpc_security_group_ingress_rule.nfs_from_clients]
}

output "security_group_id" {
  description = "The mount targets' security group."
  value       = aws_security_group.efs.id
}
