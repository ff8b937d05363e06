# pg_envelope — PGXS build.
#
#   make && make install        build and install into the PostgreSQL named by PG_CONFIG
#   make unit                   pure-C unit tests (no server)
#   make installcheck           pg_regress on a temporary, preloaded instance
#                               (test/run_tests.sh prepares the key files it needs)

EXTENSION = pg_envelope
MODULE_big = pg_envelope

SRCS = $(sort $(wildcard src/*.c))
OBJS = $(SRCS:.c=.o)

# Released scripts are kept forever.  The full script of the newest version is built
# from the first release's script and the update scripts after it, so a fresh install
# runs exactly the statements an updated one has run.
EXTVERSION = $(shell sed -n "s/^default_version = '\\(.*\\)'/\\1/p" $(EXTENSION).control)
FULL_SCRIPT = sql/$(EXTENSION)--$(EXTVERSION).sql
UPDATE_SCRIPTS = $(sort $(wildcard sql/$(EXTENSION)--*--*.sql))
DATA = sql/$(EXTENSION)--0.1.0.sql $(UPDATE_SCRIPTS)
DATA_built = $(FULL_SCRIPT)

REGRESS = setup cipher deterministic errors roles keys plaintext_guard inventory audit guards health fleet equality
TEST_TMP ?= $(CURDIR)/test/tmp
REGRESS_OPTS = --temp-instance=$(TEST_TMP)/regress_instance \
	--temp-config=$(TEST_TMP)/regress.conf

PG_CONFIG ?= pg_config
PG_CPPFLAGS = -I$(srcdir)/src -Wall -Wextra -Werror -Wno-unused-parameter \
	-Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = -lssl -lcrypto -lcurl -ljson-c

EXTRA_CLEAN = test/unit/*.o $(UNIT_BINS) src/libenvelope_pure.a

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# ---------------------------------------------------------------------------
# Pure-C unit tests.  A source file is "pure" when it does not include
# postgres.h; those are linked into every unit test, which runs without a server.
PURE_SRCS = $(shell grep -L '"postgres.h"\|"compat.h"\|"pg_envelope.h"' $(SRCS))
UNIT_SRCS = $(sort $(wildcard test/unit/test_*.c))
UNIT_BINS = $(UNIT_SRCS:.c=)
# The same warnings the server build turns into errors (PGXS flags plus ours).
UNIT_CFLAGS = -std=gnu11 -O2 -g -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter \
	-Wno-missing-field-initializers -Wno-sign-compare -Wmissing-format-attribute \
	-Wmissing-prototypes -Wdeclaration-after-statement -Wimplicit-fallthrough=3 \
	-Isrc -Itest/unit

test/unit/%: test/unit/%.c $(PURE_SRCS) test/unit/unit.h
	$(CC) $(UNIT_CFLAGS) -o $@ $< $(PURE_SRCS) $(SHLIB_LINK) -lm

.PHONY: unit
unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; ./$$t; done

$(FULL_SCRIPT): sql/$(EXTENSION)--0.1.0.sql $(UPDATE_SCRIPTS)
	{ echo '-- Built by make from the scripts below; edit those, not this file.'; \
	  for f in $^; do echo "-- ---- $$f"; grep -v '^\\echo ' $$f; done; } > $@

# PGXS does not track header dependencies: rebuild every object when a header changes
# (structures such as CipherKey are embedded by value across files).
$(OBJS): $(wildcard src/*.h)
