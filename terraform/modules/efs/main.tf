# JENKINS_HOME: an encrypted EFS file system with a mount target in each private subnet, reachable
# on NFS (2049) only from the controller's security group.
#
# The controller image is baked for this file system (`jbake controller --efs-id <file_system_id>`:
# its /etc/fstab mounts <id>.efs.<region>.amazonaws.com, the DNS name of the mount target in the
# instance's own AZ), so the id is an output, and it becomes known only after the mount targets and
# the NFS rule exist: a controller launched from the image finds its file system reachable.

resource "aws_efs_file_system" "this" {
  #checkov:skip=CKV2_AWS_18:the backup module selects it by ARN (aws_backup_selection.jenkins_home, resources = [var.efs_arn]); checkov does not follow the ARN through the module variable. terraform/tests/check_modules.py asserts the selection
  creation_token   = "${var.name}-jenkins-home"
  encrypted        = true
  kms_key_id       = var.kms_key_arn
  performance_mode = "generalPurpose"
  throughput_mode  = var.throughput_mode

  provisioned_throughput_in_mibps = var.throughput_mode == "provisioned" ? var.provisioned_throughput_in_mibps : null

  tags = merge(var.tags, { Name = "${var.name}-jenkins-home" })
}

# Backups are AWS Backup's (the backup module's plan), not EFS's automatic default plan, so that
# retention and schedule are the ones chosen there (and nothing is backed up twice).
resource "aws_efs_backup_policy" "this" {
  file_system_id = aws_efs_file_system.this.id

  backup_policy {
    status = var.automatic_backups ? "ENABLED" : "DISABLED"
  }
}

resource "aws_security_group" "efs" {
  name        = "${var.name}-efs"
  description = "NFS to the JENKINS_HOME file system, from the controller only"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-efs" })
}

# count, not for_each: the controller's group id is not known before the first apply.
resource "aws_vpc_security_group_ingress_rule" "nfs_from_clients" {
  count = length(var.client_security_group_ids)

  security_group_id            = aws_security_group.efs.id
  description                  = "NFS from the controller"
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
  referenced_security_group_id = var.client_security_group_ids[count.index]
}

resource "aws_efs_mount_target" "this" {
  count = length(var.subnet_ids)

  file_system_id  = aws_efs_file_system.this.id
  subnet_id       = var.subnet_ids[count.index]
  security_groups = [aws_security_group.efs.id]
}
