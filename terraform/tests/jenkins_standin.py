#!/usr/bin/env python3
"""A Jenkins stand-in for the Terraform contract test's `jbake roll`: what roll asks Jenkins.

Usage: jenkins_standin.py --version V --calls FILE
Listens on 127.0.0.1 (a free port, printed as the first line of stdout), appends "METHOD /path"
of every request to FILE, and answers like Jenkins: GET /login (200, X-Jenkins, X-Instance-Identity
of one JENKINS_HOME), the CSRF crumb with its session cookie, POST /quietDown and /cancelQuietDown
(crumb and session required), /computer/api/json with no build running. Runs until killed.
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CRUMB = "c0ffee-terraform"
SESSION = "JSESSIONID.tf=standin"
IDENTITY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAterraformstandin"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", required=True)
    ap.add_argument("--calls", required=True)
    args = ap.parse_args()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def record(self):
            with lock, open(args.calls, "a") as f:
                f.write(f"{self.command} {self.path.split('?')[0]}\n")

        def reply(self, status, body=b"", headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("X-Jenkins", args.version)
            self.send_header("X-Instance-Identity", IDENTITY)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.record()
            path = self.path.split("?")[0]
            if path == "/login":
                self.reply(200, b"<html>Sign in [Jenkins]</html>", [("Content-Type", "text/html")])
            elif path == "/crumbIssuer/api/json":
                body = json.dumps({"crumb": CRUMB, "crumbRequestField": "Jenkins-Crumb"}).encode()
                self.reply(200, body, [("Content-Type", "application/json"), ("Set-Cookie", f"{SESSION}; Path=/; HttpOnly")])
            elif path == "/computer/api/json":
                body = json.dumps({"busyExecutors": 0, "computer": [
                    {"displayName": "Built-In Node", "executors": [{"currentExecutable": None}], "oneOffExecutors": []}]}).encode()
                self.reply(200, body, [("Content-Type", "application/json")])
            else:
                self.reply(404, b"not found")

        def do_POST(self):
            self.record()
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path.split("?")[0]
            if path in ("/quietDown", "/cancelQuietDown"):
                ok = self.headers.get("Jenkins-Crumb") == CRUMB and SESSION in (self.headers.get("Cookie") or "")
                self.reply(302 if ok else 403, b"" if ok else b"No valid crumb was included in the request", [("Location", "/")])
            else:
                self.reply(404, b"not found")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
