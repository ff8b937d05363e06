/*
 * aws_credentials.h — the AWS credential provider chain, in the order the AWS SDKs use.
 *
 * Plain C on http.h, json-c and OpenSSL: no postgres.h, no ereport.  Sources, first
 * hit wins: environment, shared credentials/config files (profile), web identity token
 * (STS AssumeRoleWithWebIdentity), ECS container credentials, EC2 instance role via
 * IMDSv2 only.  The result is cached per process and refreshed when less than five
 * minutes remain before it expires.  No message ever holds a secret.
 */
#ifndef PG_ENVELOPE_AWS_CREDENTIALS_H
#define PG_ENVELOPE_AWS_CREDENTIALS_H

#include <time.h>

#include "kms.h"

typedef struct AwsCredentials
{
	char		access_key_id[128];
	char		secret_access_key[128];
	char		session_token[4096];
	time_t		expiration;		/* 0 = does not expire */
	char		source[32];		/* "environment", "shared-file", "web-identity",
								 * "ecs", "imds" — for messages */
} AwsCredentials;

/*
 * Returns KMS_OK and fills *out, or KMS_ERR_CREDENTIALS/... with err filled (never
 * containing a secret).  Caches per process; refreshes when less than 5 minutes remain
 * before expiration.  The caller wipes *out with aws_credentials_wipe when done.
 */
extern KmsStatus aws_credentials_get(const KmsConfig *cfg, AwsCredentials *out,
									 KmsError *err);

/* Drop the cache (after ExpiredTokenException or an auth failure). */
extern void aws_credentials_invalidate(void);

extern void aws_credentials_wipe(AwsCredentials *c);

#endif							/* PG_ENVELOPE_AWS_CREDENTIALS_H */
