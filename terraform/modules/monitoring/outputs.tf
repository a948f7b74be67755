output "alarm_topic_arn" {
  description = "The SNS topic of the alarms and the controller's launches and terminations."
  value       = aws_sns_topic.alarms.arn
}

output "controller_log_group_arns" {
  description = "The controller's log groups (iam module)."
  value       = local.controller_log_groups
}

output "agent_log_group_arns" {
  description = "The agents' log groups (iam module)."
  value       = local.agent_log_groups
}

output "cloudwatch_agent_parameters" {
  description = "The CloudWatch agent's configuration parameter of the controller and the agents (the iam module's *_ssm_parameters)."
  value       = { for k, p in aws_ssm_parameter.cloudwatch_agent : k => p.name }
}
