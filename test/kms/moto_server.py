#!/usr/bin/env python3
"""moto_server.py — moto's server on loopback that never outlives its test.

Test harness layer.  The same as `python3 -m moto.server -H 127.0.0.1 -p PORT`, plus
a watchdog: the server exits when --parent-pid is gone or after --lifetime seconds, so
a test that is killed outright leaves no moto behind.  SIGTERM stops it at once.

It also corrects one thing moto 5.2 gets wrong, before the server starts (see
fix_multi_region_key_ids): multi-Region keys.  Nothing else of moto is changed.
"""

import argparse
import os
import signal
import sys
import threading
import time


def fix_multi_region_key_ids():
    """Make moto's multi-Region key ids look like AWS's, so that they work.

    AWS names a multi-Region key "mrk-" followed by 32 hex digits (36 characters).
    moto 5.2 uses "mrk-" followed by a dashed UUID (40 characters), and its ciphertext
    blobs hold the key id in a fixed 36-byte field, so the id is cut short when a blob
    is made and names no key when it is read back: moto cannot decrypt anything
    wrapped under a multi-Region key, not even in the key's own region.  With the real
    format the id fits the field, and ReplicateKey's replica (same id, same key
    material, in the other region's backend) decrypts what the primary wrapped, as
    in AWS.  moto's check of bare key ids only knows its own format; it is widened to
    accept the real one.  Single-Region key ids are unchanged.
    """
    import re

    from moto.kms import models, responses, utils
    from moto.kms.exceptions import NotFoundException
    from moto.moto_api._internal import mock_random

    def generate_key_id(multi_region=False):
        if multi_region:
            return "mrk-" + mock_random.uuid4().hex
        return str(mock_random.uuid4())

    utils.generate_key_id = generate_key_id
    models.generate_key_id = generate_key_id    # models imported it by name

    validate_cmk_id = responses.KmsResponse._validate_cmk_id

    def validate_real_mrk_id(self, key_id):
        if re.fullmatch(r"mrk-[0-9a-f]{32}", key_id):
            if key_id not in self.kms_backend.keys:
                raise NotFoundException(f"Key '{self._display_arn(key_id)}' does not exist")
            return
        validate_cmk_id(self, key_id)

    responses.KmsResponse._validate_cmk_id = validate_real_mrk_id


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

    fix_multi_region_key_ids()
    from moto.server import main as moto_main
    sys.exit(moto_main(["-H", "127.0.0.1", "-p", str(args.port)]))


if __name__ == "__main__":
    main()
