/*
 * fuzz_sigv4.c — libFuzzer target for SigV4 canonicalisation: arbitrary methods, URIs
 * (paths with dot segments, repeated slashes, percent escapes, queries with repeated,
 * empty and unsorted parameters) and header names and values (folding whitespace,
 * case, duplicates), with and without path normalisation.
 *
 * The input is split at 0x00 bytes: method, uri, then name/value pairs of headers;
 * whatever follows the last separator is the payload.  The signer must either sign or
 * refuse with a message, never read or write out of bounds (ASan), and never produce
 * an Authorization value that is not NUL-terminated inside its buffer.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sigv4.h"

#define MAX_FIELDS 16

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	   *copy;
	char	   *fields[MAX_FIELDS];
	int			nfields = 0;
	size_t		start = 0;
	Sigv4Header headers[MAX_FIELDS / 2];
	int			nheaders = 0;
	Sigv4Request req;
	Sigv4Credentials cred = {"AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", NULL};
	char		authorization[2048];
	char		err[256];

	if (size < 2)
		return 0;
	copy = malloc(size + 1);
	memcpy(copy, data + 1, size - 1);
	copy[size - 1] = '\0';
	for (size_t i = 0; i < size - 1 && nfields < MAX_FIELDS - 1; i++)
		if (copy[i] == '\0')
		{
			fields[nfields++] = copy + start;
			start = i + 1;
		}
	fields[nfields++] = copy + start;
	if (nfields < 2)
	{
		free(copy);
		return 0;
	}
	for (int i = 2; i + 1 < nfields - 1; i += 2)
	{
		headers[nheaders].name = fields[i];
		headers[nheaders].value = fields[i + 1];
		nheaders++;
	}
	req.method = fields[0];
	req.uri = fields[1];
	req.headers = headers;
	req.nheaders = nheaders;
	req.payload = (const unsigned char *) fields[nfields - 1];
	req.payload_len = strlen(fields[nfields - 1]);
	if (data[0] & 1)
		cred.session_token = "session-token";

	memset(authorization, 0x5A, sizeof(authorization));
	if (sigv4_sign(&req, &cred, "us-east-1", "kms", "20150830T123600Z",
				   (data[0] & 2) != 0, (data[0] & 4) != 0,
				   authorization, sizeof(authorization), NULL, err, sizeof(err)) == 0)
	{
		if (memchr(authorization, '\0', sizeof(authorization)) == NULL)
			abort();
		if (strncmp(authorization, "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/", 40) != 0)
			abort();
	}
	else if (memchr(err, '\0', sizeof(err)) == NULL)
		abort();
	free(copy);
	return 0;
}
