/*
 * kms_aws.h — what the aws provider exposes besides its KmsProvider entry.
 */
#ifndef PG_ENVELOPE_KMS_AWS_H
#define PG_ENVELOPE_KMS_AWS_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Writes the regional KMS host name for `region` into `host`: the standard endpoint,
 * or the FIPS one when `fips` is set.  Returns false when the region has no FIPS
 * endpoint (the China regions).
 */
extern bool kms_aws_default_host(const char *region, bool fips, char *host, size_t host_len);

#endif							/* PG_ENVELOPE_KMS_AWS_H */
