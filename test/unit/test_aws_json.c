/*
 * test_aws_json.c — aws_json.c, the one parser of AWS answers (credential endpoints
 * and KMS): what it accepts, what it refuses, and the string getter.
 */
#include <stdbool.h>

#include <json-c/json.h>

#include "aws_json.h"
#include "unit.h"

static bool
parses(const char *body, size_t max_len)
{
	json_object *obj = aws_json_parse(body, strlen(body), max_len);

	aws_json_free(obj);
	return obj != NULL;
}

/* An object nested `depth` levels deep: {"a":{"a":...{}...}}. */
static char *
nested(int depth)
{
	char	   *s = malloc(8 * (size_t) depth + 1);
	size_t		n = 0;

	for (int i = 0; i < depth - 1; i++)
		n += (size_t) sprintf(s + n, "{\"a\":");
	n += (size_t) sprintf(s + n, "{}");
	for (int i = 0; i < depth - 1; i++)
		s[n++] = '}';
	s[n] = '\0';
	return s;
}

static void
test_accepts_and_refuses(void)
{
	char	   *ok_depth = nested(AWS_JSON_MAX_DEPTH);
	char	   *too_deep = nested(AWS_JSON_MAX_DEPTH + 1);

	CHECK(parses("{\"KeyId\":\"k\"}", 1024), "an object parses");
	CHECK(parses("  {\"KeyId\":\"k\"} \r\n\t", 1024), "whitespace around an object is fine");
	CHECK(!parses("{\"KeyId\":\"k\"}x", 1024), "anything but whitespace after the object is refused");
	CHECK(!parses("{\"KeyId\":\"k\"}{}", 1024), "a second value is refused");
	CHECK(!parses("[1,2]", 1024), "an array is refused");
	CHECK(!parses("\"text\"", 1024), "a string is refused");
	CHECK(!parses("{\"KeyId\":", 1024), "a truncated object is refused");
	CHECK(!parses("", 1024), "an empty body is refused");
	CHECK(aws_json_parse(NULL, 0, 1024) == NULL, "no body is refused");
	CHECK(!parses("{\"KeyId\":\"k\"}", 5), "a body longer than max_len is refused");
	CHECK(parses(ok_depth, 1024), "%d levels of nesting parse", AWS_JSON_MAX_DEPTH);
	CHECK(!parses(too_deep, 1024), "%d levels of nesting are refused", AWS_JSON_MAX_DEPTH + 1);
	free(ok_depth);
	free(too_deep);
}

static void
test_strings(void)
{
	const char *body = "{\"Plaintext\":\"c2VjcmV0\",\"N\":1}";
	json_object *obj = aws_json_parse(body, strlen(body), 1024);
	size_t		len = 0;
	const char *v;

	CHECK(obj != NULL, "the answer parses");
	v = aws_json_string(obj, "Plaintext", &len);
	CHECK(v != NULL && len == 8 && strcmp(v, "c2VjcmV0") == 0, "a string member is found");
	CHECK(aws_json_string(obj, "N", &len) == NULL, "a number is not a string");
	CHECK(aws_json_string(obj, "Missing", NULL) == NULL, "an absent member is NULL");
	CHECK(aws_json_string(NULL, "Plaintext", NULL) == NULL, "no object, no string");

	/* Wiping overwrites json-c's own copy, which the getter points into. */
	aws_json_wipe_strings(obj);
	v = aws_json_string(obj, "Plaintext", &len);
	CHECK(v != NULL && len == 8 && memcmp(v, "\0\0\0\0\0\0\0\0", 8) == 0,
		  "aws_json_wipe_strings zeroes the string values in place");
	aws_json_free(obj);
}

int
main(void)
{
	test_accepts_and_refuses();
	test_strings();
	return unit_finish("test_aws_json");
}
