#!/usr/bin/env python3
"""Look for a data key in a process's shared memory, for the key cache tests.

    memory_probe.py unwrap KEYFILE KEY_ID TENANT VERSION WRAPPED_HEX
        prints the DEK (hex) inside a wrapped key of the local provider, using the
        format documented in src/kms_local.c
    memory_probe.py find PID DEK_HEX [private]
        searches the shared mappings of PID (with "private": its private ones) for the
        DEK and prints one line per hit: "hit <address> flags=<VmFlags>"; then "hits N"

Test-only: it needs the master key file and the right to read /proc/PID/mem.
"""
import re
import struct
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

WRAP_LABEL = b"pg_envelope local wrap v1\0"


def unwrap(keyfile, key_id, tenant, version, wrapped_hex):
    raw = open(keyfile, "rb").read()
    key = raw if len(raw) == 32 else bytes.fromhex(raw.decode().strip())
    wrapped = bytes.fromhex(wrapped_hex)
    assert wrapped[0] == 1 and len(wrapped) == 61, "not a local-provider wrapped key"
    tenant_b = tenant.encode()
    key_id_b = key_id.encode()
    aad = (WRAP_LABEL + struct.pack(">I", len(key_id_b)) + key_id_b
           + struct.pack(">I", len(tenant_b)) + tenant_b + struct.pack(">I", int(version)))
    nonce, body = wrapped[1:13], wrapped[13:]
    print(AESGCM(key).decrypt(nonce, body, aad).hex())


def find(pid, dek_hex, where="shared"):
    dek = bytes.fromhex(dek_hex)
    flags = {}
    current = None
    for line in open(f"/proc/{pid}/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if m:
            current = (int(m.group(1), 16), int(m.group(2), 16), m.group(3))
            flags[current] = ""
        elif line.startswith("VmFlags:") and current:
            flags[current] = line.split(":", 1)[1].strip()
    hits = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for (start, end, perms), vmflags in flags.items():
            # The main shared memory segment: shared ("s"), readable, not a file we mapped;
            # with "private", the process's own memory instead (heap, stack, anonymous).
            if not perms.startswith("r") or perms[3] != ("p" if where == "private" else "s"):
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            pos = data.find(dek)
            while pos >= 0:
                hits += 1
                print(f"hit {start + pos:#x} flags={vmflags}")
                pos = data.find(dek, pos + 1)
    print(f"hits {hits}")


if __name__ == "__main__":
    if sys.argv[1] == "unwrap":
        unwrap(*sys.argv[2:7])
    elif sys.argv[1] == "find":
        find(int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
    else:
        sys.exit("usage: memory_probe.py unwrap|find ...")
