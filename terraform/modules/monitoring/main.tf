# What tells an operator that Jenkins is down or about to be: log groups for the controller and the
# agents (Jenkins and the system journal, shipped by the CloudWatch agent with the configuration
# below), alarms on the load balancer's view of Jenkins, on EFS's burst credits and throughput and
# on the controller group's instances, and every launch and termination of a controller (a roll, or
# a replacement after a failed health check) on one SNS topic.

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}

locals {
  log_groups = {
    "controller/jenkins" = "Jenkins on the controller (journal of jenkins.service)"
    "controller/system"  = "the controller's system journal"
    "agent/system"       = "the agents' system journal"
  }
  controller_log_groups = [for k, g in aws_cloudwatch_log_group.this : g.arn if length(regexall("^controller/", k)) > 0]
  agent_log_groups      = [for k, g in aws_cloudwatch_log_group.this : g.arn if length(regexall("^agent/", k)) > 0]
}

resource "aws_cloudwatch_log_group" "this" {
  for_each = local.log_groups

  name              = "/jbake/${var.name}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn

  tags = merge(var.tags, { Description = each.value })
}

# ------------------------------------------------------------------ notifications

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = var.kms_key_arn # its key policy lets CloudWatch and Auto Scaling publish

  tags = var.tags
}

data "aws_iam_policy_document" "alarms_topic" {
  statement {
    sid       = "CloudWatchAlarmsOfThisAccount"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alarms" {
  arn    = aws_sns_topic.alarms.arn
  policy = data.aws_iam_policy_document.alarms_topic.json
}

resource "aws_sns_topic_subscription" "email" {
  for_each = toset(var.alarm_emails)

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

# Every controller launch and termination: a roll's handover, or a replacement after a failed
# health check (which a roll never causes: it suspends ReplaceUnhealthy).
resource "aws_autoscaling_notification" "controller" {
  count = var.controller_group_exists ? 1 : 0

  group_names = [var.controller_group_name]
  topic_arn   = aws_sns_topic.alarms.arn

  notifications = [
    "autoscaling:EC2_INSTANCE_LAUNCH",
    "autoscaling:EC2_INSTANCE_LAUNCH_ERROR",
    "autoscaling:EC2_INSTANCE_TERMINATE",
    "autoscaling:EC2_INSTANCE_TERMINATE_ERROR",
  ]
}

# ------------------------------------------------------------------ alarms

# Jenkins is down: no healthy target for 3 minutes (a roll's handover keeps the old controller
# healthy until the successor serves, so a roll does not raise it).
resource "aws_cloudwatch_metric_alarm" "no_healthy_controller" {
  alarm_name          = "${var.name}-jenkins-down"
  alarm_description   = "No healthy Jenkins controller behind the load balancer: Jenkins does not answer /login."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "HealthyHostCount"
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 3
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"

  dimensions = {
    LoadBalancer = var.load_balancer_arn_suffix
    TargetGroup  = var.target_group_arn_suffix
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]

  tags = var.tags
}

# An unhealthy target for longer than a roll's handover lasts.
resource "aws_cloudwatch_metric_alarm" "unhealthy_controller" {
  alarm_name          = "${var.name}-jenkins-unhealthy-target"
  alarm_description   = "A controller target has failed the /login health check for ${var.unhealthy_minutes} minutes."
  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = var.unhealthy_minutes
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  treat_missing_data  = "notBreaching"

  dimensions = {
    LoadBalancer = var.load_balancer_arn_suffix
    TargetGroup  = var.target_group_arn_suffix
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]

  tags = var.tags
}

# The controller group has no instance in service (it keeps failing to launch or to pass health).
resource "aws_cloudwatch_metric_alarm" "controller_not_in_service" {
  count = var.controller_group_exists ? 1 : 0

  alarm_name          = "${var.name}-controller-not-in-service"
  alarm_description   = "The controller's Auto Scaling group has had no instance in service for 10 minutes."
  namespace           = "AWS/AutoScaling"
  metric_name         = "GroupInServiceInstances"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 10
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"

  dimensions = {
    AutoScalingGroupName = var.controller_group_name
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]

  tags = var.tags
}

# Replacements: more than one instance terminated within an hour is not a roll, it is a loop
# (an image or an EFS that keeps Jenkins from starting).
resource "aws_cloudwatch_metric_alarm" "controller_replacements" {
  count = var.controller_group_exists ? 1 : 0

  alarm_name          = "${var.name}-controller-replacements"
  alarm_description   = "The controller group terminated instances in more than one minute of the last hour: a replacement loop?"
  namespace           = "AWS/AutoScaling"
  metric_name         = "GroupTerminatingInstances"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 60
  datapoints_to_alarm = 2
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  treat_missing_data  = "notBreaching"

  dimensions = {
    AutoScalingGroupName = var.controller_group_name
  }

  alarm_actions = [aws_sns_topic.alarms.arn]

  tags = var.tags
}

# EFS in bursting mode: when the credits run out, JENKINS_HOME slows to its baseline throughput.
resource "aws_cloudwatch_metric_alarm" "efs_burst_credits" {
  alarm_name          = "${var.name}-efs-burst-credits-low"
  alarm_description   = "JENKINS_HOME's EFS burst credit balance is low: it will soon be held to its baseline throughput."
  namespace           = "AWS/EFS"
  metric_name         = "BurstCreditBalance"
  statistic           = "Minimum"
  period              = 300
  evaluation_periods  = 3
  comparison_operator = "LessThanThreshold"
  threshold           = var.efs_burst_credit_threshold_bytes
  treat_missing_data  = "missing"

  dimensions = {
    FileSystemId = var.efs_id
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]

  tags = var.tags
}

# Throughput used as a share of what EFS permits right now.
resource "aws_cloudwatch_metric_alarm" "efs_throughput" {
  alarm_name          = "${var.name}-efs-throughput-high"
  alarm_description   = "JENKINS_HOME uses more than ${var.efs_throughput_percent}% of its permitted EFS throughput."
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 3
  threshold           = var.efs_throughput_percent
  treat_missing_data  = "missing"

  metric_query {
    id          = "utilization"
    expression  = "(metered / 1048576) / PERIOD(metered) * 100 / (permitted / 1048576)"
    label       = "Throughput utilization (%)"
    return_data = true
  }

  metric_query {
    id = "metered"
    metric {
      namespace   = "AWS/EFS"
      metric_name = "MeteredIOBytes"
      period      = 300
      stat        = "Sum"
      dimensions = {
        FileSystemId = var.efs_id
      }
    }
  }

  metric_query {
    id = "permitted"
    metric {
      namespace   = "AWS/EFS"
      metric_name = "PermittedThroughput"
      period      = 300
      stat        = "Average"
      dimensions = {
        FileSystemId = var.efs_id
      }
    }
  }

  alarm_actions = [aws_sns_topic.alarms.arn]
  ok_actions    = [aws_sns_topic.alarms.arn]

  tags = var.tags
}

# ------------------------------------------------------------------ CloudWatch agent configuration

# The agent reads its configuration from these parameters (amazon-cloudwatch-agent-ctl -a
# fetch-config -c ssm:<name>); each instance role may read its own (iam module).
resource "aws_ssm_parameter" "cloudwatch_agent" {
  #checkov:skip=CKV2_AWS_34:the CloudWatch agent configuration holds no secret (log group names, metric names), and the agent reads it as a String
  for_each = {
    controller = {
      "/jbake/${var.name}/controller/jenkins" = "jenkins.service"
      "/jbake/${var.name}/controller/system"  = null
    }
    agent = {
      "/jbake/${var.name}/agent/system" = null
    }
  }

  name        = "/jbake/${var.name}/cloudwatch-agent/${each.key}"
  description = "CloudWatch agent configuration of the Jenkins ${each.key} (jbake)"
  type        = "String"
  tier        = "Standard"
  value = jsonencode({
    agent = { run_as_user = "root" }
    logs = {
      logs_collected = {
        journald = {
          collect_list = [
            for group, unit in each.value : merge(
              { log_group_name = group, log_stream_name = "{instance_id}", retention_in_days = var.log_retention_days },
              unit == null ? {} : { units = [unit] },
            )
          ]
        }
      }
    }
    metrics = {
      namespace = "CWAgent"
      append_dimensions = {
        AutoScalingGroupName = "$${aws:AutoScalingGroupName}"
        InstanceId           = "$${aws:InstanceId}"
      }
      metrics_collected = {
        mem  = { measurement = ["mem_used_percent"] }
        disk = { measurement = ["used_percent"], resources = ["/"] }
      }
    }
  })

  tags = var.tags
}
