#!/usr/bin/env python3
"""moto_server.py — moto's server on loopback that never outlives its test.

Test harness layer.  The same as `python3 -m moto.server -H 127.0.0.1 -p PORT`, plus
a watchdog: the server exits when --parent-pid is gone or after --lifetime seconds, so
a test that is killed outright leaves no moto behind.  SIGTERM stops it at once.
"""

import argparse
import os
import signal
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    args = ap.parse_args()

    def watchdog():
        end = time.monotonic() + args.lifetime
        while True:
            if time.monotonic() > end:
                os._exit(0)
            if args.parent_pid:
                try:
                    os.kill(args.parent_pid, 0)
                except ProcessLookupError:
                    os._exit(0)
            time.sleep(1.0)

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=watchdog, daemon=True).start()

    from moto.server import main as moto_main
    sys.exit(moto_main(["-H", "127.0.0.1", "-p", str(args.port)]))


if __name__ == "__main__":
    main()
