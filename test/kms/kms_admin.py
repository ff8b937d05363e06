#!/usr/bin/env python3
"""kms_admin.py — drive moto's KMS, IAM and STS for the tests, printing JSON.

Test harness layer.  Every command talks to the endpoint given by --endpoint (always a
loopback moto) with boto3, in region --region, using the access key from the
environment when set and moto's dummy one otherwise.

  create-key [--description D] [--multi-region]
                                       {"KeyId": ..., "Arn": ...}
  replicate-key KEY REGION             {"KeyId": ..., "Arn": ...} of the replica of
                                       multi-Region key KEY in REGION
  create-alias ALIAS KEY               {"AliasName": ...}
  disable-key KEY | enable-key KEY     {"KeyId": ...}
  create-user NAME                     {"AccessKeyId", "SecretAccessKey", "Arn"}
                                       (an IAM user allowed kms:* and sts:*)
  session-token                        {"AccessKeyId", "SecretAccessKey", "SessionToken"}
  assume-role ROLE_ARN                 same, from sts:AssumeRole
  create-role NAME                     {"Arn"} (a role anyone may assume, kms:* allowed)
  auth on | auth off                   switch moto's request authentication
  create-keys N                        [{"KeyId": ..., "Arn": ...}, ...]: N keys at once
"""

import argparse
import json
import os
import sys
import urllib.request

import boto3

POLICY = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["kms:*", "sts:*", "iam:*"],
                   "Resource": "*"}],
})

TRUST = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                   "Action": ["sts:AssumeRole", "sts:AssumeRoleWithWebIdentity"]},
                  {"Effect": "Allow", "Principal": {"Federated": "*"},
                   "Action": "sts:AssumeRoleWithWebIdentity"}],
})


def client(args, service):
    return boto3.client(
        service,
        endpoint_url=args.endpoint,
        region_name=args.region,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or "testing",
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or "testing",
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("command")
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--description", default="pg_envelope test key")
    ap.add_argument("--multi-region", action="store_true")
    args = ap.parse_args()
    if not args.endpoint.startswith(("http://127.", "http://localhost")):
        ap.error("--endpoint must be a loopback http URL")

    cmd, rest = args.command, args.rest
    if cmd == "create-key":
        md = client(args, "kms").create_key(Description=args.description,
                                            MultiRegion=args.multi_region)["KeyMetadata"]
        out = {"KeyId": md["KeyId"], "Arn": md["Arn"]}
    elif cmd == "replicate-key":
        md = client(args, "kms").replicate_key(KeyId=rest[0],
                                               ReplicaRegion=rest[1])["ReplicaKeyMetadata"]
        out = {"KeyId": md["KeyId"], "Arn": md["Arn"]}
    elif cmd == "create-alias":
        client(args, "kms").create_alias(AliasName=rest[0], TargetKeyId=rest[1])
        out = {"AliasName": rest[0]}
    elif cmd in ("disable-key", "enable-key"):
        kms = client(args, "kms")
        (kms.disable_key if cmd == "disable-key" else kms.enable_key)(KeyId=rest[0])
        out = {"KeyId": rest[0]}
    elif cmd == "create-user":
        iam = client(args, "iam")
        user = iam.create_user(UserName=rest[0])["User"]
        iam.put_user_policy(UserName=rest[0], PolicyName="all-kms",
                            PolicyDocument=POLICY)
        key = iam.create_access_key(UserName=rest[0])["AccessKey"]
        out = {"AccessKeyId": key["AccessKeyId"],
               "SecretAccessKey": key["SecretAccessKey"], "Arn": user["Arn"]}
    elif cmd == "create-role":
        iam = client(args, "iam")
        role = iam.create_role(RoleName=rest[0], AssumeRolePolicyDocument=TRUST)["Role"]
        iam.put_role_policy(RoleName=rest[0], PolicyName="all-kms", PolicyDocument=POLICY)
        out = {"Arn": role["Arn"]}
    elif cmd == "session-token":
        c = client(args, "sts").get_session_token()["Credentials"]
        out = {k: c[k] for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")}
    elif cmd == "assume-role":
        c = client(args, "sts").assume_role(RoleArn=rest[0],
                                            RoleSessionName="pg-envelope-test")["Credentials"]
        out = {k: c[k] for k in ("AccessKeyId", "SecretAccessKey", "SessionToken")}
    elif cmd == "unwrap":
        # the DEK inside a wrapped key of the aws provider (rest: wrapped hex, tenant,
        # version), for tests that search logs and memory for it
        plain = client(args, "kms").decrypt(
            CiphertextBlob=bytes.fromhex(rest[0]),
            EncryptionContext={"tenant": rest[1], "dek_version": rest[2]})["Plaintext"]
        out = {"Plaintext": plain.hex()}
    elif cmd == "auth":
        # moto's switch: with a count of 0 every later request must be signed by a
        # known IAM identity; a large count switches checking back off
        count = b"0" if rest[0] == "on" else b"1000000000"
        req = urllib.request.Request(args.endpoint.rstrip("/") + "/moto-api/reset-auth",
                                     data=count, method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
        out = {"auth": rest[0]}
    elif cmd == "create-keys":
        kms = client(args, "kms")
        out = []
        for _ in range(int(rest[0])):
            md = kms.create_key(Description=args.description)["KeyMetadata"]
            out.append({"KeyId": md["KeyId"], "Arn": md["Arn"]})
    else:
        ap.error("unknown command " + cmd)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
