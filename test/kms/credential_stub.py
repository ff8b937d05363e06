#!/usr/bin/env python3
"""credential_stub.py — stand-in AWS credential endpoints for test_aws_credentials.c.

One plain-HTTP server on 127.0.0.1 (port 0 by default; the chosen port is the first line
of stdout).  Standard library only.  Exits on SIGTERM, or by itself after --lifetime.

  IMDSv2   PUT /latest/api/token (needs X-aws-ec2-metadata-token-ttl-seconds)
           GET /latest/meta-data/iam/security-credentials/[<role>]
               (needs X-aws-ec2-metadata-token from the PUT: IMDSv1 is refused, 401)
  ECS      GET /ecs/creds (needs Authorization: <--ecs-token>)
  STS      POST / with Action=AssumeRoleWithWebIdentity (form), XML answer;
           WebIdentityToken must equal --web-token
  control  GET /_counts  -> JSON {path or event: count}
           GET /_reset   -> zero the counts
           GET /_set?expiry=N&imds_token_status=N
                         -> credentials expire N seconds from issue; the token PUT
                            answers that status (e.g. 403 for an IMDSv1-only host)
           GET /_set?hang=imds|ecs|none&hang_seconds=N
                         -> the IMDS token PUT or the ECS credential GET reads the
                            request and answers nothing for N seconds (default 60),
                            until hang=none releases it (counted as "hung imds/ecs")

Credentials are distinct per source and per issue ("ASIA<SOURCE><n>") so a test can
tell which source answered and whether a refresh happened.
"""
import argparse
import datetime
import json
import secrets
import signal
import ssl
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLE = "pg-envelope-test-role"

lock = threading.Lock()
counts = {}
state = {"expiry": 3600, "imds_token_status": 200, "issued": 0, "hang": "none",
         "hang_seconds": 60}
release = threading.Event()     # set to free hung requests
imds_tokens = set()
args = None


def count(key):
    with lock:
        counts[key] = counts.get(key, 0) + 1


def hang_if(source):
    """Hold the request of `source` when told to; True when it was held."""
    with lock:
        held = state["hang"] == source
        seconds = state["hang_seconds"]
        ev = release
    if held:
        count("hung " + source)
        ev.wait(seconds)
    return held


def issue(source):
    with lock:
        state["issued"] += 1
        n = state["issued"]
        expiry = state["expiry"]
    exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=expiry)
    return {
        "AccessKeyId": "ASIA%s%d" % (source.upper(), n),
        "SecretAccessKey": "secret-%s-%d" % (source, n),
        "Token": "token-%s-%d" % (source, n),
        "Expiration": exp.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *a):
        pass

    def reply(self, status, body, ctype="text/plain"):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def do_PUT(self):
        self.read_body()
        path = self.path.split("?", 1)[0]
        count("PUT " + path)
        if path != "/latest/api/token":
            return self.reply(404, "not found")
        if hang_if("imds"):
            return self.reply(503, "released")
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self.reply(400, "missing ttl")
        status = state["imds_token_status"]
        if status != 200:
            return self.reply(status, "forbidden")
        token = secrets.token_hex(16)
        with lock:
            imds_tokens.add(token)
        self.reply(200, token)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path == "/_counts":
            with lock:
                body = json.dumps(counts)
            return self.reply(200, body, "application/json")
        if path == "/_reset":
            with lock:
                counts.clear()
            return self.reply(200, "ok")
        if path == "/_set":
            global release
            q = urllib.parse.parse_qs(url.query)
            with lock:
                for k in ("expiry", "imds_token_status", "hang_seconds"):
                    if k in q:
                        state[k] = int(q[k][0])
                if "hang" in q:
                    state["hang"] = q["hang"][0]
                    if state["hang"] == "none":
                        release.set()
                        release = threading.Event()
            return self.reply(200, "ok")
        count("GET " + path)
        if path.startswith("/latest/"):
            token = self.headers.get("X-aws-ec2-metadata-token")
            with lock:
                ok = token in imds_tokens
            if not ok:
                count("imds_v1_refused")
                return self.reply(401, "IMDSv1 is not allowed")
            base = "/latest/meta-data/iam/security-credentials/"
            if path == base:
                return self.reply(200, ROLE + "\n")
            if path == base + ROLE:
                creds = issue("imds")
                creds.update({"Code": "Success", "Type": "AWS-HMAC",
                              "LastUpdated": "2024-01-01T00:00:00Z"})
                return self.reply(200, json.dumps(creds), "application/json")
            return self.reply(404, "not found")
        if path == "/ecs/creds":
            if hang_if("ecs"):
                return self.reply(503, "released")
            if self.headers.get("Authorization") != args.ecs_token:
                count("ecs_unauthorized")
                return self.reply(403, json.dumps({"message": "bad token"}))
            creds = issue("ecs")
            creds["RoleArn"] = "arn:aws:iam::123456789012:role/" + ROLE
            return self.reply(200, json.dumps(creds), "application/json")
        self.reply(404, "not found")

    def do_POST(self):
        body = self.read_body().decode()
        path = self.path.split("?", 1)[0]
        count("POST " + path)
        form = urllib.parse.parse_qs(body, keep_blank_values=True)
        one = {k: v[0] for k, v in form.items()}
        if (path != "/" or one.get("Action") != "AssumeRoleWithWebIdentity"
                or one.get("Version") != "2011-06-15" or not one.get("RoleArn")
                or not one.get("RoleSessionName")):
            return self.reply(400, sts_error("Sender", "InvalidAction"), "text/xml")
        if self.headers.get("Authorization"):
            return self.reply(400, sts_error("Sender", "SignatureNotExpected"), "text/xml")
        if one.get("WebIdentityToken") != args.web_token:
            count("sts_bad_token")
            return self.reply(400, sts_error("Sender", "InvalidIdentityToken"), "text/xml")
        c = issue("sts")
        xml = """<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:db:postgres</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/%s/%s</Arn>
      <AssumedRoleId>AROAEXAMPLE:%s</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>%s+a/b=&amp;c</SessionToken>
      <SecretAccessKey>%s</SecretAccessKey>
      <Expiration>%s</Expiration>
      <AccessKeyId>%s</AccessKeyId>
    </Credentials>
    <SourceIdentity/>
    <Provider>oidc.example.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
""" % (ROLE, one["RoleSessionName"], one["RoleSessionName"], c["Token"],
            c["SecretAccessKey"], c["Expiration"], c["AccessKeyId"])
        self.reply(200, xml, "text/xml")


def sts_error(kind, code):
    return ("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">"
            "<Error><Type>%s</Type><Code>%s</Code><Message>refused</Message></Error>"
            "<RequestId>0</RequestId></ErrorResponse>" % (kind, code))


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients that abort (refused certificate, reset, cancel) are what the tests
        # provoke on purpose: no traceback for those.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return
        super().handle_error(request, client_address)


def main():
    global args
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lifetime", type=float, default=300.0)
    ap.add_argument("--ecs-token", default="ecs-auth-token")
    ap.add_argument("--web-token", default="web-identity-jwt")
    args = ap.parse_args()

    server = Server(("127.0.0.1", args.port), Handler)

    def stop(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    timer = threading.Timer(args.lifetime, stop)
    timer.daemon = True
    timer.start()

    print(server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
