#!/usr/bin/python3
"""A small plain-HTTP forward proxy for apt inside a jbake instance stand-in.

The stand-in instance lives in its own network namespace without NAT; apt inside
it is configured with Acquire::http::Proxy pointing here (the host side of the
instance's veth pair). Only absolute-URI GET and HEAD requests are served, and by
default only to the Debian mirror hosts.

Usage: apt-proxy.py --listen ADDR [--port 3142] [--log FILE]
                    [--allow-host HOST]... [--allow-any-host]

Standard library only; one thread per client connection; upstream connections
are kept alive per client connection.
"""

import argparse
import http.client
import http.server
import socketserver
import sys
import threading
import time
import urllib.parse

DEFAULT_HOSTS = ("deb.debian.org", "security.debian.org")
HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
CHUNK = 64 * 1024


class Log:
    def __init__(self, path):
        self.lock = threading.Lock()
        self.out = open(path, "a", buffering=1) if path else sys.stderr

    def write(self, line):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with self.lock:
            self.out.write(f"{stamp} {line}\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "jbake-apt-proxy"

    def setup(self):
        super().setup()
        self.upstreams = {}

    def finish(self):
        for conn in self.upstreams.values():
            conn.close()
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        self.server.log.write(f"{self.client_address[0]} {format % args}")

    def do_GET(self):
        self.forward(send_body=True)

    def do_HEAD(self):
        self.forward(send_body=False)

    def refuse(self, code, why):
        self.server.log.write(f"refused {self.command} {self.path}: {why}")
        self.send_error(code, why)

    def upstream(self, host, port):
        conn = self.upstreams.get((host, port))
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=60)
            self.upstreams[(host, port)] = conn
        return conn

    def forward(self, send_body):
        url = urllib.parse.urlsplit(self.path)
        if url.scheme != "http" or not url.hostname:
            self.refuse(400, "only absolute http:// URIs are proxied")
            return
        host = url.hostname.lower()
        if not self.server.allow_any and host not in self.server.allowed:
            self.refuse(403, f"host {host} is not allowed")
            return
        port = url.port or 80
        target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = url.netloc
        response = None
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed
            conn = self.upstream(host, port)
            try:
                conn.request(self.command, target, headers=headers)
                response = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                self.upstreams.pop((host, port), None)
                if attempt == 2:
                    self.refuse(502, f"upstream {host}:{port}: {err}")
                    return
        length = response.getheader("Content-Length")
        no_body = not send_body or response.status in (204, 304) or 100 <= response.status < 200
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        if length is not None:
            self.send_header("Content-Length", length)
        elif not no_body:
            # Unknown length (chunked upstream): delimit the body by closing.
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        sent = 0
        try:
            if not no_body:
                while True:
                    data = response.read(CHUNK)
                    if not data:
                        break
                    self.wfile.write(data)
                    sent += len(data)
            else:
                response.read()
        finally:
            if response.will_close:
                conn.close()
                self.upstreams.pop((host, port), None)
        self.server.log.write(f"{self.command} {self.path} -> {response.status} {sent} bytes")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main():
    parser = argparse.ArgumentParser(description="plain-HTTP forward proxy for apt")
    parser.add_argument("--listen", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, default=3142)
    parser.add_argument("--log", help="log file (default: stderr)")
    parser.add_argument("--allow-host", action="append", default=[], help="allowed upstream host")
    parser.add_argument("--allow-any-host", action="store_true")
    args = parser.parse_args()
    server = Server((args.listen, args.port), Handler)
    server.log = Log(args.log)
    server.allowed = {h.lower() for h in (args.allow_host or DEFAULT_HOSTS)}
    server.allow_any = args.allow_any_host
    server.log.write(f"listening on {args.listen}:{args.port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
