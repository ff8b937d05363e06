#!/bin/bash
# Run every pg_envelope test: pure-C unit tests, pg_regress, isolation and TAP.
#
#   bash test/run_tests.sh            all of them
#   bash test/run_tests.sh unit       one level: unit | clang | sanitize | fuzz | regress |
#                                     isolation | tap
#   TAP_FILES='test/tap/03*.pl' bash test/run_tests.sh tap     some TAP files only
#   (not TAP_TESTS: PGXS reads that name and would run prove inside make installcheck)
#
# Installs missing Debian packages, builds and installs the extension (as root, or
# with sudo), then runs the server-side tests as the `postgres` OS user in a private
# copy of the tree: PostgreSQL never runs as root.  Every build here treats warnings as
# errors (WERROR=1); a user's plain `make` does not.
#
#   clang       the extension and the unit tests built with clang, the unit tests run
#   sanitize    the unit tests built with -fsanitize=address,undefined and run
#   package     the Debian package built, installed, checked (pg_buildext
#               installcheck) and removed: test/package_check.sh.  Not in the default
#               list, as it writes to the system PostgreSQL; .ci/run runs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LEVELS="${*:-unit clang sanitize fuzz regress isolation tap}"
PG_BINDIR="$(pg_config --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

bash "$ROOT/test/install_deps.sh"
PG_BINDIR="$(pg_config --bindir)"
PGXS_DIR="$(dirname "$(pg_config --pgxs)")/.."

echo "== build and install"
make -C "$ROOT" -s -j2 WERROR=1
$SUDO make -C "$ROOT" -s install WERROR=1

# A private copy, owned by whoever runs the server.
if [ "$(id -u)" -eq 0 ]; then
    RUN_AS=(runuser -u postgres --)
    WORK="$(mktemp -d /tmp/pg_envelope_test.XXXXXX)"
else
    RUN_AS=()
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/pg_envelope_test.XXXXXX")"
fi
# KEEP_WORK=1 keeps the copy (results/, logs) for a look after a failure.
HUGE_PAGES_BEFORE=""
cleanup() {
    [ -n "$HUGE_PAGES_BEFORE" ] && echo "$HUGE_PAGES_BEFORE" > /proc/sys/vm/nr_hugepages
    [ -n "${KEEP_WORK:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

# test/tap/037_huge_pages.pl needs huge pages, which only root can reserve: as root,
# 64 more (128 MB with 2 MB pages) for the TAP run, given back when it ends.  Without
# them that file says loudly that it did not run.
reserve_huge_pages() {
    [ "$(id -u)" -eq 0 ] && [ -w /proc/sys/vm/nr_hugepages ] || return 0
    HUGE_PAGES_BEFORE="$(cat /proc/sys/vm/nr_hugepages)"
    echo $((HUGE_PAGES_BEFORE + 64)) > /proc/sys/vm/nr_hugepages 2>/dev/null || return 0
    if [ "$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)" -ge 48 ]; then
        export ENVELOPE_TEST_HUGE_PAGES=1
    fi
}
release_huge_pages() {
    [ -n "$HUGE_PAGES_BEFORE" ] && echo "$HUGE_PAGES_BEFORE" > /proc/sys/vm/nr_hugepages
    HUGE_PAGES_BEFORE=""
    unset ENVELOPE_TEST_HUGE_PAGES
}
cp -a "$ROOT/." "$WORK/"
rm -rf "$WORK/test/tmp" "$WORK/results" "$WORK/tmp_check"
mkdir -p "$WORK/test/tmp"
[ "$(id -u)" -eq 0 ] && chown -R postgres: "$WORK"
chmod 0755 "$WORK"
# The server user's commands start in the working directory: one it can enter (a clone
# under /root or in a mktemp -d directory is not).
cd "$WORK"

# The KMS tests run moto with the interpreter that has it (python3 of whoever runs
# this script).  When that interpreter lives under root's home (pyenv), the server user
# must be able to reach it: grant traverse-only (o+x) on the directories leading to it,
# nothing more.  ENVELOPE_PYTHON, not PYTHON: PGXS sets PYTHON for everything make runs.
ENVELOPE_PYTHON="${ENVELOPE_PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}"
export ENVELOPE_PYTHON
if [ "$(id -u)" -eq 0 ]; then
    d="$(dirname "$ENVELOPE_PYTHON")"
    while [ "$d" != / ]; do chmod o+x "$d"; d="$(dirname "$d")"; done
    if ! runuser -u postgres -- "$ENVELOPE_PYTHON" -c 'import moto.server, boto3' 2>/dev/null; then
        echo "the postgres user cannot import moto and boto3 with $ENVELOPE_PYTHON" >&2
        exit 1
    fi
fi

as_server_user() {
    "${RUN_AS[@]}" env PATH="$PG_BINDIR:$PATH" \
        ENVELOPE_PYTHON="$ENVELOPE_PYTHON" "$@"
}

# A clean copy of the tree under $WORK/build/NAME for a build with other flags, so
# that its objects never mix with the ones installed above.
build_copy() {
    local dir="$WORK/build/$1"
    mkdir -p "$dir"
    cp -a "$ROOT/." "$dir/"
    rm -rf "$dir/test/tmp" "$dir/results" "$dir/tmp_check"
    [ "$(id -u)" -eq 0 ] && chown -R postgres: "$WORK/build"
    as_server_user make -C "$dir" -s clean >/dev/null
    echo "$dir"
}

# PGXS passes the server's CFLAGS, chosen for the compiler PostgreSQL was built with
# (gcc on Debian): drop the options clang does not know, and the gnu_printf format
# attribute of the server headers, which clang ignores with a warning.
clang_cflags() {
    pg_config --cflags | sed -e 's/-fexcess-precision=standard//' \
        -e 's/-Wimplicit-fallthrough=3/-Wimplicit-fallthrough/' \
        -e 's/-Wno-format-truncation//' -e 's/-Wno-stringop-truncation//'
    echo " -Wno-ignored-attributes"
}

failed=()

show_failure() {
    local f
    for f in "$WORK/regression.diffs" "$WORK/output_iso/regression.diffs"; do
        [ -f "$f" ] && { echo "---- $f"; head -c 20000 "$f"; }
    done
    for f in "$WORK"/tmp_check/log/*; do
        [ -f "$f" ] && { echo "---- $f (tail)"; tail -n 40 "$f"; }
    done
    return 0
}

for level in $LEVELS; do
    echo "== $level"
    case "$level" in
        unit)
            as_server_user make -C "$WORK" -s unit || failed+=(unit)
            ;;
        clang)
            command -v clang >/dev/null || { echo "clang is not installed" >&2; failed+=(clang); continue; }
            dir="$(build_copy clang)"
            as_server_user make -C "$dir" -s -j2 all CC=clang CFLAGS="$(clang_cflags | tr '\n' ' ')" WERROR=1 \
                && as_server_user make -C "$dir" -s unit CC=clang \
                || failed+=(clang)
            ;;
        fuzz)
            # Each libFuzzer target for FUZZ_SECONDS (20 by default); the long runs are
            # documented in test/fuzz/README.md.
            as_server_user env FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash "$WORK/test/fuzz/run.sh" \
                || failed+=(fuzz)
            ;;
        sanitize)
            dir="$(build_copy sanitize)"
            as_server_user env ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
                make -C "$dir" -s unit UNIT_SANITIZE=address,undefined \
                || failed+=(sanitize)
            ;;
        package)
            bash "$ROOT/test/package_check.sh" || failed+=(package)
            ;;
        regress)
            as_server_user bash "$WORK/test/prepare_keys.sh" "$WORK/test/tmp"
            as_server_user env ENVELOPE_TEST_DIR="$WORK/test/tmp" make -C "$WORK" -s installcheck TEST_TMP="$WORK/test/tmp" \
                || { failed+=(regress); show_failure; }
            ;;
        isolation)
            as_server_user bash "$WORK/test/prepare_keys.sh" "$WORK/test/tmp"
            as_server_user "$PGXS_DIR/test/isolation/pg_isolation_regress" \
                --bindir="$PG_BINDIR" \
                --inputdir="$WORK/test/isolation" --outputdir="$WORK/output_iso" \
                --temp-instance="$WORK/test/tmp/isolation_instance" \
                --temp-config="$WORK/test/tmp/regress.conf" \
                $(cd "$WORK/test/isolation/specs" && ls *.spec | sed 's/\.spec$//') \
                || { failed+=(isolation); show_failure; }
            ;;
        tap)
            reserve_huge_pages
            (cd "$WORK" && as_server_user env TESTDIR="$WORK" PG_REGRESS="$PGXS_DIR/test/regress/pg_regress" \
                ENVELOPE_TEST_HUGE_PAGES="${ENVELOPE_TEST_HUGE_PAGES:-}" \
                prove -I "$PGXS_DIR/test/perl" -I "$WORK/test/perl" ${TAP_FILES:-test/tap/*.pl}) \
                || { failed+=(tap); show_failure; }
            release_huge_pages
            ;;
        *)
            echo "unknown test level: $level" >&2
            exit 2
            ;;
    esac
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all test levels passed: $LEVELS"
