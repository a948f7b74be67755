# The Jenkins controller: an Auto Scaling group of exactly one instance in the private subnets,
# launched from the newest tested jbake controller image, behind an HTTPS Application Load
# Balancer in the public subnets.
#
# jbake roll owns what runs; Terraform owns the shape. A roll writes a new launch template version
# (the same data, another ImageId), makes it the default, points the group at that explicit
# version, raises the group's max/desired to 2 while the successor boots, suspends processes such
# as ReplaceUnhealthy and AZRebalance, then puts the sizes back. Every attribute a roll changes is
# in an ignore_changes below, so `terraform apply` never undoes a roll, nor one in progress.
# README.md beside this file explains each choice.

data "aws_region" "current" {}

# "tags": the newest image jbake baked from the controller recipe for this EFS, complete and (by
# default) tested; "ssm": the parameter jbake publishes, resolved by EC2 at each launch; "id": a
# fixed image.
data "aws_ami" "controller" {
  count = var.create_group && var.image_source == "tags" ? 1 : 0

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

  # The image is baked for one file system: its /etc/fstab mounts that EFS.
  filter {
    name   = "tag:jbake:efs-id"
    values = [var.efs_id]
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
    !var.create_group ? null :
    var.image_source == "tags" ? data.aws_ami.controller[0].id :
    var.image_source == "ssm" ? "resolve:ssm:${var.image_ssm_parameter}" :
    var.image_id
  )

  lb_subnet_ids = var.internal ? var.private_subnet_ids : var.public_subnet_ids

  alb_ingress = {
    for pair in setproduct(var.allowed_cidrs, [80, 443]) : "${pair[0]}:${pair[1]}" => { cidr = pair[0], port = pair[1] }
  }

  jenkins_host = var.domain_name != null ? var.domain_name : aws_lb.this.dns_name
}

# ------------------------------------------------------------------ security groups

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "Jenkins load balancer: HTTPS (and HTTP, redirected) from the allowed ranges only"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-alb" })
}

resource "aws_vpc_security_group_ingress_rule" "alb" {
  for_each = local.alb_ingress

  security_group_id = aws_security_group.alb.id
  description       = each.value.port == 443 ? "HTTPS from an allowed range" : "HTTP from an allowed range (redirected to HTTPS)"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "alb_to_controller" {
  security_group_id            = aws_security_group.alb.id
  description                  = "To Jenkins on the controller"
  ip_protocol                  = "tcp"
  from_port                    = var.jenkins_port
  to_port                      = var.jenkins_port
  referenced_security_group_id = aws_security_group.controller.id
}

resource "aws_security_group" "controller" {
  name        = "${var.name}-controller"
  description = "Jenkins controller: Jenkins from the load balancer only, SSH from the bastion/VPN range only"
  vpc_id      = var.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-controller" })
}

resource "aws_vpc_security_group_ingress_rule" "controller_from_alb" {
  security_group_id            = aws_security_group.controller.id
  description                  = "Jenkins from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.jenkins_port
  to_port                      = var.jenkins_port
  referenced_security_group_id = aws_security_group.alb.id
}

resource "aws_vpc_security_group_ingress_rule" "controller_ssh" {
  for_each = toset(var.ssh_cidrs)

  security_group_id = aws_security_group.controller.id
  description       = "SSH from the bastion/VPN range"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}

# HTTPS out: the AWS APIs through the VPC endpoints or the NAT gateway (SSM, CloudWatch), the
# Jenkins update center and plugin downloads.
resource "aws_vpc_security_group_egress_rule" "controller_https" {
  security_group_id = aws_security_group.controller.id
  description       = "HTTPS: AWS APIs, Jenkins update center"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "controller_nfs" {
  security_group_id            = aws_security_group.controller.id
  description                  = "NFS to JENKINS_HOME (EFS mount targets)"
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
  referenced_security_group_id = var.efs_security_group_id
}

# ------------------------------------------------------------------ launch template and group

# create_group = false leaves out the launch template and the group (and the image lookup): the
# first apply, before the first controller image is baked for the EFS (terraform/README.md).
resource "aws_launch_template" "controller" {
  count = var.create_group ? 1 : 0

  name        = "${var.name}-controller"
  description = "Jenkins controller; jbake roll writes the versions after the first"

  image_id      = local.image_id
  instance_type = var.instance_type
  key_name      = var.key_name
  ebs_optimized = true

  # Terraform never moves the default version: jbake roll does (see README.md).
  update_default_version = false

  iam_instance_profile {
    name = var.instance_profile_name
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = var.detailed_monitoring
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = concat([aws_security_group.controller.id], var.extra_security_group_ids)
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
    tags          = merge(var.tags, { Name = "${var.name}-controller" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.name}-controller" })
  }

  # jbake's roll policy (iam/jbake-roll-policy.json) lets it add versions only to launch templates
  # that carry this tag (aws:ResourceTag/jbake:role = controller).
  tags = merge(var.tags, { "jbake:role" = "controller" })

  lifecycle {
    # image_id: jbake roll chooses the image (the provider reads the newest version's, which after
    # a roll is the rolled image); default_version: jbake roll moves it.
    ignore_changes = [image_id, default_version]
  }
}

resource "aws_autoscaling_group" "controller" {
  count = var.create_group ? 1 : 0

  name = "${var.name}-controller"

  # Exactly one controller on one JENKINS_HOME. A roll raises max/desired to 2 for the handover
  # and puts them back to 1 (ignored below, so that an apply during a roll cannot cut it short).
  min_size         = 1
  max_size         = 1
  desired_capacity = 1

  vpc_zone_identifier       = var.private_subnet_ids
  target_group_arns         = [aws_lb_target_group.controller.arn]
  health_check_type         = "ELB"
  health_check_grace_period = var.health_check_grace_period

  launch_template {
    id      = aws_launch_template.controller[0].id
    version = aws_launch_template.controller[0].latest_version
  }

  enabled_metrics = [
    "GroupDesiredCapacity",
    "GroupInServiceInstances",
    "GroupMaxSize",
    "GroupMinSize",
    "GroupPendingInstances",
    "GroupTerminatingInstances",
    "GroupTotalInstances",
  ]

  # jbake roll finds the controller's group by this tag, and its IAM policy may change only groups
  # that carry it (autoscaling:ResourceTag/jbake:role = controller).
  tag {
    key                 = "jbake:role"
    value               = "controller"
    propagate_at_launch = false
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-controller"
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
    ignore_changes = [
      launch_template[0].version, # jbake roll points the group at each new version
      desired_capacity,           # 2 during a roll's handover
      max_size,                   # 2 during a roll's handover
      suspended_processes,        # ReplaceUnhealthy, AZRebalance, ... during a roll
    ]
  }
}

# ------------------------------------------------------------------ load balancer

resource "aws_lb" "this" {
  name               = var.name
  load_balancer_type = "application"
  internal           = var.internal
  subnets            = local.lb_subnet_ids
  security_groups    = [aws_security_group.alb.id]

  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  idle_timeout               = var.idle_timeout

  dynamic "access_logs" {
    for_each = var.access_logs_bucket == null ? [] : [var.access_logs_bucket]
    content {
      bucket  = access_logs.value
      prefix  = var.name
      enabled = true
    }
  }

  tags = var.tags
}

resource "aws_lb_target_group" "controller" {
  name                 = "${var.name}-controller"
  port                 = var.jenkins_port
  protocol             = "HTTP"
  target_type          = "instance"
  vpc_id               = var.vpc_id
  deregistration_delay = var.deregistration_delay

  # A roll's downtime is: the old controller stops serving -> the successor's Jenkins answers ->
  # healthy_threshold x interval. 2 x 10 s, instead of the default 5 x 30 s.
  health_check {
    enabled             = true
    path                = var.health_check_path
    port                = "traffic-port"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = var.health_check_interval
    timeout             = var.health_check_timeout
    healthy_threshold   = var.healthy_threshold
    unhealthy_threshold = var.unhealthy_threshold
  }

  tags = var.tags
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.this.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.controller.arn
  }

  tags = var.tags
}

resource "aws_lb_listener" "http_redirect" {
  load_balancer_arn = aws_lb.this.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"

    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }

  tags = var.tags
}

# ------------------------------------------------------------------ optional DNS name

resource "aws_route53_record" "jenkins" {
  count = var.route53_zone_id == null ? 0 : 1

  zone_id = var.route53_zone_id
  name    = var.domain_name
  type    = "A"

  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = true
  }
}
