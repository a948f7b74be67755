#!/usr/bin/env python3
"""Test helper: an HTTP reverse proxy that injects AWS API faults (standard library only).

Usage: fault_proxy.py UPSTREAM_URL   (listens on 127.0.0.1, a free port; prints
"LISTENING <port>" on stdout once it accepts connections)

Control endpoints (on the proxy itself, never forwarded):
  POST /__fault__/rules   JSON list of rules, replacing the current ones
  GET  /__fault__/log     JSON list of {"action", "fault"} for every request seen

A rule: {"action": "CreateImage", "status": 500, "code": "InternalError",
"message": "...", "times": N (default unlimited), "delay_ms": M, "drop": true,
"after": "RunInstances" (only once that action was seen since the rules were set)}.
The first rule whose action matches (and has times left) applies: it waits
delay_ms, then closes the connection without an answer (drop), or answers with an
EC2-style XML error (status given), or (delay only) forwards.
"""

import http.client
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

UPSTREAM = urlsplit(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000")
LOCK = threading.Lock()
RULES = []
LOG = []
SEEN = set()  # actions seen since the rules were last set (for "after")
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


def take_rule(action):
    with LOCK:
        for rule in RULES:
            if rule.get("action") not in (action, "*"):
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
        global RULES, SEEN
        if self.command == "POST" and self.path == "/__fault__/rules":
            rules = json.loads(body or b"[]")
            with LOCK:
                RULES = rules
                SEEN = set()
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
        rule = take_rule(action) if action else None
        with LOCK:
            SEEN.add(action)
        if rule and rule.get("delay_ms"):
            time.sleep(rule["delay_ms"] / 1000.0)
        injected = bool(rule) and (rule.get("drop") or rule.get("status") is not None)
        with LOCK:
            LOG.append({"action": action, "fault": injected})
        if rule and rule.get("drop"):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if rule and rule.get("status") is not None:
            code = escape(str(rule.get("code", "InternalError")))
            message = escape(str(rule.get("message", "injected by the fault proxy")))
            xml = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                   f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
                   "</Error></Errors><RequestID>fault-proxy</RequestID></Response>")
            return self._reply(int(rule["status"]), xml.encode(), "text/xml")
        self._forward(body)

    def _forward(self, body):
        conn = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            return self._reply(502, f"fault proxy: upstream: {e}".encode(), "text/plain")
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
