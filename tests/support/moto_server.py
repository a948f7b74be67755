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

if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
