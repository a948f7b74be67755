# Jenkins SSH agents: an Auto Scaling group in the private subnets, launched from the newest jbake
# agent image. The controller reaches them over SSH (the key pair in SSM: the controller reads the
# private key, the agents the public one), and nothing else may: SSH only from the controller's
# security group.
#
# Agents keep no state, so Terraform owns their image: a newer agent image gives a new launch
# template version at the next apply, and agents launched from then on run it (the running ones
# finish their builds). The group's size belongs to Jenkins (the EC2 Fleet plugin sets the desired
# capacity between min_size and max_size): Terraform ignores desired_capacity after creation.

data "aws_ami" "agent" {
  count = var.image_source == "tags" ? 1 : 0

  owners      = ["self"]
  most_recent = true

  filter {
    name   = "tag:jbake:recipe"
    values = [var.image_recipe]
  }

  filter {
    name   = "tag:jbake:complete"
    values = ["true"]
  }

  dynamic "filter" {
    for_each = var.require_tested_image ? ["true"] : []
    content {
      name   = "tag:jbake:tested"
      values = [filter.value]
    }
  }

  filter {
    name   = "state"
    values = ["available"]
  }
}

locals {
  image_id = (
    var.image_source == "tags" ? data.aws_ami.agent[0].id :
    var.image_source == "ssm" ? "resolve:ssm:${var.image_ssm_parameter}" :
    var.image_id
  )
}

resource "aws_security_group" "agent" {
  name        = "${var.name}-agents"
  description = "Jenkins agents: SSH from the controller only"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-agents" })
}

resource "aws_vpc_security_group_ingress_rule" "ssh_from_controller" {
  #checkov:skip=CKV_AWS_24:the source is the controller's security group (referenced_security_group_id), not 0.0.0.0/0; checkov sees no CIDR and assumes any
  security_group_id            = aws_security_group.agent.id
  description                  = "SSH from the Jenkins controller"
  ip_protocol                  = "tcp"
  from_port                    = 22
  to_port                      = 22
  referenced_security_group_id = var.controller_security_group_id
}

# What builds need outside: HTTPS and HTTP (package mirrors, registries), SSH (git).
resource "aws_vpc_security_group_egress_rule" "agent" {
  for_each = toset([for p in var.egress_ports : tostring(p)])

  security_group_id = aws_security_group.agent.id
  description       = "Builds: tcp/${each.value} out"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_launch_template" "agent" {
  name        = "${var.name}-agent"
  description = "Jenkins agents (jbake agent images)"

  image_id               = local.image_id
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true

  iam_instance_profile {
    name = var.instance_profile_name
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = var.metadata_hop_limit
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = var.detailed_monitoring
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.agent.id]
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-agent" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.name}-agent" })
  }

  tags = var.tags
}

resource "aws_autoscaling_group" "agent" {
  name = "${var.name}-agents"

  min_size         = var.min_size
  max_size         = var.max_size
  desired_capacity = var.desired_capacity

  vpc_zone_identifier       = var.private_subnet_ids
  health_check_type         = "EC2"
  health_check_grace_period = 300

  launch_template {
    id      = aws_launch_template.agent.id
    version = aws_launch_template.agent.latest_version
  }

  # Not the controller: jbake roll must never pick this group.
  tag {
    key                 = "jbake:role"
    value               = "agent"
    propagate_at_launch = false
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-agent"
    propagate_at_launch = true
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [desired_capacity] # Jenkins (EC2 Fleet plugin) sizes the group
  }
}
