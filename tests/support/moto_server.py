#!/usr/bin/env python3
"""`python3 -m moto.server ARGS`, with moto's SigV4 check fixed for form-encoded bodies.

Under IAM authorization (POST /moto-api/reset-auth 0) moto checks every request's SigV4
signature. For a query-protocol request (EC2, Auto Scaling, ELBv2: an
`application/x-www-form-urlencoded` body) moto 5.2.5 does not hash the body it received:
werkzeug has already consumed it into `request.form`, so `BaseResponse.raw_body` is empty and
`moto/iam/access_control.py` (`IAMRequestBase._create_aws_request`: `data=self._body or
self._data`) signs a body rebuilt from the parsed parameters with Python's `urlencode`, which
writes a space as `+`. botocore sends exactly that, so boto3 passes. The Rust SDK (like AWS's
own documentation of SigV4) writes a space as `%20`, and signs the bytes it sends: every EC2
call with a space in a value (a security group or image description, a `Name` tag, a launch
template version description) gets `AuthFailure` from moto, while AWS accepts it.

The fix: keep the body bytes as received and give them to moto's signature check, so it
hashes what the client signed, as AWS does. The check itself is moto's, unchanged: a wrong
key, secret, date or body still fails. Nothing else changes, and nothing at all while IAM
authorization is off (moto then checks no signature).
"""

import io
import sys

from moto.core import responses
from moto.moto_server import werkzeug_app

RAW_BODY = "jbake.test.raw_form_body"

_dispatch = werkzeug_app.DomainDispatcherApplication.__call__


def _keep_raw_body(self, environ, start_response):
    if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > 0:
            raw = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(raw)
            environ[RAW_BODY] = raw
    return _dispatch(self, environ, start_response)


_setup_class = responses.BaseResponse.setup_class


def _setup_class_with_raw_body(self, request, *args, **kwargs):
    _setup_class(self, request, *args, **kwargs)
    raw = getattr(request, "environ", {}).get(RAW_BODY)
    # raw_body is read by moto's authorization check only (and by S3, which sends no form).
    if raw and not self.raw_body:
        self.raw_body = raw


werkzeug_app.DomainDispatcherApplication.__call__ = _keep_raw_body
responses.BaseResponse.setup_class = _setup_class_with_raw_body

# ---- jbake roll: BEGIN (tests/roll.rs, tests/iam.rs, bench/roll-downtime) ----------------------
# Three things moto 5.2.5 does not do that `jbake roll` relies on, taught here and only here:
#
# 1. CreateLaunchTemplateVersion with SourceVersion: EC2 copies the source version's data and
#    applies the request's LaunchTemplateData over it (top-level fields replace the source's).
#    moto ignores SourceVersion: the new version holds only the given fields.
# 2. SSM parameter actions are authorized against the parameter's ARN
#    (arn:aws:ssm:REGION:ACCOUNT:parameter/NAME), as AWS does; moto checks every SSM action
#    against "*", so a statement scoped to a parameter path never matched.
# 3. The controllers' world: moto knows instances, not the Jenkins on them. A test (or the
#    benchmark) that plays the controllers posts its URL to POST /jbake-test/world; from then on
#    moto tells it what happens to instances (POST URL/__world__/event with
#    {"event": launched|terminated|stopped|started|rebooted, "instance", "image"}) and asks it for
#    the health of every target that is a running instance (GET URL/__world__/health?instance=ID
#    -> {"state", "reason", "description"}, or 404 for moto's own answer): the load balancer's
#    health checks are the world's; a terminated instance's target is "draining", as an ALB
#    deregisters it (moto keeps it "healthy" forever). Nothing changes while no world is set.

import copy as _copy
import json as _json
import threading as _threading
import urllib.parse as _urlparse
import urllib.request as _urlrequest

from moto.ec2.models.instances import InstanceBackend as _InstanceBackend
from moto.ec2.responses.launch_templates import LaunchTemplates as _LaunchTemplates
from moto.elbv2.models import FakeHealthStatus as _FakeHealthStatus
from moto.elbv2.models import FakeTargetGroup as _FakeTargetGroup
from moto.ssm.responses import SimpleSystemManagerResponse as _SsmResponse

_WORLD = {"url": None}
_WORLD_LOCK = _threading.Lock()


def _create_launch_template_version(self):
    source = self._get_param("SourceVersion")
    if not source:
        return _original_create_lt_version(self)
    name = self._get_param("LaunchTemplateName")
    tmpl_id = self._get_param("LaunchTemplateId")
    template = (
        self.ec2_backend.get_launch_template(tmpl_id)
        if tmpl_id
        else self.ec2_backend.get_launch_template_by_name(name)
    )
    data = _copy.deepcopy(template.get_version(source).data)
    data.update(self._get_param("LaunchTemplateData", {}))
    self.error_on_dryrun()
    version = template.create_version(data, self._get_param("VersionDescription"))
    from moto.core.responses import ActionResult

    return ActionResult(
        {
            "LaunchTemplateVersion": {
                "CreateTime": version.create_time,
                "CreatedBy": f"arn:{self.partition}:iam::{self.current_account}:root",
                "DefaultVersion": template.is_default(version),
                "LaunchTemplateData": version.data,
                "LaunchTemplateId": template.id,
                "LaunchTemplateName": template.name,
                "VersionDescription": version.description,
                "VersionNumber": version.number,
            }
        }
    )


_original_create_lt_version = _LaunchTemplates.create_launch_template_version
_LaunchTemplates.create_launch_template_version = _create_launch_template_version


def _ssm_resource(self):
    name = self._get_param("Name")
    if not isinstance(name, str) or not name:
        return "*"
    path = name if name.startswith("/") else "/" + name
    return f"arn:aws:ssm:{self.region}:{self.current_account}:parameter{path}"


_SsmResponse._determine_resource = _ssm_resource


def _world_url():
    with _WORLD_LOCK:
        return _WORLD["url"]


def _world_event(event, instance):
    url = _world_url()
    if not url:
        return
    body = _json.dumps(
        {"event": event, "instance": instance.id, "image": getattr(instance, "image_id", None)}
    ).encode()
    req = _urlrequest.Request(
        url + "/__world__/event", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        _urlrequest.urlopen(req, timeout=5).read()
    except Exception as e:  # the world is a test's: moto goes on
        print(f"jbake world: event {event} {instance.id}: {e}", file=sys.stderr)


def _wrap_instances(method, event, pick):
    original = getattr(_InstanceBackend, method)

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        for instance in pick(self, result, args, kwargs):
            _world_event(event, instance)
        return result

    setattr(_InstanceBackend, method, wrapped)


def _listed(self, result, args, kwargs):
    """The instances of a result: a list of instances or of (instance, previous state)."""
    return [item[0] if isinstance(item, tuple) else item for item in result]


_wrap_instances("run_instances", "launched", lambda self, r, a, k: r.instances)
for _method, _event in (
    ("terminate_instances", "terminated"),
    ("stop_instances", "stopped"),
    ("start_instances", "started"),
    ("reboot_instances", "rebooted"),
):
    _wrap_instances(_method, _event, _listed)

_original_health_for = _FakeTargetGroup.health_for


def _health_for(self, target, ec2_backend):
    moto_says = _original_health_for(self, target, ec2_backend)
    url = _world_url()
    tid = target.get("Id", "")
    if not url or not tid.startswith("i-") or moto_says.status in ("draining", "unused"):
        return moto_says
    try:
        instance = ec2_backend.get_instance_by_id(tid)
    except Exception:
        instance = None
    if instance is not None and instance.state in ("terminated", "shutting-down"):
        # moto keeps a terminated instance's target "healthy" forever; an ALB deregisters it.
        return _FakeHealthStatus(
            tid,
            moto_says.port,
            moto_says.health_check_port,
            "draining",
            "Target.DeregistrationInProgress",
            "Target deregistration is in progress",
        )
    if instance is None or instance.state == "stopped":
        return moto_says
    try:
        with _urlrequest.urlopen(
            url + "/__world__/health?" + _urlparse.urlencode({"instance": tid}), timeout=5
        ) as r:
            h = _json.loads(r.read())
    except Exception:
        return moto_says
    return _FakeHealthStatus(
        tid,
        moto_says.port,
        moto_says.health_check_port,
        h.get("state", "healthy"),
        h.get("reason"),
        h.get("description"),
    )


_FakeTargetGroup.health_for = _health_for

_dispatch_before_world = werkzeug_app.DomainDispatcherApplication.__call__


def _world_endpoint(self, environ, start_response):
    if environ.get("PATH_INFO") == "/jbake-test/world" and environ.get("REQUEST_METHOD") == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        url = environ["wsgi.input"].read(length).decode().strip() if length else ""
        with _WORLD_LOCK:
            _WORLD["url"] = url.rstrip("/") or None
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]
    return _dispatch_before_world(self, environ, start_response)


werkzeug_app.DomainDispatcherApplication.__call__ = _world_endpoint
# ---- jbake roll: END ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# bake: what EC2 does at CreateImage, ModifyImageAttribute and RunInstances that moto 5.2.5
# does not (the harness is patched, never the product). Owned by the bake tests
# (tests/build.rs); other patches go in their own block.
#
# - CreateImage with a `snapshot` TagSpecification raised NotImplementedError (HTTP 500): the
#   tags now go on the image's snapshot, as AWS does.
# - CreateImage accepted a name this account already uses in the region; AWS answers
#   `InvalidAMIName.Duplicate` (what a retried CreateImage whose first answer was lost gets).
# - ModifyImageAttribute ignored `ImdsSupport` (the AMI then launches IMDSv2-only): it is
#   recorded and shown by DescribeImages (`ImdsSupport`) and DescribeImageAttribute.
# - RunInstances ignored `ClientToken`: the same token now returns the reservation it made,
#   as AWS does (what a retried RunInstances whose first answer was lost gets).
# ---------------------------------------------------------------------------------------------


def _install_bake_patches():
    from moto.core.responses import EmptyResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.amis import AmiBackend
    from moto.ec2.models.instances import InstanceBackend
    from moto.ec2.responses.amis import AmisResponse

    create_image = AmiBackend.create_image

    def create_image_like_aws(self, instance_id, name, description, tag_specifications):
        for ami in list(self.amis.values()):
            if ami.name == name and ami.owner_id == self.account_id:
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate",
                    f"AMI name {name} is already in use by AMI {ami.id}",
                )
        image_specs = [s for s in tag_specifications or [] if s.get("ResourceType") != "snapshot"]
        snapshot_tags = {}
        for spec in tag_specifications or []:
            if spec.get("ResourceType") == "snapshot":
                for tag in spec.get("Tags", []):
                    snapshot_tags[tag["Key"]] = tag["Value"]
        ami = create_image(self, instance_id, name, description, tag_specifications=image_specs)
        if snapshot_tags:
            self.create_tags([ami.ebs_snapshot.id], snapshot_tags)
        return ami

    modify_image_attribute = AmisResponse.modify_image_attribute

    def modify_image_attribute_with_imds(self):
        imds = self._get_param("ImdsSupport.Value") or self._get_param("ImdsSupport")
        if isinstance(imds, dict):
            imds = imds.get("Value")
        if imds is None:
            return modify_image_attribute(self)
        if imds != "v2.0":
            raise EC2ClientError(
                "InvalidParameterValue", f"Value ({imds}) for parameter ImdsSupport is invalid."
            )
        self.error_on_dryrun()
        ami = self.ec2_backend.describe_images(ami_ids=[self._get_param("ImageId")])[0]
        ami.imds_support = "v2.0"
        ami.imds = "v2.0"
        return EmptyResult()

    run_instances = InstanceBackend.run_instances

    def run_instances_idempotent(self, image_id, count, user_data, security_group_names, **kwargs):
        token = kwargs.get("client_token")
        if token and token != "ABCDE":
            for reservation in self.reservations.values():
                if any(getattr(i, "client_token", None) == token for i in reservation.instances):
                    return reservation
        return run_instances(self, image_id, count, user_data, security_group_names, **kwargs)

    AmiBackend.create_image = create_image_like_aws
    AmisResponse.modify_image_attribute = modify_image_attribute_with_imds
    InstanceBackend.run_instances = run_instances_idempotent


_install_bake_patches()
# ------------------------------------------------------------------------ end of the bake block


# ---------------------------------------------------------------------------------------------
# distribute: what EC2 and KMS do at CopyImage, GetEbsDefaultKmsKeyId and CreateImage that moto
# 5.2.5 does not (the harness is patched, never the product). Owned by the copy/share/publish
# tests (tests/distribute.rs); other patches go in their own block.
#
# - CopyImage ignored ClientToken (a retry whose answer was lost made a second copy), its
#   TagSpecifications (image and snapshot), Encrypted and KmsKeyId, and took a name the
#   destination region already has. Now: the same token in the same region returns the same
#   copy; the copy and its snapshot carry the requested tags; the snapshot is encrypted with the
#   given key (its ARN), or the region's default EBS key; it is described as AWS describes a
#   copied snapshot ("Copied for DestinationAmi ami-… from SourceAmi ami-… for SourceSnapshot
#   snap-…. Task created on …"); a name taken in the region is `InvalidAMIName.Duplicate`.
# - GetEbsDefaultKmsKeyId was not implemented (HTTP 500): it answers `alias/aws/ebs` until
#   ModifyEbsDefaultKmsKeyId names another key, then that key's ARN, as AWS does.
# - The keys behind the reserved aliases (alias/aws/ebs, …) were customer managed keys; on AWS
#   they are AWS managed (KeyManager AWS: their policy cannot be changed, so an image encrypted
#   with aws/ebs cannot be shared).
# - CreateImage made an unencrypted snapshot whatever the instance's root volume was; on AWS the
#   snapshot has the volume's encryption (and key).
# ---------------------------------------------------------------------------------------------


def _install_distribute_patches():
    import time as _time

    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.amis import AmiBackend
    from moto.ec2.models.elastic_block_store import EBSBackend
    from moto.ec2.responses.amis import AmisResponse
    from moto.ec2.responses.elastic_block_store import ElasticBlockStore
    from moto.kms.models import KmsBackend
    from moto.kms.utils import RESERVED_ALIASES

    def key_arn(backend, key):
        """The ARN of a key named by id, alias or ARN in the backend's region (None: unknown)."""
        from moto.kms import kms_backends

        kms = kms_backends[backend.account_id][backend.region_name]
        try:
            return kms.describe_key(key).arn
        except Exception:
            return None

    def default_key_arn(backend):
        if not backend.default_kms_key_id:
            backend._create_default_encryption_key()
        return backend.default_kms_key_id

    def copy_image_like_aws(self):
        token = self._get_param("ClientToken")
        backend = self.ec2_backend
        tokens = backend.__dict__.setdefault("_jbake_copy_tokens", {})
        if token and token in tokens and tokens[token] in backend.amis:
            return ActionResult({"ImageId": tokens[token]})
        name = self._get_param("Name")
        for ami in list(backend.amis.values()):
            if ami.name == name and ami.owner_id == backend.account_id:
                raise EC2ClientError(
                    "InvalidAMIName.Duplicate",
                    f"AMI name {name} is already in use by AMI {ami.id}",
                )
        source_id = self._get_param("SourceImageId")
        source_region = self._get_param("SourceRegion")
        self.error_on_dryrun()
        image = backend.copy_image(source_id, source_region, name, self._get_param("Description"))
        specs = self._get_param("TagSpecifications", []) or []
        for spec in specs:
            tags = {t["Key"]: t["Value"] for t in spec.get("Tags", [])}
            if spec.get("ResourceType") == "image":
                for k, v in tags.items():
                    image.add_tag(k, v)
            elif spec.get("ResourceType") == "snapshot":
                backend.create_tags([image.ebs_snapshot.id], tags)
        from moto.ec2.models import ec2_backends

        source = ec2_backends[backend.account_id][source_region].describe_images(
            ami_ids=[source_id]
        )[0]
        snap = image.ebs_snapshot
        key = self._get_param("KmsKeyId")
        encrypted = str(self._get_param("Encrypted", "false")).lower() == "true"
        if key or encrypted or source.ebs_snapshot.encrypted:
            snap.encrypted = True
            snap.kms_key_id = (key_arn(backend, key) or key) if key else default_key_arn(backend)
        snap.description = (
            f"Copied for DestinationAmi {image.id} from SourceAmi {source_id} for SourceSnapshot "
            f"{source.ebs_snapshot.id}. Task created on {int(_time.time() * 1000):,}."
        )
        if token:
            tokens[token] = image.id
        return ActionResult({"ImageId": image.id})

    def get_ebs_default_kms_key_id(self):
        self.error_on_dryrun()
        backend = self.ec2_backend
        if backend.__dict__.get("_jbake_default_key_set"):
            return ActionResult({"KmsKeyId": backend.default_kms_key_id})
        return ActionResult({"KmsKeyId": "alias/aws/ebs"})

    modify_default = EBSBackend.modify_ebs_default_kms_key_id

    def modify_ebs_default_kms_key_id(self, kms_key_id):
        arn = modify_default(self, kms_key_id)
        self.__dict__["_jbake_default_key_set"] = bool(kms_key_id)
        return arn

    create_default = EBSBackend._create_default_encryption_key

    def create_default_encryption_key(self):
        arn = create_default(self)
        from moto.kms import kms_backends

        kms = kms_backends[self.account_id][self.region_name]
        kms.describe_key(arn).key_manager = "AWS"
        return arn

    describe_key = KmsBackend.describe_key

    def describe_key_like_aws(self, key_id):
        key = describe_key(self, key_id)
        if any(a in RESERVED_ALIASES for a in key.aliases):
            key.key_manager = "AWS"
        return key

    create_image = AmiBackend.create_image

    def create_image_encrypted_like_its_volume(self, instance_id, name, description, tag_specifications):
        ami = create_image(self, instance_id, name, description, tag_specifications)
        instance = self.get_instance(instance_id)
        for _, device in instance.get_block_device_mapping:
            volume = self.get_volume(device.volume_id)
            if volume.encrypted:
                ami.ebs_snapshot.encrypted = True
                ami.ebs_snapshot.kms_key_id = key_arn(self, volume.kms_key_id) or volume.kms_key_id
                break
        return ami

    AmisResponse.copy_image = copy_image_like_aws
    ElasticBlockStore.get_ebs_default_kms_key_id = get_ebs_default_kms_key_id
    EBSBackend.modify_ebs_default_kms_key_id = modify_ebs_default_kms_key_id
    EBSBackend._create_default_encryption_key = create_default_encryption_key
    KmsBackend.describe_key = describe_key_like_aws
    AmiBackend.create_image = create_image_encrypted_like_its_volume


_install_distribute_patches()
# ------------------------------------------------------------------ end of the distribute block


if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
