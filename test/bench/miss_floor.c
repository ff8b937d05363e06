/*
 * miss_floor.c — the floor under a row whose tenant is not in the backend's cache.
 *
 * Such a row needs two things the cached row does not: the tenant's state and key from
 * shared memory (dependent loads in tables larger than the CPU's caches) and a cipher
 * context keyed with that key.  This measures both, without PostgreSQL:
 *
 *   - "decrypt": cipher_decrypt of a 32-byte value with a ready context (the floor);
 *   - "rekey_decrypt": the same after re-keying the context in place with
 *     cipher_key_add() and a spare, as the backend does for a tenant it does not hold;
 *   - "chase_<N>MB": ns per dependent load, a random cyclic pointer chase through N MB
 *     (one 64-byte line per step), 4 KB pages: the cost of one cache miss at a given
 *     working-set size, TLB misses included.  perf's cache-miss counters are not
 *     available on every VM; this is.
 *
 * Times are the thread's CPU time, so that other processes on a shared machine
 * disturb them less (they still share the caches).
 *
 *   miss_floor [COUNT]      default 200,000 values
 *
 * Prints one JSON object per line.  Built like cipher_floor.c:
 *   cc -O2 -Isrc -o miss_floor test/bench/miss_floor.c src/cipher.c -lcrypto
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cipher.h"

static double
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double) ts.tv_sec * 1e9 + (double) ts.tv_nsec;
}

/* A random cyclic permutation of the lines of `bytes`, followed `steps` times. */
static double
chase_ns(size_t bytes, long steps)
{
	size_t		nlines = bytes / 64;
	char	   *area = malloc(bytes);
	size_t	   *order = malloc(nlines * sizeof(size_t));
	char	   *p;
	double		t0;

	if (area == NULL || order == NULL)
		exit(1);
	for (size_t i = 0; i < nlines; i++)
		order[i] = i;
	srand(1);
	for (size_t i = nlines - 1; i > 0; i--)
	{
		size_t		j = ((size_t) rand() * RAND_MAX + rand()) % (i + 1);
		size_t		t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	for (size_t i = 0; i < nlines; i++)
		*(char **) (area + order[i] * 64) = area + order[(i + 1) % nlines] * 64;
	p = area;
	for (size_t i = 0; i < nlines; i++)	/* touch every page once first */
		p = *(char **) p;
	t0 = now_ns();
	for (long i = 0; i < steps; i++)
		p = *(char **) p;
	t0 = (now_ns() - t0) / steps;
	if (p == NULL)
		puts("");
	free(order);
	free(area);
	return t0;
}

int
main(int argc, char **argv)
{
	long		count = argc > 1 ? atol(argv[1]) : 200000;
	uint8_t		raw[CIPHER_KEY_LEN];
	CipherKey	key,
				spare;
	CipherBinding binding = {"tenant123", 9, NULL, 0};
	uint8_t		plain[32],
				sealed[32 + CIPHER_OVERHEAD],
				opened[32],
				nonce[CIPHER_NONCE_LEN];
	static const int sizes_mb[] = {1, 4, 8, 16, 64, 256};
	double		best_dec = 1e30,
				best_rekey = 1e30;

	memset(plain, 'a', sizeof(plain));
	for (int i = 0; i < CIPHER_KEY_LEN; i++)
		raw[i] = (uint8_t) (i * 7 + 1);
	memset(&key, 0, sizeof(key));
	if (cipher_key_add(&key, CIPHER_USE_ENCRYPT, raw, NULL) != CIPHER_OK ||
		cipher_key_add(&key, CIPHER_USE_DECRYPT, raw, NULL) != CIPHER_OK ||
		cipher_next_nonce(nonce) != CIPHER_OK ||
		cipher_encrypt(&key, 1, nonce, &binding, plain, sizeof(plain), sealed) != CIPHER_OK)
		return 1;
	for (int run = 0; run < 3; run++)
	{
		double		t0 = now_ns(),
					t1,
					t2;

		for (long i = 0; i < count; i++)
			if (cipher_decrypt(&key, &binding, sealed, sizeof(sealed), opened) != CIPHER_OK)
				return 1;
		t1 = now_ns();
		for (long i = 0; i < count; i++)
		{
			memset(&spare, 0, sizeof(spare));
			spare.dec = key.dec;
			key.dec = NULL;
			if (cipher_key_add(&key, CIPHER_USE_DECRYPT, raw, &spare) != CIPHER_OK ||
				cipher_decrypt(&key, &binding, sealed, sizeof(sealed), opened) != CIPHER_OK)
				return 1;
		}
		t2 = now_ns();
		if ((t1 - t0) / count < best_dec)
			best_dec = (t1 - t0) / count;
		if ((t2 - t1) / count < best_rekey)
			best_rekey = (t2 - t1) / count;
	}
	printf("{\"op\": \"decrypt\", \"min_us\": %.4f}\n", best_dec / 1000.0);
	printf("{\"op\": \"rekey_decrypt\", \"min_us\": %.4f}\n", best_rekey / 1000.0);
	for (size_t s = 0; s < sizeof(sizes_mb) / sizeof(sizes_mb[0]); s++)
		printf("{\"op\": \"chase_%dMB\", \"ns_per_load\": %.1f}\n", sizes_mb[s],
			   chase_ns((size_t) sizes_mb[s] << 20, 2000000));
	cipher_key_free(&key);
	return 0;
}
