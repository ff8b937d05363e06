#!/usr/bin/python3
"""kmip_admin.py — manage master keys on the test KMIP server (PyKMIP), for the TAP tests.

Test harness layer.  Runs with an interpreter that has PyKMIP (Debian's python3-pykmip
installs it for /usr/bin/python3).  Speaks KMIP 1.4 over TLS 1.2 with the client
certificate given, like the server's other clients.  Prints one JSON object.

  kmip_admin.py --host H --port P --ca CA --cert CERT --key KEY create
        -> {"uid": "..."}   an AES-256 key for Encrypt and Decrypt, activated
  ... create-inactive       the same, left Pre-Active
  ... revoke UID            Active -> Deactivated (revocation reason: cessation)
  ... compromise UID        -> Compromised (revocation reason: key compromise)
  ... destroy UID           revoke (if Active), then Destroy
  ... state UID             -> {"state": "ACTIVE" | "DEACTIVATED" | ...}
"""

import argparse
import json
import sys

from kmip import enums
from kmip.pie.client import ProxyKmipClient


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("command")
    ap.add_argument("uid", nargs="?")
    a = ap.parse_args()

    client = ProxyKmipClient(hostname=a.host, port=a.port, cert=a.cert, key=a.key, ca=a.ca,
                             ssl_version="PROTOCOL_TLSv1_2", config_file="/dev/null",
                             kmip_version=enums.KMIPVersion.KMIP_1_4)
    with client:
        if a.command in ("create", "create-inactive"):
            uid = client.create(enums.CryptographicAlgorithm.AES, 256,
                                cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                                                          enums.CryptographicUsageMask.DECRYPT])
            if a.command == "create":
                client.activate(uid)
            out = {"uid": uid}
        elif a.command == "revoke":
            client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, a.uid)
            out = {"uid": a.uid}
        elif a.command == "compromise":
            client.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, a.uid,
                          compromise_occurrence_date=1)
            out = {"uid": a.uid}
        elif a.command == "destroy":
            state = client.get_attributes(a.uid, ["State"])[1][0].attribute_value.value
            if state == enums.State.ACTIVE:
                client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, a.uid)
            client.destroy(a.uid)
            out = {"uid": a.uid}
        elif a.command == "state":
            state = client.get_attributes(a.uid, ["State"])[1][0].attribute_value.value
            out = {"state": state.name}
        else:
            sys.exit("unknown command %s" % a.command)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
