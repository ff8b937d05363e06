/*
 * fuzz_aws_credentials.c — libFuzzer target for what the credential chain reads from
 * outside: the JSON of the ECS and EC2 metadata endpoints, the XML of STS answers
 * (credentials and errors), the AWS shared credentials and config files (INI), and
 * ISO 8601 expiry times.
 *
 * The parsers are static in the chain's source, so the harness compiles that file into
 * itself (test/fuzz/run.sh then leaves it out of the link).  The first input byte
 * picks the parser and its options; the rest is the answer or file.  Besides what ASan
 * and UBSan see, every parsed credential field must be NUL-terminated inside its
 * buffer.
 */
#include "../../src/aws_credentials.c"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check_terminated(const AwsCredentials *c)
{
	if (memchr(c->access_key_id, '\0', sizeof(c->access_key_id)) == NULL ||
		memchr(c->secret_access_key, '\0', sizeof(c->secret_access_key)) == NULL ||
		memchr(c->session_token, '\0', sizeof(c->session_token)) == NULL)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	AwsCredentials creds;
	char	   *text;
	size_t		len;
	uint8_t		selector;

	if (size < 1)
		return 0;
	selector = data[0];
	len = size - 1;
	/* NUL-terminated copy: the INI reader and the time parser take C strings. */
	text = malloc(len + 1);
	memcpy(text, data + 1, len);
	text[len] = '\0';
	memset(&creds, 0, sizeof(creds));

	switch (selector % 4)
	{
		case 0:
			{
				const char *why;

				(void) parse_json_credentials(text, len, &creds, &why);
				check_terminated(&creds);
				break;
			}
		case 1:
			{
				char		code[64];
				char		field[2048];

				xml_error_code(text, len, code, sizeof(code));
				if (memchr(code, '\0', sizeof(code)) == NULL)
					abort();
				(void) xml_field(text, text + len, "AccessKeyId", field, sizeof(field));
				(void) xml_field(text, text + len, "SessionToken", field, sizeof(field));
				break;
			}
		case 2:
			{
				IniResult	res;

				memset(&res, 0, sizeof(res));
				ini_read_profile(text, (selector & 4) ? "named" : "default",
								 (selector & 8) != 0, &creds, &res);
				check_terminated(&creds);
				break;
			}
		case 3:
			{
				time_t		t;

				(void) parse_iso8601(text, &t);
				break;
			}
	}
	explicit_bzero(&creds, sizeof(creds));
	free(text);
	return 0;
}
