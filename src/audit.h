/*
 * audit.h — the audit trail of key actions (envelope.audit_log).
 *
 * Every key action appends one row in the same transaction as the action, so a
 * rolled-back action leaves no row and a committed one always has its row.
 */
#ifndef ENVELOPE_AUDIT_H
#define ENVELOPE_AUDIT_H

#include "postgres.h"

/*
 * Append a row to envelope.audit_log for `action`, recording the caller's
 * session_user and current_user (the one in effect when this is called, not the
 * table owner the insert runs as).  `tenant`, `versions` (nversions entries),
 * `kms_key` and `detail_json` (a JSON object as text) may each be NULL.  Does nothing
 * in a database whose pg_envelope is still at 0.1.0 (there is no audit_log there).
 * Never pass key bytes or plaintext in any argument.
 */
extern void audit_log_action(const char *action, const char *tenant,
							 const int32 *versions, int nversions,
							 const char *kms_key, const char *detail_json);

/* audit_log_action for one DEK version (0 for none). */
extern void audit_log_key_action(const char *action, const char *tenant, int32 version,
								 const char *kms_key, const char *detail_json);

#endif							/* ENVELOPE_AUDIT_H */
