/*
 * aws_json.c — parsing AWS answers without leaving secrets in freed memory: the one
 * wiping JSON parser of the credential chain (aws_credentials.c) and the KMS provider
 * (kms_aws.c).  See aws_json.h.
 */
#include <ctype.h>
#include <stdbool.h>

#include <json-c/json.h>
#include <json-c/printbuf.h>
#include <openssl/crypto.h>

#include "aws_json.h"

void
aws_json_wipe_strings(json_object *obj)
{
	if (obj == NULL)
		return;
	switch (json_object_get_type(obj))
	{
		case json_type_string:
			OPENSSL_cleanse((char *) json_object_get_string(obj),
							(size_t) json_object_get_string_len(obj));
			break;
		case json_type_object:
			{
				json_object_object_foreach(obj, key, val)
				{
					(void) key;
					aws_json_wipe_strings(val);
				}
				break;
			}
		case json_type_array:
			for (size_t i = 0; i < json_object_array_length(obj); i++)
				aws_json_wipe_strings(json_object_array_get_idx(obj, i));
			break;
		default:
			break;
	}
}

void
aws_json_free(json_object *obj)
{
	if (obj == NULL)
		return;
	aws_json_wipe_strings(obj);
	json_object_put(obj);
}

/* Whether only whitespace follows the parsed value. */
static bool
only_whitespace_after(const char *body, size_t len, size_t end)
{
	for (size_t i = end; i < len; i++)
		if (!isspace((unsigned char) body[i]))
			return false;
	return true;
}

json_object *
aws_json_parse(const char *body, size_t len, size_t max_len)
{
	json_tokener *tok;
	json_object *obj;
	bool		ok;

	if (body == NULL || len == 0 || len > max_len)
		return NULL;
	tok = json_tokener_new_ex(AWS_JSON_MAX_DEPTH);
	if (tok == NULL)
		return NULL;
	/* Grow the scratch buffer to its final size now: it never reallocates later. */
	if (printbuf_memset(tok->pb, 0, 0, (int) len + 1) < 0)
	{
		json_tokener_free(tok);
		return NULL;
	}
	printbuf_reset(tok->pb);

	obj = json_tokener_parse_ex(tok, body, (int) len);
	ok = obj != NULL && json_tokener_get_error(tok) == json_tokener_success &&
		json_object_is_type(obj, json_type_object) &&
		only_whitespace_after(body, len, json_tokener_get_parse_end(tok));
	OPENSSL_cleanse(tok->pb->buf, (size_t) tok->pb->size);
	json_tokener_free(tok);
	if (!ok && obj != NULL)
	{
		aws_json_free(obj);
		obj = NULL;
	}
	return obj;
}

const char *
aws_json_string(json_object *obj, const char *key, size_t *len)
{
	json_object *v;

	if (obj == NULL || !json_object_object_get_ex(obj, key, &v) ||
		!json_object_is_type(v, json_type_string))
		return NULL;
	if (len)
		*len = (size_t) json_object_get_string_len(v);
	return json_object_get_string(v);
}
