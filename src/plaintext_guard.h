/*
 * plaintext_guard.h — refuse catalog objects that would persist decrypted values.
 */
#ifndef PG_ENVELOPE_PLAINTEXT_GUARD_H
#define PG_ENVELOPE_PLAINTEXT_GUARD_H

/*
 * Chains the object-access hook that refuses, at creation, an extended-statistics
 * object whose expressions call a decrypting function.  Called once from _PG_init.
 */
extern void plaintext_guard_install(void);

#endif							/* PG_ENVELOPE_PLAINTEXT_GUARD_H */
