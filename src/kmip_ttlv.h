/*
 * kmip_ttlv.h — KMIP's Tag-Type-Length-Value encoding, in plain C.
 *
 * Every KMIP 1.x message is one TTLV item (KMIP Specification 1.0–1.4, section 9.1):
 *
 *     tag (3 bytes, big-endian) | type (1 byte) | length (4 bytes, big-endian) | value
 *
 * and the value is padded with zero bytes to a multiple of 8.  Integers, enumerations
 * and intervals are 4 bytes (then 4 of padding), long integers, date-times and
 * booleans 8, big integers a multiple of 8; text and byte strings any length, padded.
 * A structure's value is a sequence of whole items whose padded sizes add up to its
 * length exactly.
 *
 * Writer: builds into a caller's fixed buffer (no allocation, so the caller can wipe
 * every byte it wrote); structures are opened and closed, their lengths patched on
 * close.  A write that does not fit sets `overflow` and writes nothing more, so a
 * caller checks once at the end.
 *
 * Reader: ttlv_parse checks a whole message before anything reads it — every length
 * within its parent, every type known, fixed-size types at their size, booleans 0 or 1,
 * structures filled exactly, nesting at most TTLV_MAX_DEPTH — so the accessors below
 * walk memory that is known to be well-formed.  Items point into the caller's buffer.
 */
#ifndef PG_ENVELOPE_KMIP_TTLV_H
#define PG_ENVELOPE_KMIP_TTLV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TTLV_HEADER_LEN 8
#define TTLV_MAX_DEPTH 16		/* a KMIP 1.x response nests at most about 6 deep */

typedef enum TtlvType
{
	TTLV_STRUCTURE = 0x01,
	TTLV_INTEGER = 0x02,
	TTLV_LONG_INTEGER = 0x03,
	TTLV_BIG_INTEGER = 0x04,
	TTLV_ENUMERATION = 0x05,
	TTLV_BOOLEAN = 0x06,
	TTLV_TEXT_STRING = 0x07,
	TTLV_BYTE_STRING = 0x08,
	TTLV_DATE_TIME = 0x09,
	TTLV_INTERVAL = 0x0A
} TtlvType;

typedef enum TtlvStatus
{
	TTLV_OK = 0,
	TTLV_ERR_TRUNCATED,			/* fewer bytes than a header or a (padded) length says */
	TTLV_ERR_TRAILING,			/* bytes left after the outermost item */
	TTLV_ERR_TYPE,				/* unknown type byte */
	TTLV_ERR_LENGTH,			/* length wrong for the type (e.g. an integer of 5 bytes) */
	TTLV_ERR_STRUCTURE,			/* children do not fill their structure exactly */
	TTLV_ERR_DEPTH,				/* nested deeper than TTLV_MAX_DEPTH */
	TTLV_ERR_VALUE				/* a boolean that is neither 0 nor 1 */
} TtlvStatus;

/* One item: points into the buffer it was read from. */
typedef struct TtlvItem
{
	uint32_t	tag;			/* 24 bits, e.g. 0x420078 */
	uint8_t		type;			/* TtlvType */
	uint32_t	length;			/* of the value, unpadded */
	const uint8_t *value;
} TtlvItem;

/* ---- writer ---- */

typedef struct TtlvWriter
{
	uint8_t    *buf;
	size_t		cap;
	size_t		len;
	bool		overflow;
	int			depth;
	size_t		open[TTLV_MAX_DEPTH];	/* offsets of the open structures' headers */
} TtlvWriter;

/* Start writing into buf[0..cap). */
extern void ttlv_writer_init(TtlvWriter *w, uint8_t *buf, size_t cap);

/* Open a structure; every item written until ttlv_end_struct goes inside it. */
extern void ttlv_begin_struct(TtlvWriter *w, uint32_t tag);
extern void ttlv_end_struct(TtlvWriter *w);

extern void ttlv_put_integer(TtlvWriter *w, uint32_t tag, int32_t v);
extern void ttlv_put_long(TtlvWriter *w, uint32_t tag, int64_t v);
extern void ttlv_put_enum(TtlvWriter *w, uint32_t tag, uint32_t v);
extern void ttlv_put_bool(TtlvWriter *w, uint32_t tag, bool v);
extern void ttlv_put_text(TtlvWriter *w, uint32_t tag, const char *s, size_t len);
extern void ttlv_put_bytes(TtlvWriter *w, uint32_t tag, const uint8_t *b, size_t len);
extern void ttlv_put_datetime(TtlvWriter *w, uint32_t tag, int64_t seconds);
extern void ttlv_put_interval(TtlvWriter *w, uint32_t tag, uint32_t seconds);
/* Big integer: `len` must be a multiple of 8 (two's complement, big-endian). */
extern void ttlv_put_big_integer(TtlvWriter *w, uint32_t tag, const uint8_t *b, size_t len);

/* True when everything fit and every structure was closed; *len receives the size. */
extern bool ttlv_writer_finish(const TtlvWriter *w, size_t *len);

/* ---- reader ---- */

/*
 * Check that buf[0..len) is exactly one well-formed item (recursively) and return it.
 * Nothing else here may be called on a buffer that did not pass.
 */
extern TtlvStatus ttlv_parse(const uint8_t *buf, size_t len, TtlvItem *top);

/*
 * The total length a message announces in its first 8 bytes (header plus padded
 * value), so a reader knows how much more to receive; 0 if the header is impossible
 * (unknown type, or a length the type forbids).
 */
extern size_t ttlv_message_size(const uint8_t header[TTLV_HEADER_LEN]);

/*
 * Children of a structure, in order: start with *pos = 0; returns false after the last.
 * `parent` must have passed ttlv_parse (directly or as a descendant).
 */
extern bool ttlv_next_child(const TtlvItem *parent, size_t *pos, TtlvItem *child);

/* The first child with `tag`, or false. */
extern bool ttlv_find(const TtlvItem *parent, uint32_t tag, TtlvItem *child);

/* Typed reads: false when the item is not of that type. */
extern bool ttlv_get_integer(const TtlvItem *it, int32_t *v);
extern bool ttlv_get_long(const TtlvItem *it, int64_t *v);
extern bool ttlv_get_enum(const TtlvItem *it, uint32_t *v);
extern bool ttlv_get_bool(const TtlvItem *it, bool *v);
extern bool ttlv_get_datetime(const TtlvItem *it, int64_t *v);
extern bool ttlv_get_interval(const TtlvItem *it, uint32_t *v);
/* Text and byte strings point into the message (text is not NUL-terminated). */
extern bool ttlv_get_text(const TtlvItem *it, const char **s, size_t *len);
extern bool ttlv_get_bytes(const TtlvItem *it, const uint8_t **b, size_t *len);

extern const char *ttlv_status_message(TtlvStatus status);

#endif							/* PG_ENVELOPE_KMIP_TTLV_H */
