/*
 * aws_json.h — the JSON of AWS answers (credential endpoints, KMS), read so that no
 * copy of a secret is left behind in freed memory.
 *
 * Plain C on json-c: no postgres.h, no ereport.  json-c keeps its own copy of every
 * string it reads, first in its tokenizer buffer and then in the string objects; an
 * answer may carry a secret access key, a session token or a plaintext data key in
 * any of them, so both are wiped before json-c frees them.
 */
#ifndef PG_ENVELOPE_AWS_JSON_H
#define PG_ENVELOPE_AWS_JSON_H

#include <stddef.h>

struct json_object;

/* AWS answers are flat; anything nested deeper than this is refused. */
#define AWS_JSON_MAX_DEPTH 16

/*
 * Parse body[0..len) as one JSON object followed by nothing but whitespace, with the
 * tokenizer buffer sized for the whole body up front (so no realloc leaves a fragment
 * in freed memory) and wiped before it is freed.  Returns NULL for an empty body, one
 * longer than max_len, anything that is not such an object, or out of memory; every
 * string of a refused parse is wiped too.  Free the result with aws_json_free.
 */
extern struct json_object *aws_json_parse(const char *body, size_t len, size_t max_len);

/*
 * The string member `key` of obj, with its length in *len (when len is not NULL); NULL
 * when obj is NULL or the member is absent or not a string.  Points into obj.
 */
extern const char *aws_json_string(struct json_object *obj, const char *key, size_t *len);

/* Wipe every string of a parsed tree in place (json_object_put does not). */
extern void aws_json_wipe_strings(struct json_object *obj);

/* Wipe every string of obj, then free it; NULL is allowed. */
extern void aws_json_free(struct json_object *obj);

#endif							/* PG_ENVELOPE_AWS_JSON_H */
