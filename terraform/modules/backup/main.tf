# AWS Backup of JENKINS_HOME: a vault encrypted with the system's key, a daily plan with a
# retention to choose, and the EFS file system selected by ARN. Restores go to a new file system
# (or a folder of the same one): see terraform/README.md.

data "aws_iam_policy_document" "backup_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["backup.amazonaws.com"]
    }
  }
}

resource "aws_backup_vault" "this" {
  name        = "${var.name}-jenkins-home"
  kms_key_arn = var.kms_key_arn

  tags = var.tags
}

# Optional WORM lock: once its grace period has passed nobody (root included) can delete the
# recovery points before min_retention_days.
resource "aws_backup_vault_lock_configuration" "this" {
  count = var.vault_lock_min_retention_days == null ? 0 : 1

  backup_vault_name   = aws_backup_vault.this.name
  min_retention_days  = var.vault_lock_min_retention_days
  max_retention_days  = var.retention_days
  changeable_for_days = 3
}

resource "aws_backup_plan" "this" {
  name = "${var.name}-jenkins-home"

  rule {
    rule_name         = "daily"
    target_vault_name = aws_backup_vault.this.name
    schedule          = var.schedule
    start_window      = 60
    completion_window = 360

    lifecycle {
      delete_after = var.retention_days
    }

    recovery_point_tags = merge(var.tags, { "jbake:backup-of" = "jenkins-home" })
  }

  tags = var.tags
}

resource "aws_iam_role" "backup" {
  name               = "${var.name}-backup"
  assume_role_policy = data.aws_iam_policy_document.backup_assume.json

  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "backup" {
  role       = aws_iam_role.backup.name
  policy_arn = "arn:${var.partition}:iam::aws:policy/service-role/AWSBackupServiceRolePolicyForBackup"
}

resource "aws_iam_role_policy_attachment" "restore" {
  role       = aws_iam_role.backup.name
  policy_arn = "arn:${var.partition}:iam::aws:policy/service-role/AWSBackupServiceRolePolicyForRestores"
}

resource "aws_backup_selection" "jenkins_home" {
  name         = "${var.name}-jenkins-home"
  plan_id      = aws_backup_plan.this.id
  iam_role_arn = aws_iam_role.backup.arn
  resources    = [var.efs_arn]
}
