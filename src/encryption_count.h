/*
 * encryption_count.h — how many randomized encryptions each DEK version has made, and
 * the limit that makes a tenant's key rotate before AES-GCM's random nonces run short.
 *
 * AES-256-GCM with random 96-bit nonces must stay under 2^32 encryptions per key (NIST
 * SP 800-38D §8.3).  Each (tenant, DEK version) has a row in
 * envelope.data_key_encryptions whose figure is an upper bound of the encryptions made
 * under that key: a backend reserves a block of counts there (updated in place and
 * WAL-logged, as nextval() does with a sequence) before it hands any of them out, and
 * then counts in its own memory, so the row path takes no lock.  A crash loses only
 * the unused part of each reservation: the stored figure may be higher than the truth,
 * never lower.
 */
#ifndef PG_ENVELOPE_ENCRYPTION_COUNT_H
#define PG_ENVELOPE_ENCRYPTION_COUNT_H

#include "compat.h"

#include "keycache.h"

/*
 * The budget pool holds envelope.cache_size keys, clamped to these bounds (see
 * encryption_count.c); the key cache's transient entry sizes its budget hints alike.
 */
#define BUDGET_POOL_MIN_SLOTS	16384
#define BUDGET_POOL_MAX_SLOTS	131072

/* envelope.max_encryptions_per_key (pg_envelope.c defines it through this module). */
extern int	envelope_max_encryptions_per_key;

/* Define envelope.max_encryptions_per_key (from _PG_init). */
extern void encryption_count_define_settings(void);

/*
 * The key new values of `tenant` are encrypted with, as keycache_key_for_encrypt()
 * returns it, with this encryption counted; when the active version has reached the
 * limit, the tenant's key is rotated first (encryption_count_rotate_spent).
 */
extern EnvelopeKeyRef encryption_counted_key(const char *tenant, size_t tenant_len);

/*
 * The active key of `tenant`, version `spent`, has reached its limit: rotate the
 * tenant's key in this transaction, unless a concurrent transaction has already
 * rotated it (it waits for that one).  Raises an error where rotating is impossible
 * (read-only transaction, parallel worker).
 */
extern void encryption_count_rotate_spent(const char *tenant, size_t tenant_len, uint32 spent);

/*
 * Give the new DEK (tenant_id, version) its count row, in the transaction that stores
 * the key.  Does nothing in a database whose extension predates the counts.
 */
extern void encryption_count_add_key(int32 tenant_id, uint32 version);

#endif							/* PG_ENVELOPE_ENCRYPTION_COUNT_H */
