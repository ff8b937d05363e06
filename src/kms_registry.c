/*
 * kms_registry.c — the list of KMS providers, and helpers every provider shares.
 *
 * Plain C.  To add a provider: write kms_<name>.c defining a `const KmsProvider`,
 * declare it below and add it to kms_providers[].
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "kms.h"

extern const KmsProvider kms_aws_provider;
extern const KmsProvider kms_kmip_provider;
extern const KmsProvider kms_local_provider;

static const KmsProvider *const kms_providers[] = {
	&kms_aws_provider,
	&kms_kmip_provider,
	&kms_local_provider,
};

#define KMS_NPROVIDERS (sizeof(kms_providers) / sizeof(kms_providers[0]))

const KmsProvider *
kms_find_provider(const char *name)
{
	if (name == NULL)
		return NULL;
	for (size_t i = 0; i < KMS_NPROVIDERS; i++)
	{
		if (kms_providers[i]->api_version == KMS_PROVIDER_API_VERSION &&
			strcmp(kms_providers[i]->name, name) == 0)
			return kms_providers[i];
	}
	return NULL;
}

const char *
kms_provider_names(void)
{
	static char names[256];

	if (names[0] == '\0')
	{
		for (size_t i = 0; i < KMS_NPROVIDERS; i++)
		{
			if (i > 0)
				strncat(names, ", ", sizeof(names) - strlen(names) - 1);
			strncat(names, kms_providers[i]->name, sizeof(names) - strlen(names) - 1);
		}
	}
	return names;
}

const char *
kms_status_name(KmsStatus status)
{
	switch (status)
	{
		case KMS_OK:
			return "ok";
		case KMS_ERR_CONFIG:
			return "configuration error";
		case KMS_ERR_CREDENTIALS:
			return "credentials error";
		case KMS_ERR_ACCESS_DENIED:
			return "access denied";
		case KMS_ERR_NOT_FOUND:
			return "key not found";
		case KMS_ERR_DISABLED:
			return "key disabled";
		case KMS_ERR_INVALID_CIPHERTEXT:
			return "invalid wrapped key";
		case KMS_ERR_THROTTLED:
			return "throttled";
		case KMS_ERR_UNAVAILABLE:
			return "unavailable";
		case KMS_ERR_TIMEOUT:
			return "timeout";
		case KMS_ERR_CANCELED:
			return "canceled";
		case KMS_ERR_PROTOCOL:
			return "protocol error";
		case KMS_ERR_INTERNAL:
			return "internal error";
		case KMS_ERR_WRONG_REGION:
			return "master key in another region";
	}
	return "unknown status";
}

KmsStatus
kms_set_error(KmsError *err, KmsStatus status, const char *error_type, const char *fmt,...)
{
	va_list		ap;

	if (err == NULL)
		return status;
	err->status = status;
	snprintf(err->error_type, sizeof(err->error_type), "%s", error_type ? error_type : "");
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
	return status;
}

/* Is `path` inside `dir`?  Both are resolved, so symlinks and ".." do not fool it. */
static bool
path_is_inside(const char *path, const char *dir)
{
	char		real_path[PATH_MAX];
	char		real_dir[PATH_MAX];
	size_t		n;

	if (dir == NULL || dir[0] == '\0')
		return false;
	if (realpath(path, real_path) == NULL || realpath(dir, real_dir) == NULL)
		return false;
	n = strlen(real_dir);
	return strncmp(real_path, real_dir, n) == 0 &&
		(real_path[n] == '/' || real_path[n] == '\0');
}

int
kms_open_secret_file(const char *path, const char *setting, const char *what,
					 const char *data_directory, KmsError *err)
{
	struct stat st;
	int			fd;

	if (path == NULL || path[0] != '/')
	{
		kms_set_error(err, KMS_ERR_CONFIG, NULL, "%s must be an absolute path", setting);
		return -1;
	}
	fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
	{
		kms_set_error(err, KMS_ERR_CONFIG, NULL,
					  "could not open %s \"%s\": %s", what, path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
		kms_set_error(err, KMS_ERR_CONFIG, NULL, "%s \"%s\" is not a regular file", what, path);
	else if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
		kms_set_error(err, KMS_ERR_CONFIG, NULL,
					  "%s \"%s\" is accessible by group or others (mode %04o); it must be 0600 or 0400",
					  what, path, (unsigned int) (st.st_mode & 07777));
	else if (path_is_inside(path, data_directory))
		kms_set_error(err, KMS_ERR_CONFIG, NULL,
					  "%s \"%s\" is inside the data directory; keep it where backups of the data do not reach",
					  what, path);
	else
		return fd;
	close(fd);
	return -1;
}

/* Retries back off from 50 ms, doubling up to 2 s, with full jitter. */
#define KMS_BACKOFF_BASE_MS 50
#define KMS_BACKOFF_CAP_MS 2000
/* How often a sleep looks at the interrupt callback. */
#define KMS_SLEEP_SLICE_MS 10

bool
kms_sleep_interruptible(const KmsConfig *cfg, int ms)
{
	while (ms > 0)
	{
		int			slice = ms < KMS_SLEEP_SLICE_MS ? ms : KMS_SLEEP_SLICE_MS;
		struct timespec ts = {0, (long) slice * 1000000L};

		if (cfg->interrupted && cfg->interrupted())
			return false;
		/* EINTR (a signal, e.g. the cancel itself) just ends the slice early */
		(void) nanosleep(&ts, NULL);
		ms -= slice;
	}
	return !(cfg->interrupted && cfg->interrupted());
}

bool
kms_before_request(const KmsConfig *cfg)
{
	return cfg->await_request_slot == NULL || cfg->await_request_slot(cfg);
}

void
kms_after_answer(const KmsConfig *cfg, bool throttled)
{
	if (cfg->note_answer != NULL)
		cfg->note_answer(throttled);
}

int
kms_backoff_ms(int retry)
{
	long		ceiling = KMS_BACKOFF_BASE_MS;
	uint32_t	r;

	for (int i = 0; i < retry && ceiling < KMS_BACKOFF_CAP_MS; i++)
		ceiling *= 2;
	if (ceiling > KMS_BACKOFF_CAP_MS)
		ceiling = KMS_BACKOFF_CAP_MS;
	if (RAND_bytes((unsigned char *) &r, sizeof(r)) != 1)
		return (int) (ceiling / 2);
	return (int) (r % (uint32_t) (ceiling + 1));
}
