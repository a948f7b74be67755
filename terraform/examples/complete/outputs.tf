output "efs_id" {
  description = "Bake the controller image for it: jbake controller --efs-id $(terraform output -raw efs_id) --region <region>."
  value       = module.efs.file_system_id
}

output "private_subnet_ids" {
  description = "Where a build can run privately (jbake build --subnet-id ... --ssh-interface private, through a bastion)."
  value       = module.network.private_subnet_ids
}

output "public_subnet_ids" {
  description = "Where a build can run with a public address (jbake build --subnet-id ... --ssh-cidr <your address>/32)."
  value       = module.network.public_subnet_ids
}

output "controller_group" {
  description = "The controller's Auto Scaling group (jbake roll finds it by its tag jbake:role=controller)."
  value       = module.controller.autoscaling_group_name
}

output "jenkins_url" {
  description = "Jenkins (jbake roll --jenkins-url)."
  value       = module.controller.jenkins_url
}

output "load_balancer_dns_name" {
  description = "Point domain_name here when route53_zone_id is not given."
  value       = module.controller.load_balancer_dns_name
}

output "alarm_topic_arn" {
  description = "The alarms' SNS topic."
  value       = module.monitoring.alarm_topic_arn
}

output "operator_policy_arns" {
  description = "The jbake operator policies (iam/*.json)."
  value       = module.iam.operator_policy_arns
}
