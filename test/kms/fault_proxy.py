#!/usr/bin/env python3
"""fault_proxy.py — a fault-injecting HTTP proxy in front of moto, for the KMS tests.

Test harness layer (Python stdlib only).  It listens on 127.0.0.1 (port 0 by default:
the kernel picks one) and prints the port as the first line of stdout.  Requests are
forwarded unchanged, Host header included, to the upstream (moto) — so a SigV4
signature made for the proxy's address is what moto verifies.  moto answers every
request with "Connection: close"; the proxy opens one upstream connection per request
and keeps its own client connections alive (HTTP/1.1 with Content-Length), so libcurl's
connection reuse is exercised too.

Control API (requests without X-Amz-Target, never counted):

  POST /_fault   {"op": "Decrypt" | "*" | "other", "mode": MODE, "count": N}
                 or a list of such rules ("*" is every KMS operation; "other", a
                 request without X-Amz-Target such as STS, is matched only by name).
                 The first rule whose op matches and whose
                 count is not used up answers the request instead of moto; count -1
                 (the default is 1) never runs out.  Optional "seconds" bounds a hang
                 or a slow body (default 30, at most 120).  Mode "rate" takes
                 "rate": R and matches only while the proxy has forwarded R or more
                 requests in the last second (a KMS request quota).
  GET  /_counts  {"ops": {"Decrypt": {"requests": n, "forwarded": n, "faulted": n,
                                      "max_in_flight": n}},
                  "total": {...}, "access_keys": {"AKIA...": n}, "session_tokens": n}
                 — ops named after X-Amz-Target's operation ("other" without one);
                 max_in_flight is the most requests of that op (in "total": of any
                 op) the proxy was handling at one moment, from the request's first
                 byte read to the answer's last byte written, so a test can tell
                 that a client kept several requests in flight;
                 access_keys counts the access key ids that signed requests (from
                 the Authorization header's Credential=, never the signature) and
                 session_tokens the requests that carried X-Amz-Security-Token, so a
                 test can tell which credential source the client used.
  GET  /_arrivals {"arrivals": [[t, op, "forwarded" | MODE], ...]} — every
                 KMS request in arrival order, t in seconds of a monotonic clock, so a
                 test can count the requests of any one-second window.
  POST /_reset   forget rules, counts and arrivals, release hung requests.
  POST /_release release hung and held requests; rules and counts stay.

MODE is one of
  throttle        400 ThrottlingException            (retryable)
  429             429 with an empty body              (retryable)
  500             500 KMSInternalException            (retryable)
  503             503 with a plain-text body          (retryable)
  reset           read the request, then reset the TCP connection (retryable)
  hang            read the request, answer nothing until released or "seconds"
  hold            read the request, wait until released (or "seconds"), then forward
                  it and relay moto's answer: a call that is slow but succeeds
  delay           wait "seconds" (fractions allowed), then forward: network latency.
                  Counted as forwarded, not faulted.
  slow_body       200 and headers at once, then one body byte a second
  garbage         200 with a body that is not JSON
  big             200 with a 100 KiB body (above the client's response cap)
  disabled        400 DisabledException
  invalid_state   400 KMSInvalidStateException
  access_denied   400 AccessDeniedException
  expired_token   400 ExpiredTokenException
  xml_auth_error  403 with an XML <ErrorResponse> (InvalidClientTokenId), as moto
                  answers some authentication failures
  short_plaintext forward, then replace Plaintext with 16 random bytes
  wrong_keyid     forward, then replace KeyId with another key's ARN
  bad_base64      forward, then put a non-base64 character into Plaintext (or, when
                  there is none, CiphertextBlob)
  rate            400 ThrottlingException, but only while R requests or more were
                  forwarded within the last second (the rule's "rate": R); otherwise
                  the request goes on to the next rule or to moto

Bounded: at most 64 requests in flight, every wait has a deadline, and the process
exits on SIGTERM/SIGINT, when its parent dies (--parent-pid), or after --lifetime
seconds.
"""

import argparse
import base64
import http.client
import json
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_IN_FLIGHT = 64
MAX_BODY = 1 << 20
UPSTREAM_TIMEOUT = 30

CREDENTIAL_RE = re.compile(r"Credential=([A-Za-z0-9]{1,128})/")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding",
              "te", "trailer", "upgrade", "content-length"}

MODES = {"rate", "throttle", "429", "500", "503", "reset", "hang", "hold", "delay", "slow_body", "garbage",
         "big",
         "disabled", "invalid_state", "access_denied", "expired_token",
         "xml_auth_error", "short_plaintext", "wrong_keyid", "bad_base64"}

JSON_ERRORS = {
    "throttle": (400, "ThrottlingException", "Rate exceeded"),
    "rate": (400, "ThrottlingException", "Rate exceeded"),
    "500": (500, "KMSInternalException", "Internal failure"),
    "disabled": (400, "DisabledException", "The key is disabled."),
    "invalid_state": (400, "KMSInvalidStateException", "The key is pending deletion."),
    "access_denied": (400, "AccessDeniedException", "Not authorized."),
    "expired_token": (400, "ExpiredTokenException", "The security token included in the request is expired"),
}


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.rules = []
        self.counts = {}
        self.access_keys = {}
        self.session_tokens = 0
        self.in_flight = {}                 # op -> requests being handled now
        self.max_in_flight = {}             # op ("*": any) -> most at one moment
        self.arrivals = []                  # [t, op, outcome] of every KMS request
        self.forwarded_times = []           # monotonic times of forwarded requests
        self.release = threading.Event()    # set to free hung requests
        self.stop = threading.Event()

    def enter(self, op):
        with self.lock:
            self.in_flight[op] = self.in_flight.get(op, 0) + 1
            self.max_in_flight[op] = max(self.max_in_flight.get(op, 0), self.in_flight[op])
            every = sum(self.in_flight.values())
            self.max_in_flight["*"] = max(self.max_in_flight.get("*", 0), every)

    def leave(self, op):
        with self.lock:
            self.in_flight[op] -= 1

    def release_held(self):
        with self.lock:
            old = self.release
            self.release = threading.Event()
        old.set()

    def reset(self):
        with self.lock:
            self.rules = []
            self.counts = {}
            self.access_keys = {}
            self.session_tokens = 0
            self.max_in_flight = {}
            self.arrivals = []
            self.forwarded_times = []
            old = self.release
            self.release = threading.Event()
        old.set()

    def add_rules(self, rules):
        with self.lock:
            for r in rules:
                mode = str(r.get("mode", ""))
                if mode not in MODES:
                    raise ValueError("unknown mode %r" % mode)
                self.rules.append({
                    "op": str(r.get("op", "*")),
                    "mode": mode,
                    "count": int(r.get("count", 1)),
                    "seconds": min(float(r.get("seconds", 30)), 120.0),
                    "rate": float(r.get("rate", 0)),
                })

    def forwarded_last_second(self, now):
        while self.forwarded_times and self.forwarded_times[0] <= now - 1.0:
            self.forwarded_times.pop(0)
        return len(self.forwarded_times)

    def take_rule(self, op):
        # "*" means every KMS operation; other requests (STS) only match "other"
        ops = (op,) if op == "other" else ("*", op)
        now = time.monotonic()
        with self.lock:
            for r in self.rules:
                if r["count"] != 0 and r["op"] in ops:
                    if r["mode"] == "rate" and self.forwarded_last_second(now) < r["rate"]:
                        continue
                    if r["count"] > 0:
                        r["count"] -= 1
                    if op != "other":
                        self.arrivals.append([now, op, r["mode"]])
                    return dict(r), self.release
            if op != "other":
                self.arrivals.append([now, op, "forwarded"])
            self.forwarded_times.append(now)
        return None, self.release

    def count(self, op, what):
        with self.lock:
            c = self.counts.setdefault(op, {"requests": 0, "forwarded": 0, "faulted": 0})
            c[what] += 1

    def signer(self, akid, token):
        with self.lock:
            if akid:
                self.access_keys[akid] = self.access_keys.get(akid, 0) + 1
            if token:
                self.session_tokens += 1

    def snapshot(self):
        with self.lock:
            ops = {k: dict(v) for k, v in self.counts.items()}
            for k, v in ops.items():
                v["max_in_flight"] = self.max_in_flight.get(k, 0)
            keys = dict(self.access_keys)
            tokens = self.session_tokens
            most = self.max_in_flight.get("*", 0)
        total = {"requests": 0, "forwarded": 0, "faulted": 0}
        for v in ops.values():
            for k in total:
                total[k] += v[k]
        total["max_in_flight"] = most
        return {"ops": ops, "total": total, "access_keys": keys, "session_tokens": tokens}


STATE = State()
SLOTS = threading.BoundedSemaphore(MAX_IN_FLIGHT)
UPSTREAM = None     # (host, port)


def client_gone(sock, wait):
    """True when the client closed its end (readable with EOF) within `wait` s."""
    try:
        r, _, _ = select.select([sock], [], [], wait)
        if r:
            return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
    return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fault-proxy/1"
    timeout = 60        # idle keep-alive connections do not live forever
    # Small writes of headers then body otherwise wait ~40 ms for delayed ACKs.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):     # quiet: tests read stdout for the port
        pass

    # -- plumbing ---------------------------------------------------------------

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def answer(self, status, body, ctype="application/x-amz-json-1.1", extra=None):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amzn-RequestId", "00000000-0000-0000-0000-000000000000")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def answer_json(self, status, obj):
        self.answer(status, json.dumps(obj), "application/json")

    # -- entry points -----------------------------------------------------------

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def do_PUT(self):
        self.dispatch()

    def do_DELETE(self):
        self.dispatch()

    def dispatch(self):
        if not SLOTS.acquire(timeout=5):
            self.answer(503, "proxy busy", "text/plain")
            return
        try:
            self.handle_one()
        finally:
            SLOTS.release()

    def handle_one(self):
        try:
            body = self.read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        path = urllib.parse.urlsplit(self.path).path
        target = self.headers.get("X-Amz-Target")
        if target is None and path in ("/_fault", "/_counts", "/_arrivals", "/_reset",
                                       "/_release"):
            self.control(path, body)
            return

        op = target.split(".", 1)[-1] if target else "other"
        STATE.enter(op)
        try:
            self.handle_kms(op, body)
        finally:
            STATE.leave(op)

    def handle_kms(self, op, body):
        STATE.count(op, "requests")
        m = CREDENTIAL_RE.search(self.headers.get("Authorization") or "")
        STATE.signer(m.group(1) if m else None,
                     bool(self.headers.get("X-Amz-Security-Token")))
        rule, release = STATE.take_rule(op)
        if rule is not None and rule["mode"] == "delay":
            deadline = time.monotonic() + rule["seconds"]
            while time.monotonic() < deadline and not release.is_set() \
                    and not STATE.stop.is_set():
                if client_gone(self.connection, min(0.05, max(0.0, deadline - time.monotonic()))):
                    self.close_connection = True
                    return
            with STATE.lock:
                STATE.forwarded_times.append(time.monotonic())
            rule = None
        if rule is None:
            STATE.count(op, "forwarded")
            self.forward(body)
            return
        STATE.count(op, "faulted")
        self.fault(rule, release, body)

    def control(self, path, body):
        if path == "/_counts" and self.command == "GET":
            self.answer_json(200, STATE.snapshot())
        elif path == "/_arrivals" and self.command == "GET":
            with STATE.lock:
                arrivals = [list(a) for a in STATE.arrivals]
            self.answer_json(200, {"arrivals": arrivals})
        elif path == "/_reset" and self.command == "POST":
            STATE.reset()
            self.answer_json(200, {"ok": True})
        elif path == "/_release" and self.command == "POST":
            STATE.release_held()
            self.answer_json(200, {"ok": True})
        elif path == "/_fault" and self.command == "POST":
            try:
                spec = json.loads(body or b"{}")
                STATE.add_rules(spec if isinstance(spec, list) else [spec])
            except (ValueError, TypeError) as e:
                self.answer_json(400, {"error": str(e)})
                return
            self.answer_json(200, {"ok": True})
        else:
            self.answer_json(404, {"error": "unknown control request"})

    # -- forwarding -------------------------------------------------------------

    def upstream(self, body):
        conn = http.client.HTTPConnection(UPSTREAM[0], UPSTREAM[1], timeout=UPSTREAM_TIMEOUT)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            return resp.status, headers, data
        finally:
            conn.close()

    def relay(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def forward(self, body):
        try:
            status, headers, data = self.upstream(body)
        except (OSError, http.client.HTTPException):
            self.answer(502, "upstream unavailable", "text/plain")
            return
        self.relay(status, headers, data)

    # -- faults -----------------------------------------------------------------

    def fault(self, rule, release, body):
        mode = rule["mode"]
        if mode in JSON_ERRORS:
            status, typ, msg = JSON_ERRORS[mode]
            self.answer(status, json.dumps({"__type": typ, "message": msg}))
        elif mode == "429":
            self.answer(429, b"")
        elif mode == "503":
            self.answer(503, "Service Unavailable", "text/plain")
        elif mode == "garbage":
            self.answer(200, b"\x00\xffthis is not json {{{ <html>")
        elif mode == "big":
            self.answer(200, b'{"Pad": "' + b"A" * (100 * 1024) + b'"}')
        elif mode == "xml_auth_error":
            self.answer(403,
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ErrorResponse>"
                        "<Error><Type>Sender</Type><Code>InvalidClientTokenId</Code>"
                        "<Message>The security token included in the request is invalid."
                        "</Message></Error><RequestId>0</RequestId></ErrorResponse>",
                        "text/xml")
        elif mode == "reset":
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif mode == "hang":
            self.close_connection = True
            deadline = time.monotonic() + rule["seconds"]
            while time.monotonic() < deadline and not release.is_set() \
                    and not STATE.stop.is_set():
                if client_gone(self.connection, 0.1):
                    return
        elif mode == "hold":
            deadline = time.monotonic() + rule["seconds"]
            while time.monotonic() < deadline and not release.is_set() \
                    and not STATE.stop.is_set():
                if client_gone(self.connection, 0.1):
                    self.close_connection = True
                    return
            self.forward(body)
        elif mode == "slow_body":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", "4096")
            self.end_headers()
            self.wfile.flush()
            deadline = time.monotonic() + rule["seconds"]
            try:
                while time.monotonic() < deadline and not release.is_set() \
                        and not STATE.stop.is_set():
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    if client_gone(self.connection, 1.0):
                        return
            except OSError:
                return
        elif mode in ("short_plaintext", "wrong_keyid", "bad_base64"):
            try:
                status, headers, data = self.upstream(body)
            except (OSError, http.client.HTTPException):
                self.answer(502, "upstream unavailable", "text/plain")
                return
            if status == 200:
                obj = json.loads(data)
                if mode == "short_plaintext" and "Plaintext" in obj:
                    obj["Plaintext"] = base64.b64encode(os.urandom(16)).decode()
                if mode == "bad_base64":
                    # one character outside the alphabet, length and padding intact
                    field = "Plaintext" if "Plaintext" in obj else "CiphertextBlob"
                    if field in obj:
                        obj[field] = obj[field][:4] + "*" + obj[field][5:]
                if mode == "wrong_keyid" and "KeyId" in obj:
                    obj["KeyId"] = ("arn:aws:kms:us-east-1:123456789012:key/"
                                    "00000000-1111-2222-3333-444444444444")
                data = json.dumps(obj).encode()
            self.relay(status, headers, data)


def main():
    global UPSTREAM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of moto")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--parent-pid", type=int, default=0,
                    help="exit when this process is gone")
    ap.add_argument("--lifetime", type=float, default=3600.0)
    args = ap.parse_args()

    u = urllib.parse.urlsplit(args.upstream)
    if u.scheme != "http" or not u.hostname:
        ap.error("--upstream must be http://host:port")
    UPSTREAM = (u.hostname, u.port or 80)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.request_queue_size = 64

    def stop(*_):
        STATE.stop.set()
        STATE.release.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def watchdog():
        end = time.monotonic() + args.lifetime
        while not STATE.stop.is_set():
            if time.monotonic() > end:
                stop()
            elif args.parent_pid:
                try:
                    os.kill(args.parent_pid, 0)
                except ProcessLookupError:
                    stop()
            STATE.stop.wait(1.0)

    threading.Thread(target=watchdog, daemon=True).start()

    print(server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
