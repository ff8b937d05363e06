#!/bin/bash
# Install the Debian packages pg_envelope builds and tests with.  Idempotent: does
# nothing when they are all present.  Needs root (or passwordless sudo) only when
# something is missing.
#
#   bash test/install_deps.sh           what the build and every default test level need
#   bash test/install_deps.sh package   also what building the Debian package needs
set -euo pipefail

packages=(postgresql-15 postgresql-server-dev-15 postgresql-contrib libcurl4-openssl-dev
          libjson-c-dev libssl-dev libipc-run-perl make gcc clang python3
          python3-pykmip)
if [ "${1:-}" = package ]; then
    packages+=(postgresql-server-dev-all debhelper dpkg-dev fakeroot)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The AWS KMS stand-in for the tests: moto's server, boto3 to drive it.
if ! python3 -c 'import moto.server, boto3' 2>/dev/null; then
    echo "python3 cannot import moto and boto3; the aws provider tests need them" >&2
    exit 1
fi
# The runbook test runs the runbook's AWS CLI commands (awscli, against moto).
if ! python3 -c 'import awscli' 2>/dev/null; then
    echo "python3 cannot import awscli; test/tap/045_runbook.pl needs it" >&2
    exit 1
fi
