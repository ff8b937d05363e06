/*
 * cipher_floor.c — the raw AES-256-GCM floor of pg_envelope's row path.
 *
 * Calls the cipher layer (src/cipher.c) exactly as the SQL functions do, minus
 * everything SQL: one fixed key whose contexts are set up once (cipher_key_init), a
 * nonce from the per-process pool (cipher_next_nonce) and cipher_encrypt per value, and
 * cipher_decrypt per value, with the same binding shape (a tenant name, no context).
 * No allocation per value: the output buffers are reused.
 *
 * Also the same over 1,000 keys used in turn ("encrypt_1000keys", "decrypt_1000keys"),
 * as the SQL benchmark's rows cycle through 1,000 tenants: each value then works on
 * another key's OpenSSL state, which no longer sits in the CPU's nearest caches.
 *
 *   cipher_floor [COUNT [RUNS]]      default 1,000,000 values, 3 runs
 *
 * Prints one JSON object per line: {"op": ..., "size": ..., "runs_ns": [...],
 * "min_us": ..., "median_us": ...}, µs per value.  Built by test/bench/run.sh with the
 * flags of `make unit` and linked with src/cipher.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cipher.h"

#define MAX_RUNS 16
#define NKEYS 1000

static double
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec * 1e9 + (double) ts.tv_nsec;
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return (x > y) - (x < y);
}

static void
report(const char *op, size_t size, long count, double *ns, int runs)
{
	double		sorted[MAX_RUNS];

	memcpy(sorted, ns, sizeof(double) * runs);
	qsort(sorted, runs, sizeof(double), cmp_double);
	printf("{\"op\": \"%s\", \"size\": %zu, \"count\": %ld, \"runs_ns\": [", op, size, count);
	for (int r = 0; r < runs; r++)
		printf("%s%.0f", r ? ", " : "", ns[r]);
	printf("], \"min_us\": %.4f, \"median_us\": %.4f}\n",
		   sorted[0] / 1000.0 / count, sorted[runs / 2] / 1000.0 / count);
	fflush(stdout);
}

static void
die(const char *what, CipherStatus cs)
{
	fprintf(stderr, "cipher_floor: %s failed (status %d)\n", what, (int) cs);
	exit(1);
}

int
main(int argc, char **argv)
{
	long		count = argc > 1 ? atol(argv[1]) : 1000000;
	int			runs = argc > 2 ? atoi(argv[2]) : 3;
	static const size_t sizes[] = {32, 1024};
	uint8_t		raw[CIPHER_KEY_LEN];
	CipherKey	key;
	static CipherKey keys[NKEYS];
	CipherBinding binding = {"tenant123", 9, NULL, 0};
	CipherStatus cs;
	volatile uint8_t sink = 0;

	if (count <= 0 || runs <= 0 || runs > MAX_RUNS)
	{
		fprintf(stderr, "usage: cipher_floor [COUNT [RUNS (1..%d)]]\n", MAX_RUNS);
		return 2;
	}
	for (int i = 0; i < CIPHER_KEY_LEN; i++)
		raw[i] = (uint8_t) (i * 7 + 1);
	if ((cs = cipher_key_init(&key, raw)) != CIPHER_OK)
		die("cipher_key_init", cs);
	for (int k = 0; k < NKEYS; k++)
	{
		raw[0] = (uint8_t) k;
		raw[1] = (uint8_t) (k >> 8);
		if ((cs = cipher_key_init(&keys[k], raw)) != CIPHER_OK)
			die("cipher_key_init", cs);
	}

	for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++)
	{
		size_t		len = sizes[s];
		uint8_t    *plain = malloc(len);
		uint8_t    *sealed = malloc(len + CIPHER_OVERHEAD);
		uint8_t    *opened = malloc(len);
		double		enc_ns[MAX_RUNS], dec_ns[MAX_RUNS], nonce_ns[MAX_RUNS];
		double		enck_ns[MAX_RUNS], deck_ns[MAX_RUNS];
		uint8_t    *sealed_k = malloc((len + CIPHER_OVERHEAD) * NKEYS);
		uint8_t		nonce[CIPHER_NONCE_LEN];

		if (plain == NULL || sealed == NULL || opened == NULL || sealed_k == NULL)
			die("malloc", CIPHER_ERR_INTERNAL);
		for (size_t i = 0; i < len; i++)
			plain[i] = (uint8_t) ('a' + i % 26);

		/* warm-up: first touch of buffers and OpenSSL's code paths */
		for (long i = 0; i < 10000; i++)
		{
			if ((cs = cipher_next_nonce(nonce)) != CIPHER_OK ||
				(cs = cipher_encrypt(&key, 1, nonce, &binding, plain, len, sealed)) != CIPHER_OK ||
				(cs = cipher_decrypt(&key, &binding, sealed, len + CIPHER_OVERHEAD, opened)) != CIPHER_OK)
				die("warm-up", cs);
		}
		if (memcmp(plain, opened, len) != 0)
			die("round trip", CIPHER_ERR_AUTH);

		for (int r = 0; r < runs; r++)
		{
			double		t0,
						t1;

			/* nonce draw alone (part of every encrypt) */
			t0 = now_ns();
			for (long i = 0; i < count; i++)
			{
				cipher_next_nonce(nonce);
				sink ^= nonce[0];
			}
			t1 = now_ns();
			nonce_ns[r] = t1 - t0;

			/* encrypt: nonce + header + AAD (tenant) + GCM seal */
			t0 = now_ns();
			for (long i = 0; i < count; i++)
			{
				plain[0] = (uint8_t) i;
				if (cipher_next_nonce(nonce) != CIPHER_OK ||
					cipher_encrypt(&key, 1, nonce, &binding, plain, len, sealed) != CIPHER_OK)
					die("cipher_encrypt", CIPHER_ERR_INTERNAL);
				sink ^= sealed[len + CIPHER_OVERHEAD - 1];
			}
			t1 = now_ns();
			enc_ns[r] = t1 - t0;

			/* decrypt: parse header + AAD + GCM open and tag check, of one sealed value */
			t0 = now_ns();
			for (long i = 0; i < count; i++)
			{
				if (cipher_decrypt(&key, &binding, sealed, len + CIPHER_OVERHEAD, opened) != CIPHER_OK)
					die("cipher_decrypt", CIPHER_ERR_AUTH);
				sink ^= opened[0];
			}
			t1 = now_ns();
			dec_ns[r] = t1 - t0;

			/* the same, key k = i % 1000 in turn */
			t0 = now_ns();
			for (long i = 0; i < count; i++)
			{
				int			k = (int) (i % NKEYS);

				plain[0] = (uint8_t) i;
				if (cipher_next_nonce(nonce) != CIPHER_OK ||
					cipher_encrypt(&keys[k], 1, nonce, &binding, plain, len,
								   sealed_k + (size_t) k * (len + CIPHER_OVERHEAD)) != CIPHER_OK)
					die("cipher_encrypt", CIPHER_ERR_INTERNAL);
			}
			t1 = now_ns();
			enck_ns[r] = t1 - t0;
			t0 = now_ns();
			for (long i = 0; i < count; i++)
			{
				int			k = (int) (i % NKEYS);

				if (cipher_decrypt(&keys[k], &binding, sealed_k + (size_t) k * (len + CIPHER_OVERHEAD),
								   len + CIPHER_OVERHEAD, opened) != CIPHER_OK)
					die("cipher_decrypt", CIPHER_ERR_AUTH);
				sink ^= opened[0];
			}
			t1 = now_ns();
			deck_ns[r] = t1 - t0;
		}
		report("nonce", len, count, nonce_ns, runs);
		report("encrypt", len, count, enc_ns, runs);
		report("decrypt", len, count, dec_ns, runs);
		report("encrypt_1000keys", len, count, enck_ns, runs);
		report("decrypt_1000keys", len, count, deck_ns, runs);
		free(sealed_k);
		free(plain);
		free(sealed);
		free(opened);
	}
	cipher_key_free(&key);
	for (int k = 0; k < NKEYS; k++)
		cipher_key_free(&keys[k]);
	return sink == 0xff ? 0 : 0;
}
