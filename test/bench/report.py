#!/usr/bin/env python3
"""report.py — turn the raw outputs of test/bench/run.sh into figures.

Benchmark helper, run by run.sh.  Reads the files run.sh left in --dir, prints one line
per figure with its ratio to the baseline measured in the same run (and the target,
where issue targets exist), and writes --dest (JSON).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def machine():
    cpu = ""
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    try:
        ssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        ssl = ""
    return {"cpu": cpu, "nproc": os.cpu_count(), "mem_gib": round(mem_kb / 1048576, 1),
            "platform": platform.platform(), "openssl": ssl}


def main():
    ap = argparse.ArgumentParser()
    for opt in ("dir", "dest", "single", "pair", "det-status", "blind-status", "pg-version", "commit"):
        ap.add_argument("--" + opt, required=True)
    for opt in ("rows", "kb-rows", "pgp-rows", "runs", "create-tenants", "create-ms",
                "kms-tenants", "kms-backends", "cold-ms", "warm-ms", "cache-size",
                "long-ms", "long-rows", "direct-ms", "rotations", "load-ms", "total-s", "pgbench-seconds"):
        ap.add_argument("--" + opt, type=int, required=True)
    for opt in ("rewrap-tenants", "rewrapped", "rewrap-ms", "reenc-rows", "reenc-ms", "reenc-left", "update-ms"):
        ap.add_argument("--" + opt, type=int, default=0)
    a = ap.parse_args()
    d = a.dir
    res = {"machine": machine(), "postgres": a.pg_version, "commit": a.commit,
           "config": {"rows": a.rows, "kb_rows": a.kb_rows, "pgp_rows": a.pgp_rows,
                      "runs": a.runs, "create_tenants": a.create_tenants,
                      "kms_tenants": a.kms_tenants, "kms_backends": a.kms_backends,
                      "cache_size": a.cache_size, "pgbench_seconds": a.pgbench_seconds},
           "load_ms": a.load_ms, "total_s": a.total_s, "figures": {}}
    lines = []
    verdicts = []

    def fig(name, value, unit, line, target=None, met=None, **extra):
        res["figures"][name] = dict(value=value, unit=unit, target=target, met=met, **extra)
        if met is not None:
            line += "   [target %s: %s]" % (target, "met" if met else "MISSED")
            verdicts.append((name, met))
        lines.append(line)

    # --- C floor -------------------------------------------------------------
    floor = {}
    for line in read(os.path.join(d, "floor.jsonl")).splitlines():
        o = json.loads(line)
        floor[(o["op"], o["size"])] = o
    res["c_floor"] = {"%s_%d" % k: v for k, v in floor.items()}

    # --- SQL per row ----------------------------------------------------------
    times, label = {}, None
    for line in read(os.path.join(d, "bench.out")).splitlines():
        m = re.match(r"BENCH (\S+)", line)
        if m:
            label = m.group(1)
            continue
        m = re.match(r"Time: ([\d.]+) ms", line)
        if m and label:
            times.setdefault(label, []).append(float(m.group(1)))
            label = None
    nrows = {k: a.rows for k in times}
    for k in times:
        if k.startswith("kb_"):
            nrows[k] = a.kb_rows
        if k.startswith("pgp_"):
            nrows[k] = a.pgp_rows
    per_row = {k: {"min_us": min(v) * 1000 / nrows[k], "median_us": statistics.median(v) * 1000 / nrows[k],
                   "runs_ms": v} for k, v in times.items()}
    res["sql_per_row"] = per_row
    floors = {"md5": "floor", "encrypt": "floor", "decrypt": "decrypt_floor",
              "decrypt_sorted": "sorted_floor", "encrypt_sorted": "psorted_floor", "pgcrypto_encrypt": "floor",
              "pgcrypto_decrypt": "pgc_floor", "pgp_sym_encrypt": "pgp_floor",
              "pgp_sym_decrypt": "pgp_dec_floor", "kb_md5": "kb_floor",
              "kb_encrypt": "kb_floor", "kb_decrypt": "kb_decrypt_floor",
              "kb_pgcrypto_encrypt": "kb_floor", "deterministic": "floor",
              "kb_deterministic": "kb_floor", "blind_index": "floor"}
    net = {k: {s: per_row[k][s] - per_row[f][s] for s in ("min_us", "median_us")}
           for k, f in floors.items() if k in per_row and f in per_row}
    res["sql_net_per_row"] = net

    lines.append("%s; %s; tree %s" % (res["machine"]["cpu"], a.pg_version.split(" on ")[0], a.commit))
    lines.append("rows: %d x ~32 B, %d x ~1 KB, 1,000 tenants (row i -> tenant i %% 1000); %d runs; "
                 "µs per row = min of runs, net of the scan floor octet_length(col) (median in JSON)"
                 % (a.rows, a.kb_rows, a.runs))
    fl = lambda op, size: floor[(op, size)]["min_us"]
    lines.append("raw AES-256-GCM floor (C, cipher_encrypt incl. nonce / cipher_decrypt, fixed key, cached context): "
                 "32 B %.3f / %.3f µs, 1 KB %.3f / %.3f µs; nonce draw alone %.3f µs; "
                 "1,000 keys in turn: 32 B %.3f / %.3f µs"
                 % (fl("encrypt", 32), fl("decrypt", 32), fl("encrypt", 1024), fl("decrypt", 1024),
                    fl("nonce", 32), fl("encrypt_1000keys", 32), fl("decrypt_1000keys", 32)))
    for k, op, size in (("encrypt", "encrypt", 32), ("decrypt", "decrypt", 32),
                        ("kb_encrypt", "encrypt", 1024), ("kb_decrypt", "decrypt", 1024)):
        if k not in net:
            continue
        v = net[k]["min_us"]
        r = v / fl(op, size)
        name = {"encrypt": "envelope.encrypt", "decrypt": "envelope.decrypt_text"}[op]
        fig("%s_vs_floor" % k, v, "us/row",
            "%-28s %-5s %7.3f µs/row   %5.2fx the raw AES-GCM floor (%.3f)"
            % (name, "1 KB" if size == 1024 else "32 B", v, r, fl(op, size)),
            target="<= 1.3x", met=r <= 1.3, ratio=r, floor_us=fl(op, size))
    for k, op in (("encrypt_sorted", "encrypt"), ("decrypt_sorted", "decrypt")):
        if k in net and op in net:
            v = net[k]["min_us"]
            r = v / fl(op, 32)
            name = {"encrypt": "envelope.encrypt", "decrypt": "envelope.decrypt_text"}[op]
            fig(k, v, "us/row",
                "%-28s %-5s %7.3f µs/row   %5.2fx the raw floor with rows sorted by tenant; switching tenant "
                "every row costs %.3f µs (C floor over 1,000 keys in turn: +%.3f)"
                % (name, "32 B", v, r, net[op]["min_us"] - v, fl(op + "_1000keys", 32) - fl(op, 32)),
                ratio=r, diagnostic="same tenant as the previous row")
    enc = net["encrypt"]["min_us"]
    dec = net["decrypt"]["min_us"]
    if "md5" in net:
        fig("md5", net["md5"]["min_us"], "us/row",
            "%-28s %-5s %7.3f µs/row   envelope.encrypt is %.2fx md5(), decrypt_text %.2fx"
            % ("md5()", "32 B", net["md5"]["min_us"], enc / net["md5"]["min_us"], dec / net["md5"]["min_us"]))
    if "kb_md5" in net and "kb_encrypt" in net:
        fig("kb_md5", net["kb_md5"]["min_us"], "us/row",
            "%-28s %-5s %7.3f µs/row   envelope.encrypt is %.2fx md5()"
            % ("md5()", "1 KB", net["kb_md5"]["min_us"], net["kb_encrypt"]["min_us"] / net["kb_md5"]["min_us"]))
    v = net["pgcrypto_encrypt"]["min_us"]
    fig("pgcrypto_encrypt", v, "us/row",
        "%-28s %-5s %7.3f µs/row   envelope.encrypt is %.2fx faster" % ("pgcrypto encrypt(aes)", "32 B", v, v / enc),
        target=">= 2x", met=v / enc >= 2, ratio=v / enc)
    if "kb_pgcrypto_encrypt" in net:
        v = net["kb_pgcrypto_encrypt"]["min_us"]
        r = v / net["kb_encrypt"]["min_us"]
        fig("kb_pgcrypto_encrypt", v, "us/row",
            "%-28s %-5s %7.3f µs/row   envelope.encrypt is %.2fx faster" % ("pgcrypto encrypt(aes)", "1 KB", v, r),
            target=">= 2x", met=r >= 2, ratio=r)
    v = net["pgcrypto_decrypt"]["min_us"]
    fig("pgcrypto_decrypt", v, "us/row",
        "%-28s %-5s %7.3f µs/row   envelope.decrypt_text is %.2fx faster" % ("pgcrypto decrypt(aes)", "32 B", v, v / dec),
        ratio=v / dec)
    v = net["pgp_sym_encrypt"]["min_us"]
    fig("pgp_sym_encrypt", v, "us/row",
        "%-28s %-5s %7.1f µs/row   envelope.encrypt is %.0fx faster (%d rows)" % ("pgp_sym_encrypt", "32 B", v, v / enc, a.pgp_rows),
        target=">= 20x", met=v / enc >= 20, ratio=v / enc)
    v = net["pgp_sym_decrypt"]["min_us"]
    fig("pgp_sym_decrypt", v, "us/row",
        "%-28s %-5s %7.1f µs/row   envelope.decrypt_text is %.0fx faster" % ("pgp_sym_decrypt", "32 B", v, v / dec),
        ratio=v / dec)
    for k, size, status in (("deterministic", "32 B", a.det_status), ("kb_deterministic", "1 KB", a.det_status),
                            ("blind_index", "32 B", a.blind_status)):
        fname = "envelope.encrypt_deterministic" if "deterministic" in k else "envelope.blind_index"
        if k in net:
            v = net[k]["min_us"]
            base = net["kb_encrypt" if size == "1 KB" else "encrypt"]["min_us"]
            fig(k, v, "us/row", "%-28s %-5s %7.3f µs/row   %.2fx envelope.encrypt, %.2fx the raw encrypt floor"
                % (fname, size, v, v / base, v / fl("encrypt", 1024 if size == "1 KB" else 32)),
                ratio=v / base)
        elif k != "kb_deterministic":
            res["figures"][k] = {"value": None, "status": status}
            lines.append("!!!!! %s NOT MEASURED: %s !!!!!" % (fname, status))

    def steal(phase):
        try:
            a0 = [int(x) for x in read(os.path.join(d, "cpu_%s_0" % phase)).split()[1:]]
            a1 = [int(x) for x in read(os.path.join(d, "cpu_%s_1" % phase)).split()[1:]]
            dt = [y - x for x, y in zip(a0, a1)]
            return 100.0 * dt[7] / sum(dt) if sum(dt) else float("nan")
        except (ValueError, IndexError):
            return float("nan")

    # --- pgbench --------------------------------------------------------------
    tps = {"plain": [], "decrypt": []}
    for line in read(os.path.join(d, "pgbench.out")).splitlines():
        p = line.split()
        if len(p) == 2:
            tps[p[0]].append(float(p[1]))
    if tps["plain"] and tps["decrypt"]:
        # each round runs plain then decrypt back to back: the median of the rounds'
        # ratios resists the machine's drift better than best against best
        rounds = [dd / pp for pp, dd in zip(tps["plain"], tps["decrypt"])]
        r = statistics.median(rounds)
        fig("pgbench_point_decrypt", statistics.median(tps["decrypt"]), "tps",
            "pgbench 2 clients, point lookup by id: decrypt %.0f tps vs plain %.0f tps (medians of %d rounds) = "
            "%.1f%% (median of round ratios %s; best vs best %.1f%%; CPU steal %.1f%%)"
            % (statistics.median(tps["decrypt"]), statistics.median(tps["plain"]), len(rounds), 100 * r,
               "/".join("%.0f" % (100 * x) for x in rounds), 100 * max(tps["decrypt"]) / max(tps["plain"]),
               steal("pgbench")),
            target=">= 90%", met=r >= 0.9, ratio=r, plain_tps=tps["plain"], decrypt_tps=tps["decrypt"],
            round_ratios=rounds)
    else:
        lines.append("!!!!! pgbench gave no TPS figure !!!!!")

    # --- scaling --------------------------------------------------------------
    single = [float(x) for x in a.single.split()]
    pair = [float(x) for x in a.pair.split()]
    s = 2 * min(single) / min(pair)
    ms = [float(x) for x in read(os.path.join(d, "md5scan_single")).split()]
    mp = [float(x) for x in read(os.path.join(d, "md5scan_pair")).split()]
    ctl = 2 * min(ms) / min(mp) if ms and mp else float("nan")
    smed = 2 * statistics.median(single) / statistics.median(pair)
    cmed = 2 * statistics.median(ms) / statistics.median(mp) if ms and mp else float("nan")
    fig("scaling_2_clients", s, "x",
        "2 clients full-scan decrypt: %.2fx the throughput of 1 (warmed sessions, best of %d: 1 client %.0f ms, "
        "pair %.0f ms; medians %.2fx); control md5(c) scan, interleaved: %.2fx (medians %.2fx); CPU steal %.1f%%"
        % (s, len(single), min(single), min(pair), smed, ctl, cmed, steal("scaling")), target=">= 1.8x", met=s >= 1.8,
        median_ratio=smed, control_median_ratio=cmed,
        single_ms=single, pair_ms=pair, control_md5=ctl, control_single_ms=ms, control_pair_ms=mp)

    # --- backend memory ---------------------------------------------------------
    mem = [list(map(lambda x: int(x) if x else 0, l.split()[1:])) for l in
           read(os.path.join(d, "mem_session.out")).splitlines()]
    if len(mem) >= 6:
        # mem[0] after a warm-up scan, mem[1..3] after each further 1M decrypts
        growth = (mem[3][0] - mem[1][0]) / (2 * a.rows)
        fig("backend_memory_growth_decrypt", growth, "bytes/row",
            "backend memory over 2 x %d decrypts after warm-up: %+d bytes total (%.4f bytes/row); "
            "all contexts %d bytes, L1 context %d bytes" % (a.rows, mem[3][0] - mem[1][0], growth, mem[3][0], mem[3][2]),
            target="no growth", met=mem[3][0] <= mem[1][0], samples=mem)
        g2 = mem[5][0] - mem[4][0]
        fig("backend_memory_growth_encrypt", g2 / a.rows, "bytes/row",
            "backend memory over %d encrypts after one encrypt scan: %+d bytes" % (a.rows, g2),
            target="no growth", met=g2 <= 0)
    probe_totals = [int(m.group(1)) for m in
                    re.finditer(r"Grand total: (\d+) bytes", read(os.path.join(d, "mem_probe.out")))]
    probe_times = [int(x) for x in read(os.path.join(d, "mem_probe_times")).split()]
    if len(probe_totals) >= 2 and len(probe_times) >= len(probe_totals):
        rate = a.long_rows / a.long_ms   # rows per ms, connection time included
        rows_between = (probe_times[len(probe_totals) - 1] - probe_times[0]) * rate
        delta = probe_totals[-1] - probe_totals[0]
        per = delta / rows_between if rows_between > 0 else 0.0
        fig("backend_memory_during_scan", per, "bytes/row",
            "backend memory during one %d-row decrypt scan (%d pg_log_backend_memory_contexts samples): "
            "%+d bytes over ~%.0f rows (%.4f bytes/row)" % (a.long_rows, len(probe_totals), delta, rows_between, per),
            target="no growth", met=delta <= 0, samples=probe_totals, sample_ms=probe_times)
    else:
        lines.append("backend memory during one scan: too few pg_log_backend_memory_contexts samples (%d)"
                     % len(probe_totals))

    # --- shared memory ----------------------------------------------------------
    named = {}
    for l in read(os.path.join(d, "shmem_named.out")).splitlines():
        n, sz = l.rsplit("|", 1)
        named[n] = int(sz)
    named_total = sum(v for n, v in named.items() if n.startswith("pg_envelope key cache"))
    slope_rows = [list(map(int, l.split())) for l in read(os.path.join(d, "shmem_slope.out")).splitlines()]
    per_named = named_total / a.cache_size
    if len(slope_rows) == 2:
        (s1, t1, n1), (s2, t2, n2) = slope_rows
        slope = (t2 - t1) / (s2 - s1)
        fig("shmem_per_key", slope, "bytes",
            "shared memory per cached key: %.1f bytes marginal (whole segment, cache_size %d vs %d); "
            "named 'pg_envelope key cache*' allocations / cache_size = %.1f bytes"
            % (slope, s1, s2, per_named), target="<= 128 B", met=slope <= 128,
            named_per_key=per_named, named=named, slope_samples=slope_rows)
    else:
        fig("shmem_per_key", per_named, "bytes",
            "shared memory per cached key: named allocations / cache_size = %.1f bytes" % per_named,
            target="<= 128 B", met=per_named <= 128, named=named)

    # --- key creation and rotation ------------------------------------------------
    def jl(name):
        t = read(os.path.join(d, name)).strip()
        return json.loads(t) if t else {}

    def stat_delta(prefix, col):
        s0, s1 = jl(prefix + "0.json"), jl(prefix + "1.json")
        return (s1.get(col, 0) or 0) - (s0.get(col, 0) or 0)

    bp, bd = jl("boto_proxy.json"), jl("boto_direct.json")
    rate = a.create_tenants / (a.create_ms / 1000)
    gdk = stat_delta("create_stats", "kms_generate_calls")
    if bd:
        fig("create_tenant_rate", rate, "keys/s",
            "create_tenant x %d (aws, straight to moto): %.0f keys/s = %.2fx boto3 GenerateDataKey on the same moto "
            "(%.0f/s, %d calls); KMS GenerateDataKey calls: %d"
            % (a.create_tenants, rate, rate / bd["generate"]["per_s"], bd["generate"]["per_s"],
               bd["generate"]["count"], gdk),
            ratio=rate / bd["generate"]["per_s"], boto_direct=bd, kms_generate_calls=gdk)
    if bp and bd:
        lat = 1000 / bp["generate"]["per_s"] - 1000 / bd["generate"]["per_s"]
        fig("fault_proxy_latency", lat, "ms",
            "fault proxy (test harness) adds %.1f ms per KMS request (boto3 GenerateDataKey %.0f/s through it, "
            "%.0f/s direct)" % (lat, bp["generate"]["per_s"], bd["generate"]["per_s"]), boto_proxy=bp)
    rot = [float(x) for x in read(os.path.join(d, "rotate.out")).split()]
    if rot and bd:
        one_gdk_ms = 1000 / bd["generate"]["per_s"]
        rc = stat_delta("rotate_stats", "kms_generate_calls")
        fig("rotate_tenant_key", statistics.median(rot), "ms",
            "rotate_tenant_key: %.2f ms median (min %.2f) of %d, each its own transaction = %.2fx one boto3 "
            "GenerateDataKey (%.2f ms); KMS calls: %d"
            % (statistics.median(rot), min(rot), len(rot), statistics.median(rot) / one_gdk_ms, one_gdk_ms, rc),
            ratio=statistics.median(rot) / one_gdk_ms, runs_ms=rot, kms_generate_calls=rc)

    # --- KMS economy -------------------------------------------------------------
    cold = jl("cold_counts.json")
    ops = cold.get("ops", {})
    dcalls = ops.get("Decrypt", {}).get("forwarded", 0)
    dreq = ops.get("Decrypt", {}).get("requests", 0)
    other = {k: v for k, v in ops.items() if k != "Decrypt"}
    warm = jl("warm_counts.json").get("ops", {})
    warm_calls = sum(v.get("requests", 0) for v in warm.values())
    fig("kms_cold_decrypt_calls", dcalls, "calls",
        "KMS economy: cache flushed, %d backends over %d aws tenants, through the proxy: %d KMS Decrypt calls "
        "(%d requests%s; cache_stats says %d); cold phase %d ms; warm repeat %d ms with %d KMS calls"
        % (a.kms_backends, a.kms_tenants, dcalls, dreq, ", other ops %s" % other if other else "",
           stat_delta("cold_stats", "kms_decrypt_calls"), a.cold_ms, a.warm_ms, warm_calls),
        target="= %d" % a.kms_tenants, met=dcalls == a.kms_tenants and dreq == a.kms_tenants,
        ratio=dcalls / a.kms_tenants, cold_ms=a.cold_ms, warm_ms=a.warm_ms, warm_calls=warm_calls)
    dd = stat_delta("direct_stats", "kms_decrypt_calls")
    fig("kms_cold_direct", a.direct_ms, "ms",
        "KMS economy straight to moto: cold phase %d ms (%.2f ms per key; warm phase %d ms), %d KMS Decrypt calls "
        "(cache_stats)%s" % (a.direct_ms, a.direct_ms / max(a.kms_tenants, 1), a.warm_ms, dd,
                             "" if dd == a.kms_tenants else "  !!! expected %d" % a.kms_tenants),
        kms_decrypt_calls=dd, per_key_ms=a.direct_ms / max(a.kms_tenants, 1),
        boto3_decrypt_per_s=bd.get("decrypt", {}).get("per_s"))

    # --- rewrap and re-encryption ------------------------------------------------
    if a.rewrap_ms and bd.get("reencrypt"):
        rr = a.rewrapped / (a.rewrap_ms / 1000)
        calls = stat_delta("rewrap_stats", "kms_reencrypt_calls")
        fig("rewrap_rate", rr, "DEKs/s",
            "envelope.rewrap of %d tenants (%d DEKs moved, %d KMS ReEncrypt calls): %.0f DEKs/s = %.2fx boto3 "
            "ReEncrypt on the same moto (%.0f/s)" % (a.rewrap_tenants, a.rewrapped, calls, rr,
                                                   rr / bd["reencrypt"]["per_s"], bd["reencrypt"]["per_s"]),
            ratio=rr / bd["reencrypt"]["per_s"], kms_reencrypt_calls=calls)
    if a.reenc_ms and a.update_ms:
        rr, ur = a.reenc_rows / (a.reenc_ms / 1000), a.reenc_rows / (a.update_ms / 1000)
        fig("reencrypt_rate", rr, "rows/s",
            "envelope.reencrypt of %d rows (batches of 10,000, each committed): %.0f rows/s = %.2fx one UPDATE "
            "re-encrypting the same rows (%.0f rows/s); rows left under an old version: %d"
            % (a.reenc_rows, rr, rr / ur, ur, a.reenc_left), ratio=rr / ur, update_rows_per_s=ur,
            rows_left=a.reenc_left)

    met = [n for n, ok in verdicts if ok]
    missed = [n for n, ok in verdicts if not ok]
    lines.append("targets met: %d of %d%s" % (len(met), len(verdicts), "; MISSED: " + ", ".join(missed) if missed else ""))
    lines.append("total bench time %d s (load %d s)" % (a.total_s, a.load_ms // 1000))
    res["targets_met"], res["targets_missed"] = met, missed
    print("\n".join(lines))
    with open(a.dest, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print("wrote", a.dest)


if __name__ == "__main__":
    main()
