#!/usr/bin/env python3
"""callgrind_split.py — where one SQL function's instructions go, per row.

Benchmark helper for test/bench/profile.sh.  Takes two callgrind outputs of a
single-user backend collected only inside FUNCTION (--toggle-collect): RUN1 after one
scan, RUN2 after the same scan twice.  RUN2 - RUN1 is one scan with every key already in
the backend's cache; divided by ROWS it gives instructions per row, split into key
lookup, nonce, the cipher layer (GCM work vs OpenSSL EVP/provider dispatch), palloc, the
UTF-8 check and the rest, followed by the top exclusive costs.

  callgrind_split.py RUN1 RUN2 ROWS FUNCTION
"""
import re, subprocess, sys
one, two, rows, fn = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[(.*)\])?$")
def costs(path, inclusive):
    out = subprocess.run(["callgrind_annotate", "--inclusive=" + ("yes" if inclusive else "no"),
                          "--auto=no", "--threshold=100", path], capture_output=True, text=True).stdout
    res, started = {}, False
    for line in out.splitlines():
        if "file:function" in line:
            started = True
            continue
        m = LINE.match(line) if started else None
        if not m:
            continue
        name = m.group(2).rsplit(":", 1)[-1]
        obj = (m.group(3) or "").rsplit("/", 1)[-1]
        if name.startswith("0x"):
            name = "%s+%s" % (obj, name)
        v = int(m.group(1).replace(",", ""))
        res[name] = max(res.get(name, 0), v) if inclusive else res.get(name, 0) + v
    return res
def diff(inclusive):
    a, b = costs(one, inclusive), costs(two, inclusive)
    return {k: (b.get(k, 0) - a.get(k, 0)) / rows for k in set(a) | set(b)}
inc, exc = diff(True), diff(False)
total = inc.get(fn, 0)
g = lambda *names: sum(inc.get(n, 0) for n in names)
enc = fn.startswith("envelope_encrypt")
cipher = g("cipher_encrypt" if enc else "cipher_decrypt")
core = g("CRYPTO_gcm128_setiv", "CRYPTO_gcm128_aad", "CRYPTO_gcm128_encrypt_ctr32", "CRYPTO_gcm128_decrypt_ctr32",
         "CRYPTO_gcm128_encrypt", "CRYPTO_gcm128_decrypt", "CRYPTO_gcm128_finish", "CRYPTO_gcm128_tag")
ctrl = g("EVP_CIPHER_CTX_ctrl")
ivlen = g("EVP_CIPHER_CTX_get_iv_length")
parts = [
    ("key lookup: keycache_key_for_%s (L1 tenant + version)" % ("encrypt" if enc else "decrypt"),
     g("keycache_key_for_encrypt" if enc else "keycache_key_for_decrypt")),
    ("  of which l1_tenant (check name, copy, hash_search)", g("l1_tenant")),
    ("  of which envelope_check_tenant", g("envelope_check_tenant")),
    ("  of which hash_search (tenant switch)", g("hash_search")),
    ("nonce: cipher_next_nonce", g("cipher_next_nonce")),
    ("cipher: %s" % ("cipher_encrypt" if enc else "cipher_decrypt"), cipher),
    ("  of which GCM work (CRYPTO_gcm128_*, AES-NI, GHASH)", core),
    ("  of which the rest of OpenSSL: EVP/provider dispatch *", cipher - core),
    ("    incl. EVP_CIPHER_CTX_ctrl (tag get/set via OSSL_PARAM)", ctrl),
    ("    incl. EVP_CIPHER_CTX_get_iv_length (per IV reset)", ivlen),
    ("    incl. OSSL_PARAM_locate + strcmp (exclusive)", exc.get("OSSL_PARAM_locate", 0) + sum(v for k, v in exc.items() if k.startswith("__strcmp"))),
    ("palloc of the result", g("palloc")),
    ("pg_verifymbstr (decrypt_text's UTF-8 check)", g("pg_verifymbstr")),
    ("argument detoast (pg_detoast_datum_packed)", g("pg_detoast_datum_packed")),
]

top = [v for n, v in parts if not n.startswith(" ")]
print("%s: %.0f instructions per row inside the function (callgrind, %d rows, warm L1)" % (fn, total, rows))
for n, v in parts:
    print("  %-62s %7.0f  %5.1f%%" % (n, v, 100 * v / total if total else 0))
print("  %-62s %7.0f  %5.1f%%" % ("rest: fmgr glue, binding, header parse, varlena set-up", total - sum(top), 100 * (total - sum(top)) / total))
print("  ratio function / cipher layer alone: %.2fx" % (total / (cipher + g("cipher_next_nonce")) if cipher else 0))
print("  * libcrypto's static functions are stripped and appear as addresses: with long values the")
print("    stitched AES-NI GCM assembly is one of them and lands in this line, not in CRYPTO_gcm128_*")
print()
print("top exclusive costs per row:")
for k, v in sorted(exc.items(), key=lambda kv: -kv[1])[:25]:
    if v >= 1:
        print("  %8.1f  %5.1f%%  %s" % (v, 100 * v / total if total else 0, k))
