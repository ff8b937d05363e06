# Sourced by the tenant sweep scripts (tenant_sweep.sh, tenant_sweep_ab.sh).
#
# huge_pages_conf KNOB VALUE DATADIR: with VALUE 1, huge_pages = on for the cluster in
# DATADIR, after checking that enough huge pages are free (if not, says how many to
# reserve and exits); otherwise huge_pages = off, whatever the machine has reserved.
# KNOB names the setting in the messages.  Runs postgres through the caller's pg().
huge_pages_conf() {
    local knob="$1" value="$2" data="$3" need free
    if [ "$value" != 1 ]; then
        echo "huge_pages = off" >> "$data/postgresql.conf"
        return
    fi
    need="$(pg postgres -D "$data" -C shared_memory_size_in_huge_pages)"
    free="$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)"
    if [ "${free:-0}" -lt "$need" ]; then
        echo "!! $knob=1, but this cluster needs $need huge pages and ${free:-0} are free" >&2
        echo "!! (HugePages_Total $(awk '/^HugePages_Total:/ {print $2}' /proc/meminfo))." >&2
        echo "!! As root: echo $need > /proc/sys/vm/nr_hugepages, and back to 0 afterwards." >&2
        exit 1
    fi
    echo "huge_pages = on" >> "$data/postgresql.conf"
    echo "huge pages: on ($need of $free free)"
}
