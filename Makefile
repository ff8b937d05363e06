# pg_envelope — PGXS build.
#
#   make && make install        build and install into the PostgreSQL named by PG_CONFIG
#   make WERROR=1               the same, with every warning an error (CI does this)
#   make unit                   pure-C unit tests (no server), warnings are errors
#   make unit UNIT_SANITIZE=address,undefined    the unit tests under sanitizers
#   make installcheck           pg_regress on a temporary, preloaded instance of the
#                               installed extension (test/prepare_keys.sh makes the key
#                               files and settings it needs, once, in TEST_TMP)

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

REGRESS = setup cipher deterministic errors roles keys plaintext_guard inventory audit guards health fleet equality blind_index_rekey tenant_access encryption_count keystore_read
TEST_TMP ?= $(CURDIR)/test/tmp
REGRESS_OPTS = --temp-instance=$(TEST_TMP)/regress_instance \
	--temp-config=$(TEST_TMP)/regress.conf

PG_CONFIG ?= pg_config
PG_CPPFLAGS = -I$(srcdir)/src -Wall -Wextra -Wno-unused-parameter \
	-Wno-missing-field-initializers -Wno-sign-compare
# Warnings are errors only where the project asks for it (CI, `make unit`): a user's
# build on a newer compiler warns and still builds.
WERROR ?= 0
ifeq ($(WERROR),1)
PG_CPPFLAGS += -Werror
endif
SHLIB_LINK = -lssl -lcrypto -lcurl -ljson-c

EXTRA_CLEAN = test/unit/*.o $(UNIT_BINS)

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# ---------------------------------------------------------------------------
# Pure-C unit tests.  A source file is "pure" when it does not include
# postgres.h; those are linked into every unit test, which runs without a server.
PURE_SRCS = $(shell grep -L '"postgres.h"\|"compat.h"\|"pg_envelope.h"' $(SRCS))
UNIT_SRCS = $(sort $(wildcard test/unit/test_*.c))
UNIT_BINS = $(UNIT_SRCS:.c=)
# The warnings of the server build (PGXS flags plus ours), always as errors: the unit
# tests are the project's own check.  UNIT_SANITIZE=address,undefined builds them with
# those sanitizers (and frame pointers, for readable reports); the binaries do not
# track flags, so run it on a clean tree (test/run_tests.sh sanitize uses a copy).
UNIT_CFLAGS = -std=gnu11 -O2 -g -D_GNU_SOURCE -Wall -Wextra -Werror -Wno-unused-parameter \
	-Wno-missing-field-initializers -Wno-sign-compare -Wmissing-format-attribute \
	-Wmissing-prototypes -Wdeclaration-after-statement -Wimplicit-fallthrough \
	-Isrc -Itest/unit
ifneq ($(UNIT_SANITIZE),)
UNIT_CFLAGS += -fsanitize=$(UNIT_SANITIZE) -fno-sanitize-recover=all -fno-omit-frame-pointer
endif

test/unit/%: test/unit/%.c $(PURE_SRCS) test/unit/unit.h
	$(CC) $(UNIT_CFLAGS) -o $@ $< $(PURE_SRCS) $(SHLIB_LINK) -lm

# The frozen known answers of the value formats.
test/unit/test_cipher: test/unit/format_vectors.h

.PHONY: unit
unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; ./$$t; done

$(FULL_SCRIPT): sql/$(EXTENSION)--0.1.0.sql $(UPDATE_SCRIPTS)
	{ echo '-- Built by make from the scripts below; edit those, not this file.'; \
	  for f in $^; do echo "-- ---- $$f"; grep -v '^\\echo ' $$f; done; } > $@

# The regression tests need the library preloaded and key files (the errors test finds
# them through ENVELOPE_TEST_DIR): made once, kept for later runs.
installcheck: $(TEST_TMP)/regress.conf
installcheck: export ENVELOPE_TEST_DIR = $(TEST_TMP)
$(TEST_TMP)/regress.conf:
	bash $(srcdir)/test/prepare_keys.sh $(TEST_TMP)

# PGXS does not track header dependencies: rebuild every object when a header changes
# (structures such as CipherKey are embedded by value across files).
$(OBJS): $(wildcard src/*.h)
