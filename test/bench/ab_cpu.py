"""The backend CPU time of each step of an A/B benchmark session (fleet_ab.sh,
tenant_sweep_ab.sh).

The session's output has, around each timed step, a line `CPU|<ns>` (the first field of
/proc/self/schedstat) before and after, and somewhere before them `BENCH <step>`.
step_cpu_ms(path) returns {step: [ms, ...]} in the order the steps ran.
"""
import re


def step_cpu_ms(path):
    cpu, start, step = {}, None, None
    for line in open(path):
        m = re.match(r"CPU\|(\d+)", line)
        if m:
            if start is None:
                start = int(m.group(1))
            else:
                cpu.setdefault(step, []).append((int(m.group(1)) - start) / 1e6)
                start = None
            continue
        m = re.match(r"BENCH (.+)", line)
        if m:
            step = m.group(1).strip()
    return cpu
