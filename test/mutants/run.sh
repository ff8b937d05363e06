#!/bin/bash
# Mutation check, to run before a release (it takes minutes per mutant; it is not part
# of .ci/run).  Each test/mutants/NN_name.patch plants one deliberate bug that the test
# suite must catch.  For each: copy the tree, apply the patch, run the test level named
# in the patch's header (only the TAP files it names, where it names some), and print
#   killed        the tests failed, as they must
#   survived      the tests passed with the bug in: a hole in the tests
#   DOES NOT APPLY   the code moved on; refresh the patch (see README.md)
#
#   bash test/mutants/run.sh                     every mutant
#   bash test/mutants/run.sh 03 07               the mutants whose names start so
#   MUTANTS_BASELINE=0 bash test/mutants/run.sh  skip the run on the unpatched tree
#
# The baseline first runs each named test on the unpatched tree: a mutant only counts
# as killed when the same tests pass without it.  test/run_tests.sh installs what it
# builds, so the unpatched tree is built and installed again at the end.  Exit status:
# 0 when every mutant was killed, 1 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/test/mutants"
WORKBASE="$(mktemp -d "${TMPDIR:-/tmp}/pg_envelope_mutants.XXXXXX")"
trap 'rm -rf "$WORKBASE"' EXIT

# The copies live outside the repository: point them at the shared test vectors.
if [ -z "${TESTDATA_DIR:-}" ]; then
    for d in "$ROOT/../shared/testdata" "$ROOT/../../shared/testdata"; do
        if [ -d "$d" ]; then TESTDATA_DIR="$(cd "$d" && pwd)"; break; fi
    done
fi
export TESTDATA_DIR="${TESTDATA_DIR:-$ROOT/../shared/testdata}"

header() { sed -n "s/^$2: *//p" "$1" | head -n 1; }

patches=()
for p in "$HERE"/*.patch; do
    name="$(basename "$p" .patch)"
    if [ $# -gt 0 ]; then
        keep=0
        for want in "$@"; do [[ "$name" == "$want"* ]] && keep=1; done
        [ $keep -eq 1 ] || continue
    fi
    patches+=("$p")
done
[ ${#patches[@]} -gt 0 ] || { echo "no mutant matches: $*" >&2; exit 2; }

# A copy of the working tree (without its git metadata and test leftovers).
copy_tree() {
    local dest="$1"
    mkdir -p "$dest"
    (cd "$ROOT" && tar --exclude=./.git --exclude=./test/tmp --exclude=./tmp_check \
        --exclude=./results -cf - .) | tar -xf - -C "$dest"
}

# Run a level (with TAP_TESTS where given) in a tree; its output goes to $3.
run_level() {
    local tree="$1" patch="$2" log="$3" level tap
    level="$(header "$patch" Level)"
    tap="$(header "$patch" TAP_TESTS)"
    if [ -n "$tap" ]; then
        TAP_FILES="$tap" bash "$tree/test/run_tests.sh" "$level" >"$log" 2>&1
    else
        bash "$tree/test/run_tests.sh" "$level" >"$log" 2>&1
    fi
}

declare -A result
status=0

if [ "${MUTANTS_BASELINE:-1}" != 0 ]; then
    echo "== baseline: the tests that must kill the mutants pass on the unpatched tree"
    copy_tree "$WORKBASE/baseline"
    declare -A seen
    for p in "${patches[@]}"; do
        name="$(basename "$p" .patch)"
        what="$(header "$p" Level) $(header "$p" TAP_TESTS)"
        [ -z "${seen[$what]:-}" ] || continue
        seen[$what]=1
        if run_level "$WORKBASE/baseline" "$p" "$WORKBASE/baseline-$name.log"; then
            echo "   baseline $what: passed"
        else
            echo "   baseline $what: FAILED without any mutant; see below" >&2
            tail -n 30 "$WORKBASE/baseline-$name.log" >&2
            status=1
        fi
    done
fi

for p in "${patches[@]}"; do
    name="$(basename "$p" .patch)"
    tree="$WORKBASE/$name"
    copy_tree "$tree"
    echo "== $name: $(header "$p" Mutant)"
    if ! (cd "$tree" && git apply --check "$p" 2>/dev/null); then
        echo "!!!!!!!! $name: DOES NOT APPLY — the code changed; refresh the patch !!!!!!!!"
        result[$name]="DOES NOT APPLY"
        status=1
        continue
    fi
    (cd "$tree" && git apply "$p")
    start=$SECONDS
    if run_level "$tree" "$p" "$tree/mutant.log"; then
        result[$name]="survived"
        status=1
        echo "   SURVIVED ($((SECONDS - start)) s): the tests passed with the bug in"
    else
        result[$name]="killed"
        echo "   killed ($((SECONDS - start)) s)"
        grep -E "Failed test|FAIL " "$tree/mutant.log" | head -n 5 | sed 's/^/     /'
    fi
    rm -rf "$tree"
done

echo "== reinstalling the unpatched tree"
make -C "$ROOT" -s -j2 >/dev/null && { [ "$(id -u)" -eq 0 ] && make -C "$ROOT" -s install >/dev/null \
    || sudo make -C "$ROOT" -s install >/dev/null; } || echo "could not reinstall the unpatched tree" >&2

echo "== summary"
for p in "${patches[@]}"; do
    name="$(basename "$p" .patch)"
    printf '  %-40s %s\n' "$name" "${result[$name]:-not run}"
done
exit $status
