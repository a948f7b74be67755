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


if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
