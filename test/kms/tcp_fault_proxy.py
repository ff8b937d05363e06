#!/usr/bin/env python3
"""tcp_fault_proxy.py — a raw TCP proxy with faults, for the KMIP tests.

Test harness layer (Python stdlib only).  KMIP runs TLS end to end between the client
and the key manager, so an HTTP-level proxy (fault_proxy.py) cannot stand between them;
this one forwards bytes and never looks inside.  It listens on 127.0.0.1 (port 0: the
kernel picks one) and prints two lines: the data port, then the control port.

Control: connect to the control port, send one line, read one line back.
  mode forward     forward every connection to the upstream (the default)
  mode hang        accept connections, read and discard, never answer nor connect on
  mode reset       accept, then reset the connection at once
  mode down        stop listening: connections are refused (mode forward listens again)
  drop             reset every open connection (the server "restarts")
  freeze           stop moving bytes on every open connection (a server that hangs
                   mid-session); connections opened later are not affected
  count            -> "<connections accepted> <connections open>"
  zero             forget the counters
Every line is answered with "ok ..." or "error ...".

Bounded: at most 64 connections; exits on SIGTERM/SIGINT, when --parent-pid is gone, or
after --lifetime seconds.
"""

import argparse
import os
import select
import signal
import socket
import sys
import threading
import time

MAX_CONNS = 64


class Proxy:
    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.mode = "forward"
        self.lock = threading.Lock()
        self.accepted = 0
        self.open = set()
        self.frozen = set()
        self.listener = None
        self.port = None
        self.listen()

    def listen(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port or 0))
        s.listen(16)
        self.port = s.getsockname()[1]
        self.listener = s
        threading.Thread(target=self.accept_loop, args=(s,), daemon=True).start()

    def accept_loop(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                if len(self.open) >= MAX_CONNS:
                    conn.close()
                    continue
                self.accepted += 1
                self.open.add(conn)
                mode = self.mode
            threading.Thread(target=self.serve, args=(conn, mode), daemon=True).start()

    @staticmethod
    def reset(sock):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        except OSError:
            pass

    def forget(self, *socks):
        with self.lock:
            for s in socks:
                self.open.discard(s)

    def serve(self, conn, mode):
        try:
            if mode == "reset":
                self.reset(conn)
                return
            if mode == "hang":
                deadline = time.time() + 120
                while time.time() < deadline:
                    r, _, _ = select.select([conn], [], [], 0.5)
                    if r and not conn.recv(65536):
                        break
                conn.close()
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self.reset(conn)
                return
            up.settimeout(None)
            with self.lock:
                self.open.add(up)
            self.pump(conn, up)
        finally:
            self.forget(conn)

    def pump(self, a, b):
        socks = [a, b]
        try:
            while True:
                if a in self.frozen:
                    time.sleep(0.1)
                    continue
                r, _, _ = select.select(socks, [], [], 0.2)
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            for s in socks:
                try:
                    s.close()
                except OSError:
                    pass
            self.forget(a, b)
            with self.lock:
                self.frozen.discard(a)

    def command(self, line):
        words = line.split()
        if not words:
            return "error empty"
        if words[0] == "mode" and len(words) == 2 and words[1] in ("forward", "hang", "reset", "down"):
            with self.lock:
                self.mode = words[1]
            if words[1] == "down" and self.listener is not None:
                # shutdown wakes the thread blocked in accept() and stops listening;
                # close alone would leave the socket listening until accept returns
                try:
                    self.listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.listener.close()
                self.listener = None
            elif words[1] != "down" and self.listener is None:
                self.listen()
            return "ok " + words[1]
        if words[0] == "drop":
            with self.lock:
                socks = list(self.open)
                self.open.clear()
            for s in socks:
                self.reset(s)
            return "ok dropped %d" % len(socks)
        if words[0] == "freeze":
            with self.lock:
                self.frozen |= self.open
                return "ok frozen %d" % len(self.open)
        if words[0] == "count":
            with self.lock:
                return "ok %d %d" % (self.accepted, len(self.open))
        if words[0] == "zero":
            with self.lock:
                self.accepted = 0
            return "ok"
        return "error unknown command"


def control_loop(proxy, ctl):
    while True:
        conn, _ = ctl.accept()
        with conn:
            f = conn.makefile("rw")
            line = f.readline()
            f.write(proxy.command(line) + "\n")
            f.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True, help="host:port")
    ap.add_argument("--parent-pid", type=int)
    ap.add_argument("--lifetime", type=int, default=3600)
    a = ap.parse_args()
    host, port = a.upstream.rsplit(":", 1)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))

    proxy = Proxy(host, int(port))
    ctl = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ctl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ctl.bind(("127.0.0.1", 0))
    ctl.listen(4)
    print(proxy.port)
    print(ctl.getsockname()[1])
    sys.stdout.flush()
    threading.Thread(target=control_loop, args=(proxy, ctl), daemon=True).start()

    end = time.time() + a.lifetime
    while time.time() < end:
        if a.parent_pid:
            try:
                os.kill(a.parent_pid, 0)
            except OSError:
                break
        time.sleep(1)
    os._exit(0)


if __name__ == "__main__":
    main()
