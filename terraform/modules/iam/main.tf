# The instance roles of the controller and the agents, and the operator policies jbake ships.
#
# Each instance role reads exactly its own SSM parameters, named by ARN, and an explicit Deny
# refuses every other parameter even if a broader policy is attached to the role later (such as
# AmazonSSMManagedInstanceCore, whose ssm:GetParameter(s) is on "*": that is why the Session
# Manager permissions below are written out instead of attaching it).
#
# The operator policies (what `jbake build`, `gc` and `roll` need) are the JSON files in the
# repository's iam/ folder, read at plan time: one source, nothing copied here, nothing to drift.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  account = data.aws_caller_identity.current.account_id
  region  = data.aws_region.current.name
  arn_ns  = "arn:${data.aws_partition.current.partition}"

  # SSM parameter names start with "/": arn:aws:ssm:REGION:ACCOUNT:parameter/devops-tools/jenkins/id_rsa
  parameter_arn_prefix = "${local.arn_ns}:ssm:${local.region}:${local.account}:parameter"

  roles = {
    controller = {
      parameters = var.controller_ssm_parameters
      log_groups = var.controller_log_group_arns
    }
    agent = {
      parameters = var.agent_ssm_parameters
      log_groups = var.agent_log_group_arns
    }
  }

  # iam/*.json of this repository (or var.operator_policy_dir): one managed policy per file.
  policy_dir = var.operator_policy_dir != null ? var.operator_policy_dir : "${path.module}/../../../iam"
  policy_files = {
    for f in fileset(local.policy_dir, "*.json") : trimsuffix(f, ".json") => "${local.policy_dir}/${f}"
  }
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "instance" {
  for_each = local.roles
  #checkov:skip=CKV_AWS_111:the only "*" writes are cloudwatch:PutMetricData (scoped by the cloudwatch:namespace condition; it has no resource type) and the Session Manager channel actions (ssmmessages:*, ec2messages:*, ssm:UpdateInstanceInformation), which AWS documents without resource-level permissions
  #checkov:skip=CKV_AWS_356:same statements: PutMetricData, ec2:DescribeTags and the Session Manager channel actions cannot be scoped by resource; the SSM parameters, log groups and KMS key are named by ARN

  statement {
    sid       = "ReadOwnParameters"
    actions   = ["ssm:GetParameter", "ssm:GetParameters"]
    resources = [for p in each.value.parameters : "${local.parameter_arn_prefix}${p}"]
  }

  # Nothing but the parameters above, whatever else gets attached to this role.
  statement {
    sid           = "NoOtherParameters"
    effect        = "Deny"
    actions       = ["ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath", "ssm:GetParameterHistory"]
    not_resources = [for p in each.value.parameters : "${local.parameter_arn_prefix}${p}"]
  }

  dynamic "statement" {
    for_each = var.ssm_kms_key_arn == null ? [] : [var.ssm_kms_key_arn]
    content {
      sid       = "DecryptOwnParametersThroughSsm"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${local.region}.amazonaws.com"]
      }
    }
  }

  # The CloudWatch agent: its own log groups, metrics in its own namespace.
  dynamic "statement" {
    for_each = length(each.value.log_groups) == 0 ? [] : [each.value.log_groups]
    content {
      sid       = "WriteOwnLogGroups"
      actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
      resources = flatten([for g in statement.value : [g, "${g}:*"]])
    }
  }

  statement {
    sid       = "CloudWatchAgentMetrics"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"] # PutMetricData has no resource type; the namespace condition scopes it
    condition {
      test     = "StringEquals"
      variable = "cloudwatch:namespace"
      values   = [var.metrics_namespace]
    }
  }

  statement {
    sid       = "CloudWatchAgentInstanceTags"
    actions   = ["ec2:DescribeTags"]
    resources = ["*"] # Describe* has no resource-level permissions
  }

  # Session Manager (shell access without SSH or a bastion) and the SSM agent's registration,
  # without AmazonSSMManagedInstanceCore's ssm:GetParameter(s) on "*".
  statement {
    sid = "SessionManager"
    actions = [
      "ssm:UpdateInstanceInformation",
      "ssmmessages:CreateControlChannel",
      "ssmmessages:CreateDataChannel",
      "ssmmessages:OpenControlChannel",
      "ssmmessages:OpenDataChannel",
      "ec2messages:AcknowledgeMessage",
      "ec2messages:DeleteMessage",
      "ec2messages:FailMessage",
      "ec2messages:GetEndpoint",
      "ec2messages:GetMessages",
      "ec2messages:SendReply",
    ]
    resources = ["*"] # these actions have no resource-level permissions
  }
}

# The controller starts and stops its agents (the Jenkins EC2 Fleet plugin sizes the agents' group):
# that group only, by ARN.
data "aws_iam_policy_document" "controller_manages_agents" {
  count = var.agents_group_name == null ? 0 : 1

  statement {
    sid       = "SeeTheAgents"
    actions   = ["autoscaling:DescribeAutoScalingGroups", "ec2:DescribeInstances"]
    resources = ["*"] # Describe* has no resource-level permissions
  }

  statement {
    sid = "SizeTheAgentsGroup"
    actions = [
      "autoscaling:UpdateAutoScalingGroup",
      "autoscaling:SetDesiredCapacity",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    resources = ["${local.arn_ns}:autoscaling:${local.region}:${local.account}:autoScalingGroup:*:autoScalingGroupName/${var.agents_group_name}"]
  }
}

resource "aws_iam_role" "instance" {
  for_each = local.roles

  name               = "${var.name}-${each.key}"
  description        = "Jenkins ${each.key} instances (jbake): own SSM parameters, own log groups, Session Manager"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json

  tags = var.tags
}

resource "aws_iam_role_policy" "instance" {
  for_each = local.roles

  name   = "${var.name}-${each.key}"
  role   = aws_iam_role.instance[each.key].id
  policy = data.aws_iam_policy_document.instance[each.key].json
}

resource "aws_iam_role_policy" "controller_manages_agents" {
  count = var.agents_group_name == null ? 0 : 1

  name   = "${var.name}-controller-manages-agents"
  role   = aws_iam_role.instance["controller"].id
  policy = data.aws_iam_policy_document.controller_manages_agents[0].json
}

resource "aws_iam_role_policy_attachment" "agent_extra" {
  for_each = toset(var.agent_extra_policy_arns)

  role       = aws_iam_role.instance["agent"].name
  policy_arn = each.value
}

resource "aws_iam_instance_profile" "instance" {
  for_each = local.roles

  name = "${var.name}-${each.key}"
  role = aws_iam_role.instance[each.key].name

  tags = var.tags
}

# ------------------------------------------------------------------ operators (jbake itself)

resource "aws_iam_policy" "operator" {
  for_each = local.policy_files

  name        = "${var.name}-${each.key}"
  description = "jbake: ${each.key} (iam/${each.key}.json of the jbake repository)"
  policy      = file(each.value)

  tags = var.tags
}

# The controller's launch template names the controller's instance profile, so whoever writes a
# new version of it (jbake roll) must be allowed to pass that role to EC2: that role only.
data "aws_iam_policy_document" "pass_controller_role" {
  statement {
    sid       = "PassTheControllerRoleToEc2"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.instance["controller"].arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "pass_controller_role" {
  name        = "${var.name}-jbake-roll-pass-controller-role"
  description = "jbake roll: pass the controller's instance role to EC2 (its launch template names it)"
  policy      = data.aws_iam_policy_document.pass_controller_role.json

  tags = var.tags
}

locals {
  operator_policy_arns = merge(
    { for k, p in aws_iam_policy.operator : k => p.arn },
    { "jbake-roll-pass-controller-role" = aws_iam_policy.pass_controller_role.arn },
  )
  operator_attachments = {
    for pair in setproduct(var.operator_role_names, keys(local.operator_policy_arns)) :
    "${pair[0]}/${pair[1]}" => { role = pair[0], policy = pair[1] }
  }
}

resource "aws_iam_role_policy_attachment" "operator" {
  for_each = local.operator_attachments

  role       = each.value.role
  policy_arn = local.operator_policy_arns[each.value.policy]
}
