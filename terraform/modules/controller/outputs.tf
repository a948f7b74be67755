output "autoscaling_group_name" {
  description = "Null with create_group = false. The controller's group (jbake roll --asg, or found by its tag jbake:role=controller)."
  value       = one(aws_autoscaling_group.controller[*].name)
}

output "autoscaling_group_arn" {
  description = "The controller's group ARN."
  value       = one(aws_autoscaling_group.controller[*].arn)
}

output "launch_template_id" {
  description = "The controller's launch template (jbake roll writes its versions)."
  value       = one(aws_launch_template.controller[*].id)
}

output "security_group_id" {
  description = "The controller's security group (the efs module's client, the agents' SSH source)."
  value       = aws_security_group.controller.id
}

output "alb_security_group_id" {
  description = "The load balancer's security group."
  value       = aws_security_group.alb.id
}

output "load_balancer_arn" {
  description = "The load balancer."
  value       = aws_lb.this.arn
}

output "load_balancer_arn_suffix" {
  description = "The load balancer's CloudWatch dimension (monitoring module)."
  value       = aws_lb.this.arn_suffix
}

output "load_balancer_dns_name" {
  description = "The load balancer's DNS name."
  value       = aws_lb.this.dns_name
}

output "target_group_arn" {
  description = "The controller's target group."
  value       = aws_lb_target_group.controller.arn
}

output "target_group_arn_suffix" {
  description = "The target group's CloudWatch dimension (monitoring module)."
  value       = aws_lb_target_group.controller.arn_suffix
}

output "jenkins_url" {
  description = "Jenkins' URL (jbake roll --jenkins-url when a certificate for your own domain is used)."
  value       = "https://${local.jenkins_host}"
}

output "image_id" {
  description = "The image of the first launch template version (later versions are jbake roll's)."
  value       = local.image_id
}
