#!/usr/bin/env python3
"""The controller's infrastructure in moto, built from what the Terraform modules declare.

Usage: contract_fixture.py COMMAND JSON_ARGS; endpoint, region and credentials from the
environment (the Rust harness's Moto::env). JSON on stdout.

Commands:
  setup {"root", "efs_id"}   the network module's VPC and subnets, the iam module's controller role
                             and instance profile, the controller module's security groups, launch
                             template, target group, load balancer with its listeners and the Auto
                             Scaling group, each with the names, tags, sizes, health check and
                             launch settings the HCL says (tfmodel.py evaluates it); the images as
                             jbake writes them (recipe name and tags from recipes/controller.yaml);
                             the first version's image chosen the way the module's aws_ami data
                             source chooses (its filters, owners, most_recent); then a newer image
                             for jbake roll to pick. -> ids, and the module values the test checks
  state {"group"}            the group (sizes, tags, the version it names, suspended processes),
                             EC2's view of its instances, the template's versions

Nothing here repeats a value of the modules: change the role tag, the group's sizes or the health
check in the HCL and this fixture builds that, and jbake roll is run against it.
"""

import json
import re
import sys
from pathlib import Path

import boto3
import yaml

from tfmodel import Ref, load_module

ACCOUNT = "123456789012"  # moto's


def evaluators(root, region, azs):
    refs = {
        "data.aws_caller_identity.current.account_id": ACCOUNT,
        "data.aws_region.current.name": region,
        "data.aws_partition.current.partition": "aws",
        "data.aws_availability_zones.available.names": azs,
    }
    tf = Path(root) / "terraform" / "modules"
    return {name: load_module(tf / name) for name in ("network", "iam", "controller")}, refs


def tags_of(items):
    return {t["Key"]: t["Value"] for t in (items or [])}


def jbake_image_tags(root, efs_id, version, tested=True):
    """The tags a `jbake controller --efs-id` bake puts on its image (docs/baking.md: tags on everything
    jbake makes; the recipe's own tags: section, rendered), plus jbake:tested (the image lifecycle)."""
    recipe = yaml.safe_load((Path(root) / "recipes" / "controller.yaml").read_text())
    values = {"efs_id": efs_id}
    for name, spec in (recipe.get("vars") or {}).items():
        if isinstance(spec, dict) and "default" in spec:
            values.setdefault(name, str(spec["default"]))
    tags = {
        "jbake:recipe": recipe["name"],
        "jbake:version": version,
        "jbake:complete": "true",
        "jbake:build-id": f"build-{version}",
    }
    for key, template in (recipe.get("tags") or {}).items():
        tags[key] = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values[m.group(1)], str(template))
    if tested:
        tags["jbake:tested"] = "true"
    return tags


def register_image(ec2, region, name, tags):
    volume = ec2.create_volume(AvailabilityZone=region + "a", Size=8)
    snapshot = ec2.create_snapshot(VolumeId=volume["VolumeId"])
    ec2.delete_volume(VolumeId=volume["VolumeId"])
    image = ec2.register_image(
        Name=name, Architecture="x86_64", RootDeviceName="/dev/xvda", VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot["SnapshotId"], "VolumeSize": 8, "VolumeType": "gp3"}}],
    )["ImageId"]
    ec2.create_tags(Resources=[image], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
    return image


def choose_image(ec2, mod, ev):
    """What the controller module's data "aws_ami" "controller" returns: its filters and owners, the
    newest by creation date."""
    ami = mod.datum("aws_ami", "controller")
    filters = [(ev.eval(f["name"]), ev.eval(f["values"])) for f in ami["filter"]]
    filters += [(ev.eval(raw["name"], sc), ev.eval(raw["values"], sc)) for raw, sc in ev.dynamic(ami, "filter")]
    owners = ev.eval(ami["owners"])
    images = ec2.describe_images(Owners=owners, Filters=[{"Name": n, "Values": v} for n, v in filters])["Images"]
    if not images:
        raise SystemExit(f"the controller module's image filters {filters} match no image jbake made")
    if ev.eval(ami["most_recent"]):
        images.sort(key=lambda i: (i["CreationDate"], i["ImageId"]))
        return images[-1]["ImageId"], filters
    if len(images) > 1:
        raise SystemExit("several images match and most_recent is not set")
    return images[0]["ImageId"], filters


def lt_data(mod, ev, image_id, sg_ids, profile_name):
    """RequestLaunchTemplateData from aws_launch_template.controller."""
    lt = mod.resource("aws_launch_template", "controller")
    b = ev.block(lt)
    md = ev.block(lt["metadata_options"][0])
    ni = ev.block(lt["network_interfaces"][0])
    ebs = ev.block(lt["block_device_mappings"][0]["ebs"][0])
    bdm = ev.block(lt["block_device_mappings"][0])
    groups = [sg_ids[g.path] if isinstance(g, Ref) else g for g in ni["security_groups"]]
    data = {
        "ImageId": image_id,
        "InstanceType": b["instance_type"],
        "EbsOptimized": b["ebs_optimized"],
        "IamInstanceProfile": {"Name": profile_name},
        "MetadataOptions": {
            "HttpEndpoint": md["http_endpoint"], "HttpTokens": md["http_tokens"],
            "HttpPutResponseHopLimit": md["http_put_response_hop_limit"], "InstanceMetadataTags": md["instance_metadata_tags"],
        },
        "Monitoring": {"Enabled": ev.block(lt["monitoring"][0])["enabled"]},
        "NetworkInterfaces": [{
            "DeviceIndex": ni["device_index"], "AssociatePublicIpAddress": ni["associate_public_ip_address"],
            "DeleteOnTermination": ni["delete_on_termination"], "Groups": groups,
        }],
        "BlockDeviceMappings": [{
            "DeviceName": bdm["device_name"],
            "Ebs": {"VolumeType": ebs["volume_type"], "VolumeSize": ebs["volume_size"], "Encrypted": ebs["encrypted"],
                    "DeleteOnTermination": ebs["delete_on_termination"]},
        }],
        "TagSpecifications": [
            {"ResourceType": ev.eval(ts["resource_type"]), "Tags": [{"Key": k, "Value": v} for k, v in ev.eval(ts["tags"]).items()]}
            for ts in lt["tag_specifications"]
        ],
    }
    if b.get("key_name"):
        data["KeyName"] = b["key_name"]
    if "user_data" in lt:
        data["UserData"] = ev.eval(lt["user_data"])
    return b["name"], b.get("description"), data


def operator_policy_of(mod, refs):
    """Every operator policy the iam module attaches (the iam/*.json files it reads, and the
    PassRole policy it renders), as one document: what the operator running jbake holds."""
    ev = mod.evaluator({}, refs)
    statements = []
    for name, path in sorted(ev.local("policy_files").items()):
        for st in json.loads(Path(path).read_text())["Statement"]:
            st = dict(st)
            st["Sid"] = re.sub(r"[^A-Za-z0-9]", "", f"{name}{st.get('Sid', len(statements))}")
            statements.append(st)
    doc = mod.datum("aws_iam_policy_document", "pass_controller_role")
    for raw in doc["statement"]:
        st = ev.block(raw)
        cond = [ev.block(c) for c in raw.get("condition", [])]
        statements.append({
            "Sid": st["sid"], "Effect": st.get("effect", "Allow"), "Action": st["actions"], "Resource": st["resources"],
            "Condition": {c["test"]: {c["variable"]: c["values"]} for c in cond},
        })
    return {"Version": "2012-10-17", "Statement": statements}


def setup(args):
    root, efs_id = args["root"], args["efs_id"]
    ec2, elb, asg, iam = (boto3.client(s) for s in ("ec2", "elbv2", "autoscaling", "iam"))
    region = ec2.meta.region_name
    azs = sorted(z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"])
    mods, refs = evaluators(root, region, azs)

    # network: the VPC and its six subnets, as the module computes them
    net = mods["network"].evaluator({}, refs)
    vpc = ec2.create_vpc(CidrBlock=net.variable("cidr_block"))["Vpc"]["VpcId"]
    subnets = {}
    for tier in ("public", "private"):
        body = mods["network"].resource("aws_subnet", tier)
        ids = []
        for _, scope in net.instances(body):
            s = net.block(body, scope)
            ids.append(ec2.create_subnet(VpcId=vpc, CidrBlock=s["cidr_block"], AvailabilityZone=s["availability_zone"])["Subnet"]["SubnetId"])
        subnets[tier] = ids

    # iam: the controller's role and instance profile, as the module names them
    iev = mods["iam"].evaluator({}, refs)
    role_body = mods["iam"].resource("aws_iam_role", "instance")
    prof_body = mods["iam"].resource("aws_iam_instance_profile", "instance")
    scope = dict(iev.instances(role_body))["controller"]
    role_name = iev.eval(role_body["name"], scope)
    profile_name = iev.eval(prof_body["name"], scope)
    iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    iam.create_instance_profile(InstanceProfileName=profile_name)
    iam.add_role_to_instance_profile(InstanceProfileName=profile_name, RoleName=role_name)
    role_arn = iam.get_role(RoleName=role_name)["Role"]["Arn"]
    operator_policy = operator_policy_of(mods["iam"], dict(refs, **{'aws_iam_role.instance["controller"].arn': role_arn}))

    # images as jbake writes them: one for another EFS (never chosen), the controller image
    other = register_image(ec2, region, "jenkins-controller-2026.11.26-1", jbake_image_tags(root, "fs-0aaaaaaaaaaaaaaaa", "2026.11.26-1"))
    untested = register_image(ec2, region, "jenkins-controller-2026.11.26-2", jbake_image_tags(root, efs_id, "2026.11.26-2", tested=False))
    first = register_image(ec2, region, "jenkins-controller-2026.11.27-1", jbake_image_tags(root, efs_id, "2026.11.27-1"))

    # controller
    cm = mods["controller"]
    cvals = {"efs_id": efs_id, "allowed_cidrs": ["203.0.113.0/24"], "certificate_arn": "to be created",
             "vpc_id": vpc, "public_subnet_ids": subnets["public"], "private_subnet_ids": subnets["private"]}
    cev = cm.evaluator(cvals, refs)
    chosen, filters = choose_image(ec2, cm, cev)
    acm = boto3.client("acm")
    cert = acm.request_certificate(DomainName="jenkins.example.com")["CertificateArn"]
    cvals["certificate_arn"] = cert
    cev = cm.evaluator(cvals, dict(refs, **{"data.aws_ami.controller[0].id": chosen}))

    sg_ids = {}
    for name, body in cm.resources_of("aws_security_group").items():
        b = cev.block(body)
        sg_ids[f"aws_security_group.{name}.id"] = ec2.create_security_group(GroupName=b["name"], Description=b["description"], VpcId=vpc)["GroupId"]

    lt_name, lt_desc, data = lt_data(cm, cev, cev.local("image_id"), sg_ids, profile_name)
    lt_tags = cev.eval(cm.resource("aws_launch_template", "controller")["tags"])
    template = ec2.create_launch_template(
        LaunchTemplateName=lt_name, VersionDescription=lt_desc or "", LaunchTemplateData=data,
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": [{"Key": k, "Value": v} for k, v in lt_tags.items()]}],
    )["LaunchTemplate"]

    tgb = cm.resource("aws_lb_target_group", "controller")
    tg = cev.block(tgb)
    hc = cev.block(tgb["health_check"][0])
    tg_arn = elb.create_target_group(
        Name=tg["name"], Protocol=tg["protocol"], Port=tg["port"], VpcId=vpc, TargetType=tg["target_type"],
        HealthCheckEnabled=hc["enabled"], HealthCheckPath=hc["path"], HealthCheckProtocol=hc["protocol"],
        HealthCheckPort=hc["port"], HealthCheckIntervalSeconds=hc["interval"], HealthCheckTimeoutSeconds=hc["timeout"],
        HealthyThresholdCount=hc["healthy_threshold"], UnhealthyThresholdCount=hc["unhealthy_threshold"],
        Matcher={"HttpCode": hc["matcher"]},
    )["TargetGroups"][0]["TargetGroupArn"]
    elb.modify_target_group_attributes(TargetGroupArn=tg_arn, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": str(tg["deregistration_delay"])}])

    lbb = cev.block(cm.resource("aws_lb", "this"))
    lb = elb.create_load_balancer(
        Name=lbb["name"], Subnets=lbb["subnets"], SecurityGroups=[sg_ids[g.path] for g in lbb["security_groups"]],
        Type=lbb["load_balancer_type"], Scheme="internal" if lbb["internal"] else "internet-facing",
    )["LoadBalancers"][0]
    listeners = {}
    for name, body in cm.resources_of("aws_lb_listener").items():
        lst = cev.block(body)
        act = cev.block(body["default_action"][0])
        if act["type"] == "forward":
            action = {"Type": "forward", "TargetGroupArn": tg_arn}
        else:
            red = cev.block(body["default_action"][0]["redirect"][0])
            action = {"Type": "redirect", "RedirectConfig": {"Protocol": red["protocol"], "Port": red["port"], "StatusCode": red["status_code"]}}
        kw = {"LoadBalancerArn": lb["LoadBalancerArn"], "Protocol": lst["protocol"], "Port": lst["port"], "DefaultActions": [action]}
        if lst["protocol"] == "HTTPS":
            kw["SslPolicy"] = lst["ssl_policy"]
            kw["Certificates"] = [{"CertificateArn": lst["certificate_arn"]}]
        listeners[name] = elb.create_listener(**kw)["Listeners"][0]["ListenerArn"]

    gb = cm.resource("aws_autoscaling_group", "controller")
    g = cev.block(gb)
    lt_ref = cev.block(gb["launch_template"][0])
    assert lt_ref["version"] == Ref("aws_launch_template.controller[0].latest_version"), lt_ref
    group_tags = [{"Key": cev.eval(t["key"]), "Value": cev.eval(t["value"]), "PropagateAtLaunch": cev.eval(t["propagate_at_launch"]),
                   "ResourceId": g["name"], "ResourceType": "auto-scaling-group"} for t in gb["tag"]]
    asg.create_auto_scaling_group(
        AutoScalingGroupName=g["name"],
        LaunchTemplate={"LaunchTemplateId": template["LaunchTemplateId"], "Version": str(template["LatestVersionNumber"])},
        MinSize=g["min_size"], MaxSize=g["max_size"], DesiredCapacity=g["desired_capacity"],
        VPCZoneIdentifier=",".join(g["vpc_zone_identifier"]),
        TargetGroupARNs=[tg_arn],
        HealthCheckType=g["health_check_type"], HealthCheckGracePeriod=g["health_check_grace_period"],
        Tags=group_tags,
    )
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[g["name"]])["AutoScalingGroups"][0]

    # the image jbake bakes next: what jbake roll picks
    new = register_image(ec2, region, "jenkins-controller-2026.11.28-1", jbake_image_tags(root, efs_id, "2026.11.28-1"))
    return {
        "group": g["name"],
        "group_tags": {t["Key"]: t["Value"] for t in group_tags},
        "sizes": [g["min_size"], g["max_size"], g["desired_capacity"]],
        "template_id": template["LaunchTemplateId"],
        "template_name": lt_name,
        "first_image": first,
        "chosen_image": chosen,
        "image_filters": filters,
        "other_efs_image": other,
        "untested_image": untested,
        "new_image": new,
        "instance": group["Instances"][0]["InstanceId"] if group["Instances"] else None,
        "private_subnets": subnets["private"],
        "target_group": tg_arn,
        "health_check": hc,
        "load_balancer_dns": lb["DNSName"],
        "listeners": sorted(listeners),
        "jenkins_version": jbake_image_tags(root, efs_id, "x").get("jbake:jenkins-version"),
        "profile": profile_name,
        "operator_policy": operator_policy,
    }


def state(args):
    ec2, asg = boto3.client("ec2"), boto3.client("autoscaling")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[args["group"]])["AutoScalingGroups"][0]
    ids = [i["InstanceId"] for i in group["Instances"]]
    instances = []
    if ids:
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                instances.append({"id": i["InstanceId"], "image_id": i["ImageId"], "state": i["State"]["Name"],
                                  "subnet": i.get("SubnetId"), "public_ip": i.get("PublicIpAddress"),
                                  "profile": (i.get("IamInstanceProfile") or {}).get("Arn"),
                                  "http_tokens": (i.get("MetadataOptions") or {}).get("HttpTokens")})
    lt = group["LaunchTemplate"]
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt["LaunchTemplateId"])["LaunchTemplateVersions"]
    return {
        "sizes": [group["MinSize"], group["MaxSize"], group["DesiredCapacity"]],
        "tags": {t["Key"]: t["Value"] for t in group.get("Tags", [])},
        "group_version": lt.get("Version"),
        "suspended": [p["ProcessName"] for p in group.get("SuspendedProcesses", [])],
        "instances": instances,
        "versions": [{"number": v["VersionNumber"], "default": v["DefaultVersion"], "data": v["LaunchTemplateData"]} for v in versions],
    }


COMMANDS = {"setup": setup, "state": state}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]](json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}), default=str))
