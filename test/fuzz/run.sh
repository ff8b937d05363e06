#!/bin/bash
# Build the libFuzzer targets (clang, -fsanitize=fuzzer,address,undefined) and run each
# for a bounded time on a copy of its seed corpus.
#
#   bash test/fuzz/run.sh              every target, FUZZ_SECONDS (default 20) each
#   FUZZ_SECONDS=3600 bash test/fuzz/run.sh fuzz_ciphertext     the long run of one
#
# Exits non-zero on the first crash, leak, sanitizer report or timeout, leaving the
# reproducer (crash-*, leak-*, timeout-*) in the work directory it prints.  The seed
# corpora in test/fuzz/corpus/ are never modified; new inputs go to the work copy.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SECONDS_EACH="${FUZZ_SECONDS:-20}"
CC_FUZZ="${CC_FUZZ:-clang}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pg_envelope_fuzz.XXXXXX")"

if ! command -v "$CC_FUZZ" >/dev/null; then
	echo "FUZZ NOT RUN: $CC_FUZZ is not installed (test/install_deps.sh installs clang)" >&2
	exit 1
fi

# The plain-C layers: every source that includes no backend header.
mapfile -t PURE < <(cd "$ROOT" && grep -L '"postgres.h"\|"compat.h"\|"pg_envelope.h"' src/*.c)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cd "$ROOT/test/fuzz" && ls fuzz_*.c | sed 's/\.c$//')

status=0
for t in "${targets[@]}"; do
	echo "== $t ($SECONDS_EACH s)"
	# A target that compiles a source file into itself (to reach its static parsers)
	# must not link that file a second time.
	included="$(sed -n 's|^#include "\.\./\.\./\(src/[a-z_0-9]*\.c\)"$|\1|p' "$ROOT/test/fuzz/$t.c")"
	link=()
	for f in "${PURE[@]}"; do
		[ -n "$included" ] && grep -qxF "$f" <<<"$included" && continue
		link+=("$f")
	done
	(cd "$ROOT" && "$CC_FUZZ" -g -O1 -fsanitize=fuzzer,address,undefined \
		-fno-sanitize-recover=undefined -Wno-ignored-attributes -D_GNU_SOURCE -Isrc \
		-o "$WORK/$t" "test/fuzz/$t.c" "${link[@]}" -lssl -lcrypto -lcurl -ljson-c -lm)
	mkdir -p "$WORK/corpus_$t"
	seeds="$ROOT/test/fuzz/corpus/${t#fuzz_}"
	[ -d "$seeds" ] && cp "$seeds"/* "$WORK/corpus_$t/" 2>/dev/null || true
	if ! (cd "$WORK" && "./$t" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1 "corpus_$t" > "$t.log" 2>&1); then
		echo "FUZZ FAILURE in $t: see $WORK/$t.log and the reproducer in $WORK"
		tail -n 40 "$WORK/$t.log"
		status=1
		continue
	fi
	# One line per target: executions, coverage, corpus size.
	grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "$WORK/$t.log" | tr '\n' ' '
	grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$WORK/$t.log" | tail -n 1
done
[ $status -eq 0 ] && rm -rf "$WORK"
exit $status
