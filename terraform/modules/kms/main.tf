# One customer managed key for the system's data at rest: the EFS file system (JENKINS_HOME), its
# backups, the CloudWatch log groups and the SNS topic of the alarms. AWS managed keys cannot be
# used for the last two: CloudWatch alarms and Auto Scaling notifications can only publish to an
# encrypted topic whose key policy lets them use the key, and an AWS managed key's policy cannot
# be changed.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account = data.aws_caller_identity.current.account_id
  region  = data.aws_region.current.name
  arn_ns  = "arn:${data.aws_partition.current.partition}"
}

data "aws_iam_policy_document" "key" {
  #checkov:skip=CKV_AWS_111:a key policy's "Resource": "*" means this key only; the service statements are scoped by aws:SourceAccount or the log group ARN
  #checkov:skip=CKV_AWS_356:same: "*" in a key policy is the key itself
  #checkov:skip=CKV_AWS_109:the account root statement hands the key's administration to the account's IAM policies (AWS's default key policy), nothing is exposed outside the account
  # The account's IAM policies decide who else may use the key (EFS, Backup, the operators).
  statement {
    sid       = "AccountAdministersTheKeyThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"] # in a key policy "*" is this key
    principals {
      type        = "AWS"
      identifiers = ["${local.arn_ns}:iam::${local.account}:root"]
    }
  }

  statement {
    sid = "CloudWatchLogsEncryptsTheSystemsLogGroups"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${local.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["${local.arn_ns}:logs:${local.region}:${local.account}:log-group:/jbake/${var.name}/*"]
    }
  }

  statement {
    sid       = "CloudWatchAlarmsPublishToTheEncryptedTopic"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account]
    }
  }

  statement {
    sid       = "AutoScalingNotificationsPublishToTheEncryptedTopic"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["${local.arn_ns}:iam::${local.account}:role/aws-service-role/autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling"]
    }
  }
}

resource "aws_kms_key" "this" {
  description             = "${var.name}: JENKINS_HOME (EFS), its backups, logs and alarm notifications"
  enable_key_rotation     = true
  deletion_window_in_days = var.deletion_window_in_days
  policy                  = data.aws_iam_policy_document.key.json

  tags = var.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}
