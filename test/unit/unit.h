/*
 * unit.h — the few helpers the pure-C unit tests share.
 *
 * Each test program prints one line per failure and ends with
 * "<name>: N passed, N failed"; it exits non-zero on any failure.  A test whose input
 * data is missing fails loudly: it never passes by skipping.
 */
#ifndef PG_ENVELOPE_UNIT_H
#define PG_ENVELOPE_UNIT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

static int	unit_passed;
static int	unit_failed;

#define CHECK(cond, ...) \
	do { \
		if (cond) \
			unit_passed++; \
		else \
		{ \
			unit_failed++; \
			fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
			fprintf(stderr, __VA_ARGS__); \
			fputc('\n', stderr); \
		} \
	} while (0)

static inline int
unit_finish(const char *name)
{
	printf("%s: %d passed, %d failed\n", name, unit_passed, unit_failed);
	return unit_failed == 0 && unit_passed > 0 ? 0 : 1;
}

/*
 * The published test vectors, kept in the repository (test/vectors/README.md says where
 * they come from).  The path is relative to the top of the tree, where `make unit`
 * runs the test programs.
 */
#define UNIT_VECTORS_DIR "test/vectors"

/* Read a whole file into a NUL-terminated malloc'd buffer; NULL if unreadable. */
static inline char *
unit_read_file(const char *path, size_t *len_out)
{
	FILE	   *f = fopen(path, "rb");
	char	   *buf;
	long		len;

	if (f == NULL)
		return NULL;
	fseek(f, 0, SEEK_END);
	len = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc(len + 1);
	if (buf == NULL || fread(buf, 1, len, f) != (size_t) len)
	{
		free(buf);
		fclose(f);
		return NULL;
	}
	buf[len] = '\0';
	fclose(f);
	if (len_out)
		*len_out = (size_t) len;
	return buf;
}

/* Decode hex into a malloc'd buffer (at least 1 byte allocated); -1 on bad hex. */
static inline long
unit_unhex(const char *hex, uint8_t **out)
{
	size_t		n = strlen(hex);
	uint8_t    *buf;

	*out = NULL;
	if (n % 2)
		return -1;
	buf = malloc(n / 2 + 1);
	for (size_t i = 0; i < n / 2; i++)
	{
		unsigned int b;

		if (sscanf(hex + 2 * i, "%2x", &b) != 1)
		{
			free(buf);
			return -1;
		}
		buf[i] = (uint8_t) b;
	}
	*out = buf;
	return (long) (n / 2);
}

#endif
