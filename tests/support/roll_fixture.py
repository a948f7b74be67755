#!/usr/bin/env python3
"""Test helper for `jbake roll`: the controller's infrastructure in moto, JSON on stdout.

Usage: roll_fixture.py COMMAND [JSON_ARGS]; endpoint, region and credentials from the
environment (Moto::env).

Commands:
  setup {"name", "ami", "group_version", ["min", "max", "desired"]}
                                         launch template (no UserData: moto 5.2.5 fails to
                                         launch a group's replacement from one that has it),
                                         target group, ALB + listener, group 1/1/1 tagged
                                         jbake:role=controller -> ids and the first instance
  state {"group"}                        the group, EC2's view of its instances, the launch
                                         template's versions (with their data) and target health
  stop-others {"group", "keep"}          stops the group's instances other than `keep`
                                         (their targets turn "unused": never healthy)
  set-default {"group", "version"}       makes `version` the default of the group's template
                                         (a change made behind jbake's back)
  set-sizes {"group", "max", "desired"}  changes the group's max (and desired) capacity
  put-lock {"group", "value"}            creates the group's roll lock parameter with `value`
  add-version {"group", "source", "data"} a new template version from `source` with `data` over it
"""

import json
import sys

import boto3


def setup(args):
    name = args["name"]
    ec2 = boto3.client("ec2")
    elb = boto3.client("elbv2")
    asg = boto3.client("autoscaling")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    by_az = {}
    for s in subnets:
        by_az.setdefault(s["AvailabilityZone"], s["SubnetId"])
    subnet_ids = sorted(by_az.values())[:2]
    sg = ec2.create_security_group(GroupName=name, Description="jenkins", VpcId=vpc)["GroupId"]
    lt = ec2.create_launch_template(
        LaunchTemplateName=name,
        LaunchTemplateData={
            "ImageId": args["ami"],
            "InstanceType": "t3.small",
            "SecurityGroupIds": [sg],
            "EbsOptimized": True,
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 2},
            "BlockDeviceMappings": [{
                "DeviceName": "/dev/xvda",
                "Ebs": {"VolumeSize": 16, "VolumeType": "gp3", "Encrypted": True},
            }],
            "TagSpecifications": [{
                "ResourceType": "instance",
                "Tags": [{"Key": "Name", "Value": "jenkins-controller"}],
            }],
        },
    )["LaunchTemplate"]
    tg = elb.create_target_group(
        Name=name, Protocol="HTTP", Port=8080, VpcId=vpc, TargetType="instance",
        HealthCheckPath="/login",
    )["TargetGroups"][0]["TargetGroupArn"]
    lb = elb.create_load_balancer(
        Name=name, Subnets=subnet_ids, SecurityGroups=[sg], Type="application",
    )["LoadBalancers"][0]
    elb.create_listener(
        LoadBalancerArn=lb["LoadBalancerArn"], Protocol="HTTP", Port=80,
        DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}],
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplateId"],
                        "Version": args.get("group_version") or "1"},
        MinSize=args.get("min", 1), MaxSize=args.get("max", 1),
        DesiredCapacity=args.get("desired", 1),
        VPCZoneIdentifier=",".join(subnet_ids),
        TargetGroupARNs=[tg],
        Tags=[{"Key": "jbake:role", "Value": "controller", "PropagateAtLaunch": False,
               "ResourceId": name, "ResourceType": "auto-scaling-group"}],
    )
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    return {
        "template_id": lt["LaunchTemplateId"],
        "target_group": tg,
        "load_balancer_dns": lb["DNSName"],
        "instance": group["Instances"][0]["InstanceId"],
    }


def state(args):
    name = args["group"]
    ec2 = boto3.client("ec2")
    elb = boto3.client("elbv2")
    asg = boto3.client("autoscaling")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    lt = group["LaunchTemplate"]
    ids = [i["InstanceId"] for i in group["Instances"]]
    instances = []
    if ids:
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                instances.append({"id": i["InstanceId"], "image_id": i["ImageId"],
                                  "state": i["State"]["Name"]})
    versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt["LaunchTemplateId"])
    health = []
    lock = None
    try:
        lock = boto3.client("ssm").get_parameter(Name="/jbake/locks/roll/" + name)["Parameter"]["Value"]
    except Exception as e:  # ParameterNotFound
        if "ParameterNotFound" not in str(e):
            raise
    for tg in group.get("TargetGroupARNs", []):
        for d in elb.describe_target_health(TargetGroupArn=tg)["TargetHealthDescriptions"]:
            health.append({"id": d["Target"]["Id"], "state": d["TargetHealth"]["State"]})
    return {
        "group_version": lt.get("Version"),
        "sizes": [group["MinSize"], group["MaxSize"], group["DesiredCapacity"]],
        "suspended": sorted(p["ProcessName"] for p in group.get("SuspendedProcesses", [])),
        "protected": sorted(i["InstanceId"] for i in group["Instances"]
                            if i.get("ProtectedFromScaleIn")),
        "lock": lock,
        "instances": instances,
        "versions": [
            {"number": v["VersionNumber"], "default": v["DefaultVersion"],
             "data": v["LaunchTemplateData"]}
            for v in versions["LaunchTemplateVersions"]
        ],
        "health": health,
    }


def stop_others(args):
    ec2 = boto3.client("ec2")
    asg = boto3.client("autoscaling")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[args["group"]])["AutoScalingGroups"][0]
    others = [i["InstanceId"] for i in group["Instances"] if i["InstanceId"] != args["keep"]]
    if others:
        running = ec2.describe_instances(InstanceIds=others)["Reservations"]
        others = [i["InstanceId"] for r in running for i in r["Instances"]
                  if i["State"]["Name"] == "running"]
    if others:
        ec2.stop_instances(InstanceIds=others)
    return {"stopped": others}


def set_default(args):
    asg = boto3.client("autoscaling")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[args["group"]])["AutoScalingGroups"][0]
    boto3.client("ec2").modify_launch_template(
        LaunchTemplateId=group["LaunchTemplate"]["LaunchTemplateId"],
        DefaultVersion=str(args["version"]),
    )
    return {}


def set_sizes(args):
    kwargs = {"AutoScalingGroupName": args["group"], "MaxSize": args["max"]}
    if "desired" in args:
        kwargs["DesiredCapacity"] = args["desired"]
    boto3.client("autoscaling").update_auto_scaling_group(**kwargs)
    return {}


def put_lock(args):
    boto3.client("ssm").put_parameter(
        Name="/jbake/locks/roll/" + args["group"], Value=args["value"], Type="String"
    )
    return {}


def add_version(args):
    """A new version of the group's template from `source` with `data` over it, as Terraform
    writes one when the template changes (the group's version and the default stay)."""
    asg = boto3.client("autoscaling")
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[args["group"]])["AutoScalingGroups"][0]
    v = boto3.client("ec2").create_launch_template_version(
        LaunchTemplateId=group["LaunchTemplate"]["LaunchTemplateId"],
        SourceVersion=str(args["source"]),
        LaunchTemplateData=args["data"],
    )["LaunchTemplateVersion"]
    return {"version": v["VersionNumber"]}


COMMANDS = {
    "setup": setup,
    "state": state,
    "stop-others": stop_others,
    "set-default": set_default,
    "set-sizes": set_sizes,
    "put-lock": put_lock,
    "add-version": add_version,
}

if __name__ == "__main__":
    command = sys.argv[1]
    arguments = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print(json.dumps(COMMANDS[command](arguments), default=str))
