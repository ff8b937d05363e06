/*
 * plaintext_guard.h — keep plaintext out of the catalog and the server log.
 */
#ifndef PG_ENVELOPE_PLAINTEXT_GUARD_H
#define PG_ENVELOPE_PLAINTEXT_GUARD_H

/*
 * Chains the object-access hook that refuses, at creation, an extended-statistics
 * object whose expressions call a decrypting function, and the emit_log_hook that
 * keeps the CONTEXT of an error with a hidden statement out of the server log.
 * Called once from _PG_init.
 */
extern void plaintext_guard_install(void);

#endif							/* PG_ENVELOPE_PLAINTEXT_GUARD_H */
