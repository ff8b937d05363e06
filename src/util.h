/*
 * util.h — two small helpers the plain-C layers (http, the AWS credential chain, the
 * SigV4 signer, the local provider) share.  No postgres.h.
 */
#ifndef PG_ENVELOPE_UTIL_H
#define PG_ENVELOPE_UTIL_H

#include <stddef.h>

/* Wipe len bytes at p (the whole allocation), then free it; NULL is allowed. */
extern void util_wipe_free(void *p, size_t len);

/* The value 0..15 of one hexadecimal digit (either case), or -1 for any other char. */
extern int	util_hex_value(char c);

#endif							/* PG_ENVELOPE_UTIL_H */
