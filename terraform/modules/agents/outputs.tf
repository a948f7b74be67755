output "autoscaling_group_name" {
  description = "The agents' group (the Jenkins EC2 Fleet plugin's; the iam module's agents_group_name)."
  value       = aws_autoscaling_group.agent.name
}

output "security_group_id" {
  description = "The agents' security group (the controller's SSH target)."
  value       = aws_security_group.agent.id
}

output "launch_template_id" {
  description = "The agents' launch template."
  value       = aws_launch_template.agent.id
}
