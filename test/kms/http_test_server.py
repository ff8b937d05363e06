#!/usr/bin/env python3
"""http_test_server.py — a tiny plain-HTTP server for test/unit/test_http.c.

Binds 127.0.0.1 only, on the port given (0 = any free one) and prints that port on
the first line of stdout.  Standard library only.  Exits on SIGTERM, and on its own
after --lifetime seconds so a crashed test never leaves it behind.

Endpoints:
  /ok              200 "hello"
  /echo            200, JSON of the method, headers and body received
  /status/<n>      status n, short body
  /bytes/<n>       200 with exactly n bytes of 'x' (Content-Length)
  /huge            200 with a 10 MB body (Content-Length)
  /huge-stream     200, 10 MB with no Content-Length, ended by closing
  /redirect        302 to /ok
  /hang            read the request, then never answer (until shutdown)
  /reset           read the request, then reset the connection (RST)
  /secret          200, JSON with a secret-looking value that appears in no request
                   (the test looks for it in the memory libcurl frees)
  /_connections    200, JSON {"connections": number of TCP connections accepted}

With --tls-cert and --tls-key it speaks HTTPS instead (the test uses a self-signed
certificate to check that the client refuses an untrusted peer).
"""
import argparse
import json
import signal
import socket
import ssl
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUGE = 10 * 1024 * 1024
HANG_MAX_SECONDS = 120
SECRET_MARKER = "answer-only-secret-4f1c9a7e"

stopping = threading.Event()
lock = threading.Lock()
connections = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client can reuse connections

    def setup(self):
        global connections
        super().setup()
        with lock:
            connections += 1

    def log_message(self, fmt, *args):
        pass

    def send_body(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def handle_any(self):
        body = self.read_body()
        path = self.path.split("?", 1)[0]
        if path == "/ok":
            self.send_body(200, b"hello")
        elif path == "/echo":
            out = {"method": self.command, "path": self.path,
                   "headers": {k.lower(): v for k, v in self.headers.items()},
                   "body": body.decode("latin-1")}
            self.send_body(200, json.dumps(out).encode(), "application/json")
        elif path.startswith("/status/"):
            code = int(path[len("/status/"):])
            # 1xx, 204 and 304 never carry a body.
            no_body = code < 200 or code in (204, 304)
            self.send_body(code, b"" if no_body else b"status body")
        elif path.startswith("/bytes/"):
            self.send_body(200, b"x" * int(path[len("/bytes/"):]))
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(HUGE))
            self.end_headers()
            self.write_chunks(HUGE)
        elif path == "/huge-stream":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.write_chunks(HUGE)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/hang":
            stopping.wait(HANG_MAX_SECONDS)
            self.close_connection = True
        elif path == "/reset":
            # SO_LINGER with a zero timeout makes close() send RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.close_connection = True
        elif path == "/secret":
            self.send_body(200, json.dumps({"SecretAccessKey": SECRET_MARKER}).encode(),
                           "application/json")
        elif path == "/_connections":
            with lock:
                n = connections
            self.send_body(200, json.dumps({"connections": n}).encode(),
                           "application/json")
        else:
            self.send_body(404, b"not found")

    def write_chunks(self, total):
        chunk = b"y" * 65536
        try:
            while total > 0 and not stopping.is_set():
                n = min(total, len(chunk))
                self.wfile.write(chunk[:n])
                total -= n
        except OSError:
            pass  # the client gave up, as it should

    do_GET = handle_any
    do_POST = handle_any
    do_PUT = handle_any


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # Clients that abort (refused certificate, reset, cancel) are what the tests
        # provoke on purpose: no traceback for those.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return
        super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--lifetime", type=float, default=300.0)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    args = ap.parse_args()

    server = Server(("127.0.0.1", args.port), Handler)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        # Handshake in the handler thread, so a client that aborts it cannot stall
        # the accept loop.
        server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)

    def stop(*_):
        stopping.set()
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
        stopping.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
