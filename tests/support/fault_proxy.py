#!/usr/bin/env python3
"""Test helper: an HTTP reverse proxy that injects AWS API faults (standard library only).

Usage: fault_proxy.py UPSTREAM_URL   (listens on 127.0.0.1, a free port; prints
"LISTENING <port>" on stdout once it accepts connections)

Control endpoints (on the proxy itself, never forwarded):
  POST /__fault__/rules   JSON list of rules, replacing the current ones
  GET  /__fault__/log     JSON list of {"action", "region", "fault"} for every request seen
  POST /__fault__/address {"instance_id", "ip"}: DescribeInstances shows that instance's public
                          and private IP as `ip` (the nspawn machine the harness booted for it:
                          moto's addresses lead nowhere), with or without the world

A rule: {"action": "CreateImage", "status": 500, "code": "InternalError",
"message": "...", "times": N (default unlimited), "delay_ms": M, "drop": true,
"after": "RunInstances" (only once that action was seen since the rules were set),
"region": "us-west-2" (only requests to that region: the region of the request's SigV4
credential scope, as AWS and moto read it when one endpoint serves every region)}.
The first rule whose action matches (and has times left) applies: it waits
delay_ms, then closes the connection without an answer (drop), or answers with an
EC2-style XML error (status given), or (delay only) forwards. A rule with "hold": KEY
keeps the request waiting until POST /__fault__/release {"hold": KEY} (at most 60 s), then
goes on as above: a test does something while the call is on its way, without racing it.

A realistic AWS ("the world", off until set; rules still apply first):
  POST /__fault__/world   JSON object (below) turns it on, `null` turns it off
  GET  /__fault__/world   JSON: what it injected so far, by kind
  POST /__fault__/ready   {"instance_id"}: cloud-init is done on that instance (see below)

EC2 as AWS documents it and moto does not show it, in scaled time (seconds, not minutes):
  "not_found": N      a new instance, security group or image (learnt from the answer to
                      RunInstances, CreateSecurityGroup, CreateImage) is NotFound for the first
                      N requests naming it (DescribeInstances, AuthorizeSecurityGroupIngress,
                      CreateTags, TerminateInstances, RunInstances naming the group, ...):
                      InvalidInstanceID.NotFound, InvalidGroup.NotFound, InvalidAMIID.NotFound
  "hide_s": S         ... and missing from list answers (filters, no ids) for S seconds
  "pending_s": S      an instance is `pending` for S seconds after RunInstances; with
  "pending_until_ready": true   also until POST /__fault__/ready names it (the cloud-init
                      stand-in says so once the instance's host key is installed), at most
                      "pending_max_s" (default 60)
  "stopping_s": S     `stopping` for S seconds after StopInstances
  "shutting_down_s": S  `shutting-down` for S seconds after TerminateInstances; meanwhile, and
                      "group_busy_s" longer (its network interface lingers), its security group
                      cannot be deleted (DependencyViolation); "group_in_use": N refuses the
                      first N deletes after that too
  "image_pending_s": S  an image is `pending` for S seconds after CreateImage, without block
                      device mappings; its snapshots (found by "for ami-..." in their
                      description) are `pending` with it
  "copy_pending_s": S  the same for a copy after CopyImage (default: image_pending_s); its
                      snapshots are found by "DestinationAmi ami-..." in their description
  "throttle_every": N, "throttle_p": P, "throttle_burst": B   every Nth request, or each
                      request with probability P, starts a burst of B answers HTTP 503
                      RequestLimitExceeded (the request does not reach moto)
  "lose_once": [ACTION, ...]   the first successful answer to each is lost after the call took
                      effect; "lose_nth": {ACTION: [N, ...]}: the Nth successful answers to
                      it (counted from 1); "lose_p": P, "lose_actions": [...]: each such answer with
                      probability P; "lose_how": ["drop", "500"] (default both, chosen at
                      random): the connection closes without an answer, or HTTP 500
                      InternalError; or "hang": no answer for "hang_s" seconds (default 30),
                      then the connection closes (the client's timeout must end the attempt)
  "seed": N           the random choices (throttle_p, lose_p, lose_how) are reproducible
"""

import http.client
import json
import random
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

UPSTREAM = urlsplit(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000")
LOCK = threading.Lock()
RULES = []
LOG = []
SEEN = set()  # actions seen since the rules were last set (for "after")
HOLDS = {}  # hold key -> threading.Event set by POST /__fault__/release
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "proxy-authenticate", "proxy-authorization"}


def action_of(path, headers, body):
    target = headers.get("X-Amz-Target")
    if target:
        return target.rsplit(".", 1)[-1]
    query = urlsplit(path).query
    action = parse_qs(query).get("Action")
    if action:
        return action[0]
    ctype = headers.get("Content-Type", "")
    if "x-www-form-urlencoded" in ctype or body[:7] == b"Action=":
        action = parse_qs(body.decode("utf-8", "replace")).get("Action")
        if action:
            return action[0]
    return ""


CREDENTIAL_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/")


def region_of(headers):
    """The region a request is for: its SigV4 credential scope (one endpoint serves all)."""
    m = CREDENTIAL_SCOPE.search(headers.get("Authorization") or "")
    return m.group(1) if m else ""


def take_rule(action, region=""):
    with LOCK:
        for rule in RULES:
            if rule.get("action") not in (action, "*"):
                continue
            if rule.get("region") and rule["region"] != region:
                continue
            if rule.get("after") and rule["after"] not in SEEN:
                continue
            times = rule.get("times")
            if times is not None:
                if times <= 0:
                    continue
                rule["times"] = times - 1
            return dict(rule)
    return None


# ------------------------------------------------------------------------ the realistic world

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15"
WORLD = None
READY = set()  # instance ids cloud-init is done with (POST /__fault__/ready)
ADDRESSES = {}  # instance id -> the address of the machine that plays it
NOT_FOUND = {
    "instance": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
    "group": ("InvalidGroup.NotFound", "The security group '{}' does not exist"),
    "image": ("InvalidAMIID.NotFound", "The image id '[{}]' does not exist"),
}


def params_of(path, body):
    params = {}
    query = urlsplit(path).query
    for text in (query, body.decode("utf-8", "replace")):
        for k, v in parse_qs(text).items():
            params[k] = v[0]
    return params


def kind_of(resource_id):
    for prefix, kind in (("i-", "instance"), ("sg-", "group"), ("ami-", "image")):
        if resource_id.startswith(prefix):
            return kind
    return None


def referenced_ids(params):
    """Ids of instances, groups and images a request names (not through filters)."""
    ids = []
    for k, v in params.items():
        base = k.split(".", 1)[0]
        if base in ("InstanceId", "ResourceId", "GroupId", "SecurityGroupId", "ImageId") and kind_of(v):
            ids.append(v)
    return ids


def q(tag):
    return f"{{{EC2_NS}}}{tag}"


class World:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rng = random.Random(cfg.get("seed", 0))
        self.things = {}  # id -> {"kind", "t", "refs", "sgs", "stop", "term"}
        self.requests = 0
        self.burst = 0
        self.lost_once = set()
        self.answered = {}  # action -> successful answers so far (for lose_nth)
        self.stats = {}

    def count(self, what):
        self.stats[what] = self.stats.get(what, 0) + 1

    def f(self, key, default=0.0):
        return float(self.cfg.get(key) or default)

    # -- before forwarding: what AWS would refuse -------------------------------------------
    def throttled(self):
        self.requests += 1
        if self.burst > 0:
            self.burst -= 1
            self.count("throttle")
            return True
        every = int(self.cfg.get("throttle_every") or 0)
        p = self.f("throttle_p")
        starts = (every and self.requests % every == 0) or (p and self.rng.random() < p)
        if starts:
            self.burst = max(int(self.cfg.get("throttle_burst") or 1), 1) - 1
            self.count("throttle")
            return True
        return False

    def not_yet(self, action, params):
        for rid in referenced_ids(params):
            thing = self.things.get(rid)
            if thing and thing["refs"] > 0:
                if action in ("RunInstances", "CreateImage") and thing["kind"] != "group":
                    continue  # the base image and the imaged instance are old
                thing["refs"] -= 1
                self.count("not_found")
                code, message = NOT_FOUND[thing["kind"]]
                return code, message.format(rid)
        return None

    def in_use(self, action, params):
        if action != "DeleteSecurityGroup":
            return None
        gid = params.get("GroupId")
        now = time.monotonic()
        for iid, thing in self.things.items():
            if thing["kind"] != "instance" or gid not in thing.get("sgs", []):
                continue
            term = thing.get("term")
            busy = self.f("shutting_down_s") + self.f("group_busy_s")
            refusals = thing.setdefault("in_use", int(self.cfg.get("group_in_use") or 0))
            if term is None or now - term < busy or refusals > 0:
                if term is not None and now - term >= busy:
                    thing["in_use"] = refusals - 1
                self.count("dependency")
                return ("DependencyViolation", f"resource {gid} has a dependent object")
        return None

    # -- after forwarding: learn, then show the answer as AWS would --------------------------
    def learn(self, action, params, data):
        now = time.monotonic()
        refs = int(self.cfg.get("not_found") or 0)
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            return
        new = []
        if action == "RunInstances":
            sgs = [v for k, v in params.items() if k.startswith("SecurityGroupId")]
            for item in root.iter(q("instanceId")):
                new.append((item.text, "instance", {"sgs": sgs}))
        elif action == "CreateSecurityGroup":
            for item in root.iter(q("groupId")):
                new.append((item.text, "group", {}))
        elif action == "CreateImage":
            for item in root.iter(q("imageId")):
                new.append((item.text, "image", {}))
        elif action == "CopyImage":
            for item in root.iter(q("imageId")):
                new.append((item.text, "image", {"copy": True}))
        for rid, kind, extra in new:
            if rid and rid not in self.things:  # a retried RunInstances returns the same one
                self.things[rid] = dict(kind=kind, t=now, refs=refs, **extra)
        if action in ("StopInstances", "TerminateInstances"):
            key = "stop" if action == "StopInstances" else "term"
            for k, v in params.items():
                if k.startswith("InstanceId") and v in self.things:
                    self.things[v].setdefault(key, now)

    def age(self, rid):
        thing = self.things.get(rid)
        return None if thing is None else time.monotonic() - thing["t"]

    def hidden(self, rid):
        age = self.age(rid)
        return age is not None and age < self.f("hide_s")

    def instance_state(self, iid, state):
        thing = self.things.get(iid)
        if thing is None:
            return None
        now = time.monotonic()
        age = now - thing["t"]
        waiting = age < self.f("pending_s")
        if self.cfg.get("pending_until_ready"):
            waiting = waiting or (iid not in READY and age < self.f("pending_max_s", 60))
        if state == "running" and waiting:
            return ("0", "pending")
        stop, term = thing.get("stop"), thing.get("term")
        if state == "stopped" and stop is not None and now - stop < self.f("stopping_s"):
            return ("64", "stopping")
        if state == "terminated" and term is not None and now - term < self.f("shutting_down_s"):
            return ("32", "shutting-down")
        return None

    def image_pending(self, ami):
        age = self.age(ami)
        if age is None:
            return False
        if self.things[ami].get("copy") and self.cfg.get("copy_pending_s") is not None:
            return age < self.f("copy_pending_s")
        return age < self.f("image_pending_s")

    def rewrite(self, action, params, data):
        if action not in ("DescribeInstances", "DescribeImages", "DescribeSnapshots",
                          "DescribeSecurityGroups"):
            return data
        try:
            root = ET.fromstring(data)
        except ET.ParseError:
            return data
        by_id = bool(referenced_ids(params)) or any(k.startswith("SnapshotId") for k in params)
        changed = False
        if action == "DescribeInstances":
            for rset in root.iter(q("reservationSet")):
                for res in list(rset):
                    iset = res.find(q("instancesSet"))
                    for inst in list(iset) if iset is not None else []:
                        iid = inst.findtext(q("instanceId"))
                        if not by_id and self.hidden(iid):
                            iset.remove(inst)
                            changed = True
                            self.count("hidden")
                            continue
                        st = inst.find(q("instanceState"))
                        name = st.findtext(q("name")) if st is not None else None
                        shown = self.instance_state(iid, name)
                        if shown:
                            st.find(q("code")).text, st.find(q("name")).text = shown
                            changed = True
                            self.count(shown[1])
                    if iset is not None and len(iset) == 0:
                        rset.remove(res)
        elif action == "DescribeSecurityGroups":
            for info in root.iter(q("securityGroupInfo")):
                for g in list(info):
                    if not by_id and self.hidden(g.findtext(q("groupId"))):
                        info.remove(g)
                        changed = True
                        self.count("hidden")
        elif action == "DescribeImages":
            for iset in root.iter(q("imagesSet")):
                for im in list(iset):
                    ami = im.findtext(q("imageId"))
                    if not by_id and self.hidden(ami):
                        iset.remove(im)
                        changed = True
                        self.count("hidden")
                        continue
                    if self.image_pending(ami):
                        im.find(q("imageState")).text = "pending"
                        bdm = im.find(q("blockDeviceMapping"))
                        if bdm is not None:
                            for child in list(bdm):
                                bdm.remove(child)
                        changed = True
                        self.count("image_pending")
        elif action == "DescribeSnapshots":
            for sset in root.iter(q("snapshotSet")):
                for snap in list(sset):
                    m = re.search(r"(?:for|DestinationAmi) (ami-[0-9a-f]+)",
                                  snap.findtext(q("description")) or "")
                    if not m or m.group(1) not in self.things:
                        continue
                    ami = m.group(1)
                    if not by_id and self.hidden(ami):
                        sset.remove(snap)
                        changed = True
                        self.count("hidden")
                        continue
                    if self.image_pending(ami):
                        snap.find(q("status")).text = "pending"
                        progress = snap.find(q("progress"))
                        if progress is not None:
                            progress.text = "42%"
                        changed = True
                        self.count("snapshot_pending")
        if not changed:
            return data
        ET.register_namespace("", EC2_NS)
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)

    def lose(self, action):
        """Whether the answer to this (successful) call is lost; how."""
        how = self.cfg.get("lose_how") or ["drop", "500"]
        n = self.answered[action] = self.answered.get(action, 0) + 1
        if n in ((self.cfg.get("lose_nth") or {}).get(action) or []):
            pass
        elif action in (self.cfg.get("lose_once") or []) and action not in self.lost_once:
            self.lost_once.add(action)
        elif action in (self.cfg.get("lose_actions") or []) and self.rng.random() < self.f("lose_p"):
            pass
        else:
            return None
        self.count("lost")
        return self.rng.choice(how)


def readdress(data):
    """A DescribeInstances answer with the addresses of POST /__fault__/address."""
    with LOCK:
        addresses = dict(ADDRESSES)
    if not addresses:
        return data
    try:
        root = ET.fromstring(data)
    except ET.ParseError:
        return data
    changed = False
    for inst in root.iter(q("item")):
        ip = addresses.get(inst.findtext(q("instanceId")) or "")
        if not ip:
            continue
        for tag in ("ipAddress", "privateIpAddress"):
            el = inst.find(q(tag))
            if el is None:
                el = ET.SubElement(inst, q(tag))
            el.text = ip
        changed = True
    if not changed:
        return data
    ET.register_namespace("", EC2_NS)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: the log endpoint says what happened
        pass

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status, body, ctype):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _control(self, body):
        global RULES, SEEN, WORLD
        if self.command == "POST" and self.path == "/__fault__/rules":
            rules = json.loads(body or b"[]")
            with LOCK:
                RULES = rules
                SEEN = set()
            self._reply(200, b"ok", "text/plain")
        elif self.command == "POST" and self.path == "/__fault__/world":
            cfg = json.loads(body or b"null")
            with LOCK:
                WORLD = World(cfg) if cfg else None
                READY.clear()
            self._reply(200, b"ok", "text/plain")
        elif self.command == "GET" and self.path == "/__fault__/world":
            with LOCK:
                text = json.dumps(WORLD.stats if WORLD else None).encode()
            self._reply(200, text, "application/json")
        elif self.command == "POST" and self.path == "/__fault__/ready":
            with LOCK:
                READY.add(json.loads(body or b"{}").get("instance_id"))
            self._reply(200, b"ok", "text/plain")
        elif self.command == "POST" and self.path == "/__fault__/address":
            args = json.loads(body or b"{}")
            with LOCK:
                ADDRESSES[args.get("instance_id")] = args.get("ip")
            self._reply(200, b"ok", "text/plain")
        elif self.command == "POST" and self.path == "/__fault__/release":
            key = json.loads(body or b"{}").get("hold")
            with LOCK:
                event = HOLDS.setdefault(key, threading.Event())
            event.set()
            self._reply(200, b"ok", "text/plain")
        elif self.command == "GET" and self.path == "/__fault__/log":
            with LOCK:
                text = json.dumps(LOG).encode()
            self._reply(200, text, "application/json")
        else:
            self._reply(404, b"unknown control endpoint", "text/plain")

    def _handle(self):
        body = self._body()
        if self.path.startswith("/__fault__/"):
            return self._control(body)
        action = action_of(self.path, self.headers, body)
        self._action = action
        region = region_of(self.headers)
        rule = take_rule(action, region) if action else None
        with LOCK:
            SEEN.add(action)
        if rule and rule.get("hold"):
            with LOCK:
                event = HOLDS.setdefault(rule["hold"], threading.Event())
            event.wait(60)
        if rule and rule.get("delay_ms"):
            time.sleep(rule["delay_ms"] / 1000.0)
        injected = bool(rule) and (rule.get("drop") or rule.get("status") is not None)
        self._entry = {"action": action, "region": region, "fault": injected}
        with LOCK:
            LOG.append(self._entry)
        if rule and rule.get("drop"):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if rule and rule.get("status") is not None:
            return self._error(int(rule["status"]), rule.get("code", "InternalError"),
                               rule.get("message", "injected by the fault proxy"))
        with LOCK:
            world = WORLD
        if world is None or not action:
            return self._forward(body)
        self._forward_in_world(world, action, body)

    def _error(self, status, code, message):
        xml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               f"<Response><Errors><Error><Code>{escape(str(code))}</Code>"
               f"<Message>{escape(str(message))}</Message>"
               "</Error></Errors><RequestID>fault-proxy</RequestID></Response>")
        self._reply(status, xml.encode(), "text/xml")

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _log_world(self, action, kind):
        with LOCK:
            self._entry["fault"] = True
            self._entry["world"] = kind

    def _forward_in_world(self, world, action, body):
        params = params_of(self.path, body)
        with LOCK:
            if world.throttled():
                refused = (503, "RequestLimitExceeded", "Request limit exceeded.", "throttle")
            else:
                found = world.not_yet(action, params) or world.in_use(action, params)
                refused = None
                if found:
                    status = 400
                    refused = (status, found[0], found[1],
                               "dependency" if found[0] == "DependencyViolation" else "not_found")
        if refused:
            self._log_world(action, refused[3])
            return self._error(refused[0], refused[1], refused[2])
        status, headers, data = self._upstream(body)
        if status is None:
            return self._reply(502, data, "text/plain")
        lost = None
        if 200 <= status < 300:
            with LOCK:
                world.learn(action, params, data)
                data = world.rewrite(action, params, data)
                lost = world.lose(action)
        if lost:
            self._log_world(action, "lost")
            if lost == "drop":
                return self._drop()
            if lost == "hang":
                time.sleep(world.f("hang_s", 30.0))
                return self._drop()
            return self._error(500, "InternalError", "An internal error has occurred (the call took effect)")
        self._send(status, headers, data)

    def _upstream(self, body):
        """moto's answer: (status, headers, body), or (None, None, error text)."""
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        except OSError as e:
            return None, None, f"fault proxy: upstream: {e}".encode()
        finally:
            conn.close()

    def _send(self, status, headers, data):
        if getattr(self, "_action", "") == "DescribeInstances" and 200 <= status < 300:
            data = readdress(data)
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forward(self, body):
        status, headers, data = self._upstream(body)
        if status is None:
            return self._reply(502, data, "text/plain")
        self._send(status, headers, data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
