output "controller_instance_profile_name" {
  description = "The controller's instance profile (controller module)."
  value       = aws_iam_instance_profile.instance["controller"].name
}

output "controller_role_arn" {
  description = "The controller's instance role."
  value       = aws_iam_role.instance["controller"].arn
}

output "agent_instance_profile_name" {
  description = "The agents' instance profile (agents module)."
  value       = aws_iam_instance_profile.instance["agent"].name
}

output "agent_role_arn" {
  description = "The agents' instance role."
  value       = aws_iam_role.instance["agent"].arn
}

output "operator_policy_arns" {
  description = "The operator policies by name: one per iam/*.json file, and jbake-roll-pass-controller-role."
  value       = local.operator_policy_arns
}
