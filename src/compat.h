/*
 * compat.h — every difference between the PostgreSQL major versions pg_envelope is
 * written for (13 to 17) lives here, so supporting a new one is one file to read.
 * Only PostgreSQL 15 is built and tested; the branches for the others are untested.
 */
#ifndef PG_ENVELOPE_COMPAT_H
#define PG_ENVELOPE_COMPAT_H

#include "postgres.h"

#if PG_VERSION_NUM < 130000
#error "pg_envelope requires PostgreSQL 13 or later"
#endif

/* PG15 added shmem_request_hook; before it, shared memory is requested in _PG_init. */
#if PG_VERSION_NUM >= 150000
#define ENVELOPE_HAS_SHMEM_REQUEST_HOOK 1
#endif

/* PG15 renamed EmitWarningsOnPlaceholders to MarkGUCPrefixReserved. */
#if PG_VERSION_NUM < 150000
#define MarkGUCPrefixReserved(prefix) EmitWarningsOnPlaceholders(prefix)
#endif

/* PG14 added HASH_STRINGS; before it, string keys were dynahash's default. */
#if PG_VERSION_NUM < 140000
#define HASH_STRINGS 0
#endif

/* PG14 added expressions to extended statistics (pg_statistic_ext.stxexprs). */
#if PG_VERSION_NUM >= 140000
#define ENVELOPE_HAS_STATISTICS_EXPRESSIONS 1
#endif

/* The cipher layer needs OpenSSL 3 (EVP_MAC, OSSL_PARAM, AES-SIV through a provider). */
#include <openssl/opensslv.h>
#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error "pg_envelope requires OpenSSL 3.0 or later"
#endif

#endif							/* PG_ENVELOPE_COMPAT_H */
