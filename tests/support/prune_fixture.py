#!/usr/bin/env python3
"""Test helper for tests/prune.rs: things that use images, made with boto3 against moto.

Usage: prune_fixture.py JSON_ARGS, with AWS_* from the harness. Args:
  {"template": {"name", "versions": [image id or "resolve:ssm:NAME", ...]},
   "stopped_instance": image id, "region"}
Creates a launch template whose versions use those image ids (version 1 first), and an
instance launched from `stopped_instance`, then stopped. Prints {"template_id", "instance_id"}.
"""

import json
import sys

import boto3


def main():
    args = json.loads(sys.argv[1])
    ec2 = boto3.client("ec2", region_name=args.get("region"))
    out = {}
    t = args.get("template")
    if t:
        first, *rest = t["versions"]
        lt = ec2.create_launch_template(
            LaunchTemplateName=t["name"],
            LaunchTemplateData={"ImageId": first, "InstanceType": "t3.small"},
        )["LaunchTemplate"]
        for image in rest:
            ec2.create_launch_template_version(
                LaunchTemplateId=lt["LaunchTemplateId"],
                LaunchTemplateData={"ImageId": image, "InstanceType": "t3.small"},
            )
        out["template_id"] = lt["LaunchTemplateId"]
    image = args.get("stopped_instance")
    if image:
        i = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.small")
        iid = i["Instances"][0]["InstanceId"]
        ec2.stop_instances(InstanceIds=[iid])
        out["instance_id"] = iid
    print(json.dumps(out))


if __name__ == "__main__":
    main()
