# The whole Jenkins HA system jbake bakes and rolls. terraform/README.md applies it in two steps:
#
#   1. create_instances = false: the network, the key, the EFS, IAM, the load balancer and its
#      security groups, monitoring and backup; then bake the controller image for module.efs's
#      file system (jbake controller --efs-id ...) and the agent image (jbake agent).
#   2. create_instances = true: the controller's launch template and group, and the agents.

locals {
  name = var.name

  controller_parameters = [var.agent_private_key_parameter, "/jbake/${local.name}/cloudwatch-agent/controller"]
  agent_parameters      = [var.agent_public_key_parameter, "/jbake/${local.name}/cloudwatch-agent/agent"]
}

module "kms" {
  source = "../../modules/kms"

  name = local.name
}

module "network" {
  source = "../../modules/network"

  name               = local.name
  cidr_block         = var.vpc_cidr
  single_nat_gateway = var.single_nat_gateway
  kms_key_arn        = module.kms.key_arn
}

module "efs" {
  source = "../../modules/efs"

  name                      = local.name
  vpc_id                    = module.network.vpc_id
  subnet_ids                = module.network.private_subnet_ids
  client_security_group_ids = [module.controller.security_group_id]
  kms_key_arn               = module.kms.key_arn
}

module "backup" {
  source = "../../modules/backup"

  name           = local.name
  efs_arn        = module.efs.file_system_arn
  kms_key_arn    = module.kms.key_arn
  retention_days = var.backup_retention_days
}

module "iam" {
  source = "../../modules/iam"

  name                      = local.name
  controller_ssm_parameters = local.controller_parameters
  agent_ssm_parameters      = local.agent_parameters
  controller_log_group_arns = module.monitoring.controller_log_group_arns
  agent_log_group_arns      = module.monitoring.agent_log_group_arns
  agents_group_name         = "${local.name}-agents"
  operator_role_names       = var.operator_role_names
}

module "controller" {
  source = "../../modules/controller"

  name                  = local.name
  create_group          = var.create_instances
  vpc_id                = module.network.vpc_id
  public_subnet_ids     = module.network.public_subnet_ids
  private_subnet_ids    = module.network.private_subnet_ids
  efs_id                = module.efs.file_system_id
  efs_security_group_id = module.efs.security_group_id
  image_source          = var.controller_image_source
  require_tested_image  = var.require_tested_images
  instance_type         = var.controller_instance_type
  instance_profile_name = module.iam.controller_instance_profile_name
  certificate_arn       = var.certificate_arn
  allowed_cidrs         = var.allowed_cidrs
  ssh_cidrs             = var.ssh_cidrs
  internal              = var.internal_load_balancer
  route53_zone_id       = var.route53_zone_id
  domain_name           = var.domain_name
}

module "agents" {
  source = "../../modules/agents"
  count  = var.create_instances ? 1 : 0

  name                         = local.name
  vpc_id                       = module.network.vpc_id
  private_subnet_ids           = module.network.private_subnet_ids
  controller_security_group_id = module.controller.security_group_id
  instance_profile_name        = module.iam.agent_instance_profile_name
  image_source                 = var.agent_image_source
  require_tested_image         = var.require_tested_images
  instance_type                = var.agent_instance_type
  max_size                     = var.agents_max
}

# SSH from the controller to its agents (each group is the other's peer, so the rule lives here).
resource "aws_vpc_security_group_egress_rule" "controller_ssh_to_agents" {
  count = var.create_instances ? 1 : 0

  security_group_id            = module.controller.security_group_id
  description                  = "SSH to the agents"
  ip_protocol                  = "tcp"
  from_port                    = 22
  to_port                      = 22
  referenced_security_group_id = module.agents[0].security_group_id
}

module "monitoring" {
  source = "../../modules/monitoring"

  name                     = local.name
  kms_key_arn              = module.kms.key_arn
  efs_id                   = module.efs.file_system_id
  alarm_emails             = var.alarm_emails
  controller_group_name    = "${local.name}-controller"
  controller_group_exists  = var.create_instances
  load_balancer_arn_suffix = module.controller.load_balancer_arn_suffix
  target_group_arn_suffix  = module.controller.target_group_arn_suffix
}
