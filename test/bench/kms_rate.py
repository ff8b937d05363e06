#!/usr/bin/env python3
"""kms_rate.py — moto's own rate for the KMS calls pg_envelope makes, from boto3.

Benchmark helper.  Makes COUNT GenerateDataKey calls (32-byte keys, an encryption
context like the one pg_envelope sends) one after another against --endpoint, then
COUNT Decrypt calls of what came back, and with --dest-key COUNT ReEncrypt calls of the
same to that key, and prints JSON:
{"generate": {"count", "seconds", "per_s"}, "decrypt": {...}[, "reencrypt": {...}]}.

  kms_rate.py --endpoint http://127.0.0.1:PORT --key ARN --count N [--dest-key ARN]
"""

import argparse
import json
import sys
import time

import boto3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--key", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--dest-key")
    args = ap.parse_args()
    if not 1 <= args.count <= 1000000:
        ap.error("--count must be within 1..1000000")

    kms = boto3.client("kms", endpoint_url=args.endpoint, region_name=args.region,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    # one call outside the timing: client set-up, connection, moto's first request
    kms.generate_data_key(KeyId=args.key, NumberOfBytes=32,
                          EncryptionContext={"tenant": "warm-up", "version": "1"})

    blobs = []
    t0 = time.monotonic()
    for i in range(args.count):
        r = kms.generate_data_key(KeyId=args.key, NumberOfBytes=32,
                                  EncryptionContext={"tenant": "bench%d" % i, "version": "1"})
        blobs.append(r["CiphertextBlob"])
    gen_s = time.monotonic() - t0

    t0 = time.monotonic()
    for i, blob in enumerate(blobs):
        kms.decrypt(CiphertextBlob=blob, KeyId=args.key,
                    EncryptionContext={"tenant": "bench%d" % i, "version": "1"})
    dec_s = time.monotonic() - t0

    out = {"generate": {"count": args.count, "seconds": gen_s, "per_s": args.count / gen_s},
           "decrypt": {"count": args.count, "seconds": dec_s, "per_s": args.count / dec_s}}
    if args.dest_key:
        t0 = time.monotonic()
        for i, blob in enumerate(blobs):
            ctx = {"tenant": "bench%d" % i, "version": "1"}
            kms.re_encrypt(CiphertextBlob=blob, SourceKeyId=args.key, SourceEncryptionContext=ctx,
                           DestinationKeyId=args.dest_key, DestinationEncryptionContext=ctx)
        re_s = time.monotonic() - t0
        out["reencrypt"] = {"count": args.count, "seconds": re_s, "per_s": args.count / re_s}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
