#!/bin/bash
# Build the Debian package postgresql-15-envelope from this tree (debian/, pg_buildext),
# install it into the system PostgreSQL, run the regression tests against the installed
# files (pg_buildext installcheck), then remove the package again.
#
#   bash test/package_check.sh          (or: bash test/run_tests.sh package)
#
# Writes to the system PostgreSQL directories (/usr/lib/postgresql, /usr/share/postgresql)
# through dpkg: meant for CI and throwaway machines.  Needs root or sudo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGE=postgresql-15-envelope

bash "$ROOT/test/install_deps.sh" package

# The package's own pg_config, not one found first on PATH.
export PATH="/usr/lib/postgresql/15/bin:$PATH"

WORK="$(mktemp -d /tmp/pg_envelope_package.XXXXXX)"
cleanup() { [ -n "${KEEP_WORK:-}" ] && echo "kept $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT
chmod 0755 "$WORK"
cd "$WORK"

echo "== package: build $PACKAGE"
mkdir "$WORK/pg-envelope"
cp -a "$ROOT/." "$WORK/pg-envelope/"
rm -rf "$WORK/pg-envelope/.git" "$WORK/pg-envelope/test/tmp"
make -C "$WORK/pg-envelope" -s clean PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config >/dev/null
(cd "$WORK/pg-envelope" && dpkg-buildpackage -b -us -uc) > "$WORK/build.log" 2>&1 \
    || { tail -n 60 "$WORK/build.log"; echo "package build failed" >&2; exit 1; }
deb="$(ls "$WORK"/${PACKAGE}_*.deb)"
echo "built $(basename "$deb")"
dpkg-deb --contents "$deb" | awk '{print $6}' | grep -E '\.so$|\.control$|\.sql$'

echo "== package: install"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$deb" >/dev/null
[ -f /usr/lib/postgresql/15/lib/pg_envelope.so ] || { echo "pg_envelope.so not installed" >&2; exit 1; }

echo "== package: pg_buildext installcheck (against the installed files)"
# pg_regress starts its own instance, which initdb refuses to do as root: a copy of the
# tree (without the build's objects) owned by the postgres user.
mkdir "$WORK/check"
cp -a "$ROOT/." "$WORK/check/"
rm -rf "$WORK/check/.git" "$WORK/check/test/tmp" "$WORK/check/results" "$WORK/check/"*.so \
    "$WORK/check/src/"*.o
status=0
if [ "$(id -u)" -eq 0 ]; then
    chown -R postgres: "$WORK/check"
    (cd "$WORK/check" && runuser -u postgres -- env PATH="$PATH" pg_buildext installcheck) || status=$?
else
    (cd "$WORK/check" && pg_buildext installcheck) || status=$?
fi

echo "== package: remove"
DEBIAN_FRONTEND=noninteractive $SUDO apt-get remove -y -qq "$PACKAGE" >/dev/null
[ "$status" -eq 0 ] && echo "package $PACKAGE: built, installed, installcheck passed"
exit "$status"
