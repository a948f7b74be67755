#!/usr/bin/env python3
"""Test helper: small boto3 calls against a moto server, JSON on stdout.

Usage: awsctl.py COMMAND [JSON_ARGS]. Endpoint, region and credentials come from the
environment the Rust harness sets (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...).

Commands:
  resources {"region"}                 snapshot of EC2 state (instances, key pairs, ...)
  recorded {"recording"}               API action names in a moto recording (JSON lines)
  recorded-requests {"recording"}      the same requests with their query/form parameters
  iam-user {"policy"}                  new IAM user with that inline policy -> access key
  put-parameter {"name","value","secure","region"}
  get-parameter {"name","region"}      {"value","version","data_type"}, or null
  register-image {"name","tags","region","encrypted","kms_key_id"}
                                       an AMI (from a fresh snapshot, encrypted if asked)
  kms-key {"region","alias"}           a customer managed key with that alias -> {"arn"}
  ebs-default-key {"region","key"}     the account's default EBS key there -> {"arn"}
  launch-permissions {"region","image_id"}  the accounts that may launch the image
  plant {"build_id", ...}              key pair, group, instance, image tagged like a build's,
                                       named as given (gc tests)
  watch {"tag_key","instance_type"}    forever: one JSON line per new running instance
                                       (of that type, when given), with its decoded user
                                       data, key pair public key, image and the instance
                                       that image was made from (if CreateImage made it);
                                       then one line {"event": "terminated"} when it goes
"""

import base64
import json
import re
import sys
import time
import uuid
from urllib.parse import parse_qs

import boto3


def client(service, region=None):
    return boto3.client(service, region_name=region) if region else boto3.client(service)


def tags(items):
    return {t["Key"]: t["Value"] for t in (items or [])}


def decode_user_data(ec2, instance_id):
    try:
        attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return None
    value = (attr.get("UserData") or {}).get("Value")
    if not value:
        return None
    try:
        return base64.b64decode(value).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001
        return value


def resources(args):
    ec2 = client("ec2", args.get("region"))
    instances = []
    for page in ec2.get_paginator("describe_instances").paginate():
        for r in page["Reservations"]:
            for i in r["Instances"]:
                instances.append({
                    "id": i["InstanceId"],
                    "state": i["State"]["Name"],
                    "tags": tags(i.get("Tags")),
                    "image_id": i.get("ImageId"),
                    "key_name": i.get("KeyName"),
                    "user_data": decode_user_data(ec2, i["InstanceId"]),
                    "http_tokens": (i.get("MetadataOptions") or {}).get("HttpTokens"),
                })
    key_pairs = [
        {"name": k["KeyName"], "id": k.get("KeyPairId"), "tags": tags(k.get("Tags"))}
        for k in ec2.describe_key_pairs()["KeyPairs"]
    ]
    security_groups = [
        {"id": g["GroupId"], "name": g["GroupName"], "tags": tags(g.get("Tags"))}
        for g in ec2.describe_security_groups()["SecurityGroups"]
        if g["GroupName"] != "default"
    ]
    images = []
    for im in ec2.describe_images(Owners=["self"])["Images"]:
        images.append({
            "id": im["ImageId"],
            "name": im.get("Name"),
            "state": im.get("State"),
            "tags": tags(im.get("Tags")),
            "imds_support": im.get("ImdsSupport"),
            "snapshot_ids": [
                b["Ebs"]["SnapshotId"]
                for b in im.get("BlockDeviceMappings", [])
                if b.get("Ebs", {}).get("SnapshotId")
            ],
        })
    snapshots = [
        {
            "id": s["SnapshotId"],
            "tags": tags(s.get("Tags")),
            "state": s.get("State"),
            "description": s.get("Description"),
            "encrypted": s.get("Encrypted", False),
            "kms_key_id": s.get("KmsKeyId"),
        }
        for page in ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"])
        for s in page["Snapshots"]
    ]
    return {
        "instances": instances,
        "key_pairs": key_pairs,
        "security_groups": security_groups,
        "images": images,
        "snapshots": snapshots,
    }


def action_of(entry):
    """The API action of one recorded request: X-Amz-Target (JSON protocol), else the
    Action of the query string or the form body."""
    headers = {k.lower(): v for k, v in (entry.get("headers") or {}).items()}
    target = headers.get("x-amz-target")
    if target:
        return target.rsplit(".", 1)[-1]
    url = entry.get("url") or ""
    if "?" in url:
        action = parse_qs(url.split("?", 1)[1]).get("Action")
        if action:
            return action[0]
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    action = parse_qs(body).get("Action")
    if action:
        return action[0]
    # REST-JSON (e.g. the moto api itself) has no action name: method and path.
    return f"{entry.get('method')} {url.split('?', 1)[0]}"


def params_of(entry):
    """The query/form parameters of one recorded request, flattened ({"Name.1.Key": "v"})."""
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        body = base64.b64decode(body).decode("utf-8", "replace")
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    url = entry.get("url") or ""
    params = {}
    for text in (url.split("?", 1)[1] if "?" in url else "", body):
        for k, v in parse_qs(text).items():
            params[k] = v[0]
    return params


def recorded_requests(args):
    requests = []
    for line in args["recording"].splitlines():
        line = line.strip()
        if line:
            entry = json.loads(line)
            requests.append({"action": action_of(entry), "params": params_of(entry)})
    return requests


def recorded(args):
    actions = []
    for line in args["recording"].splitlines():
        line = line.strip()
        if line:
            actions.append(action_of(json.loads(line)))
    return actions


def iam_user(args):
    iam = client("iam")
    name = args.get("name") or f"jbake-test-{uuid.uuid4().hex[:10]}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="test", PolicyDocument=args["policy"])
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"user": name, "access_key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


def put_parameter(args):
    ssm = client("ssm", args.get("region"))
    out = ssm.put_parameter(
        Name=args["name"],
        Value=args["value"],
        Type="SecureString" if args.get("secure") else "String",
        Overwrite=True,
    )
    return {"version": out.get("Version")}


def get_parameter(args):
    ssm = client("ssm", args.get("region"))
    try:
        p = ssm.get_parameter(Name=args["name"])["Parameter"]
    except ssm.exceptions.ParameterNotFound:
        return None
    return {"value": p["Value"], "version": p["Version"], "data_type": p.get("DataType")}


def kms_key(args):
    kms = client("kms", args.get("region"))
    key = kms.create_key(Description="jbake test key")["KeyMetadata"]
    kms.create_alias(AliasName=args["alias"], TargetKeyId=key["KeyId"])
    return {"arn": key["Arn"]}


def ebs_default_key(args):
    ec2 = client("ec2", args.get("region"))
    return {"arn": ec2.modify_ebs_default_kms_key_id(KmsKeyId=args["key"])["KmsKeyId"]}


def launch_permissions(args):
    ec2 = client("ec2", args.get("region"))
    out = ec2.describe_image_attribute(ImageId=args["image_id"], Attribute="launchPermission")
    return sorted(p["UserId"] for p in out.get("LaunchPermissions", []) if "UserId" in p)


def encrypted_image(ec2, args):
    """An image made by CreateImage from a stopped instance whose root volume is encrypted
    (with args["kms_key_id"], or the region's default EBS key), as a build makes it."""
    ebs = {"VolumeSize": 8, "Encrypted": True}
    if args.get("kms_key_id"):
        ebs["KmsKeyId"] = args["kms_key_id"]
    base = ec2.describe_images(Owners=["137112412989"])["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1,
                            BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": ebs}],
                            )["Instances"][0]["InstanceId"]
    tag_list = [{"Key": k, "Value": v} for k, v in (args.get("tags") or {}).items()]
    specs = [{"ResourceType": "image", "Tags": tag_list}] if tag_list else []
    image = ec2.create_image(InstanceId=iid, Name=args["name"], TagSpecifications=specs)["ImageId"]
    ec2.terminate_instances(InstanceIds=[iid])
    snap = ec2.describe_images(ImageIds=[image])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    return {"image_id": image, "snapshot_id": snap}


def register_image(args):
    ec2 = client("ec2", args.get("region"))
    if args.get("encrypted"):
        return encrypted_image(ec2, args)
    volume = ec2.create_volume(AvailabilityZone=(args.get("region") or ec2.meta.region_name) + "a", Size=8)
    snapshot = ec2.create_snapshot(VolumeId=volume["VolumeId"])
    ec2.delete_volume(VolumeId=volume["VolumeId"])
    image = ec2.register_image(
        Name=args["name"],
        Architecture="x86_64",
        RootDeviceName="/dev/xvda",
        VirtualizationType="hvm",
        BlockDeviceMappings=[{
            "DeviceName": "/dev/xvda",
            "Ebs": {"SnapshotId": snapshot["SnapshotId"], "VolumeSize": 8, "VolumeType": "gp3"},
        }],
    )
    tag_list = [{"Key": k, "Value": v} for k, v in (args.get("tags") or {}).items()]
    if tag_list:
        ec2.create_tags(Resources=[image["ImageId"]], Tags=tag_list)
    return {"image_id": image["ImageId"], "snapshot_id": snapshot["SnapshotId"]}


def plant(args):
    """Resources tagged like a build's (jbake:build-id and times from args), named as given:
    {"build_id", "created", "expires", "key_name", "group_name", "instance_key",
    "instance_name", "image_name", "image_version", "image_complete", "public_key"}.
    Returns their ids."""
    ec2 = client("ec2", args.get("region"))
    base = [
        {"Key": "jbake:build-id", "Value": args["build_id"]},
        {"Key": "jbake:recipe", "Value": "r"},
        {"Key": "jbake:created-at", "Value": args["created"]},
        {"Key": "jbake:expires-at", "Value": args["expires"]},
    ]
    spec = lambda rt, extra=(): [{"ResourceType": rt, "Tags": base + list(extra)}]
    out = {}
    if args.get("key_name"):
        ec2.import_key_pair(KeyName=args["key_name"], PublicKeyMaterial=args["public_key"].encode(),
                            TagSpecifications=spec("key-pair"))
        out["key_pair"] = args["key_name"]
    if args.get("group_name"):
        out["group"] = ec2.create_security_group(
            GroupName=args["group_name"], Description="planted",
            TagSpecifications=spec("security-group"))["GroupId"]
    if args.get("instance_name"):
        img = ec2.describe_images(Owners=["137112412989"])["Images"][0]["ImageId"]
        kw = {"KeyName": args["instance_key"]} if args.get("instance_key") else {}
        r = ec2.run_instances(ImageId=img, MinCount=1, MaxCount=1, **kw,
                              TagSpecifications=spec("instance", [{"Key": "Name", "Value": args["instance_name"]}]))
        out["instance"] = r["Instances"][0]["InstanceId"]
    if args.get("image_name"):
        img = ec2.describe_images(Owners=["137112412989"])["Images"][0]["ImageId"]
        r = ec2.run_instances(ImageId=img, MinCount=1, MaxCount=1)
        iid = r["Instances"][0]["InstanceId"]
        extra = [{"Key": "jbake:complete", "Value": args.get("image_complete", "false")},
                 {"Key": "jbake:version", "Value": args.get("image_version", "2026.01.01-1")}]
        out["image"] = ec2.create_image(InstanceId=iid, Name=args["image_name"],
                                        TagSpecifications=spec("image", extra) + spec("snapshot"))["ImageId"]
        ec2.terminate_instances(InstanceIds=[iid])
    return out


def source_instance(ec2, image_id):
    """The instance CreateImage made `image_id` from (its snapshot's description says)."""
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
        snaps = [b["Ebs"]["SnapshotId"] for i in images for b in i.get("BlockDeviceMappings", [])
                 if b.get("Ebs", {}).get("SnapshotId")]
        if not snaps:
            return None
        for s in ec2.describe_snapshots(SnapshotIds=snaps)["Snapshots"]:
            m = re.match(r"Created by CreateImage\((i-[0-9a-f]+)\)", s.get("Description") or "")
            if m:
                return m.group(1)
    except Exception as e:  # noqa: BLE001 - a base image moto made up, say
        print(f"awsctl watch: image {image_id}: {e}", file=sys.stderr, flush=True)
    return None


def watch(args):
    ec2 = client("ec2", args.get("region"))
    tag_key = args.get("tag_key")
    seen = set()
    gone = set()
    while True:
        try:
            filters = [{"Name": "instance-state-name",
                        "Values": ["running", "shutting-down", "terminated"]}]
            if tag_key:
                filters.append({"Name": "tag-key", "Values": [tag_key]})
            if args.get("instance_type"):
                filters.append({"Name": "instance-type", "Values": [args["instance_type"]]})
            reservations = ec2.describe_instances(Filters=filters)["Reservations"]
            for r in reservations:
                for i in r["Instances"]:
                    iid = i["InstanceId"]
                    if i["State"]["Name"] != "running":
                        if iid in seen and iid not in gone:
                            gone.add(iid)
                            print(json.dumps({"event": "terminated", "instance_id": iid}),
                                  flush=True)
                        continue
                    if iid in seen:
                        continue
                    seen.add(iid)
                    public_key = None
                    if i.get("KeyName"):
                        try:
                            kp = ec2.describe_key_pairs(
                                KeyNames=[i["KeyName"]], IncludePublicKey=True
                            )["KeyPairs"][0]
                            public_key = kp.get("PublicKey")
                        except Exception as e:  # noqa: BLE001
                            print(f"awsctl watch: key pair {i['KeyName']}: {e}", file=sys.stderr)
                    print(json.dumps({
                        "event": "launched",
                        "instance_id": iid,
                        "image_id": i.get("ImageId"),
                        "source_instance": source_instance(ec2, i["ImageId"]),
                        "key_name": i.get("KeyName"),
                        "public_key": public_key,
                        "user_data": decode_user_data(ec2, iid),
                        "tags": tags(i.get("Tags")),
                    }), flush=True)
        except Exception as e:  # noqa: BLE001 - keep watching (e.g. during a reset)
            print(f"awsctl watch: {e}", file=sys.stderr, flush=True)
        time.sleep(float(args.get("interval", 0.1)))


COMMANDS = {
    "resources": resources,
    "recorded": recorded,
    "recorded-requests": recorded_requests,
    "iam-user": iam_user,
    "put-parameter": put_parameter,
    "get-parameter": get_parameter,
    "kms-key": kms_key,
    "ebs-default-key": ebs_default_key,
    "launch-permissions": launch_permissions,
    "register-image": register_image,
    "plant": plant,
    "watch": watch,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: awsctl.py {{{'|'.join(COMMANDS)}}} [JSON_ARGS]")
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if sys.argv[1] in ("recorded", "recorded-requests") and "recording" not in args:
        args["recording"] = sys.stdin.read()
    json.dump(COMMANDS[sys.argv[1]](args), sys.stdout)


if __name__ == "__main__":
    main()
