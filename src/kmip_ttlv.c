/*
 * kmip_ttlv.c — KMIP TTLV writer and checked reader (see kmip_ttlv.h).
 *
 * Plain C: no postgres.h, no allocation.  The reader never trusts a length: ttlv_parse
 * walks the whole message once, bounds-checking every item against its parent, before
 * any accessor runs, so the accessors only do arithmetic on checked data.
 */
#include <string.h>

#include "kmip_ttlv.h"

static size_t
padded(size_t len)
{
	return (len + 7) & ~(size_t) 7;
}

static void
put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t) (v >> 24);
	p[1] = (uint8_t) (v >> 16);
	p[2] = (uint8_t) (v >> 8);
	p[3] = (uint8_t) v;
}

static uint32_t
get_u32(const uint8_t *p)
{
	return (uint32_t) p[0] << 24 | (uint32_t) p[1] << 16 | (uint32_t) p[2] << 8 | p[3];
}

static void
put_u64(uint8_t *p, uint64_t v)
{
	put_u32(p, (uint32_t) (v >> 32));
	put_u32(p + 4, (uint32_t) v);
}

static uint64_t
get_u64(const uint8_t *p)
{
	return (uint64_t) get_u32(p) << 32 | get_u32(p + 4);
}

/* ---------------------------------------------------------------------------
 * Writer
 */

void
ttlv_writer_init(TtlvWriter *w, uint8_t *buf, size_t cap)
{
	memset(w, 0, sizeof(*w));
	w->buf = buf;
	w->cap = cap;
}

/* Reserve header + padded value; returns the value's start, or NULL on overflow. */
static uint8_t *
put_header(TtlvWriter *w, uint32_t tag, TtlvType type, size_t len)
{
	size_t		need = TTLV_HEADER_LEN + padded(len);
	uint8_t    *p;

	if (w->overflow || len > UINT32_MAX || need > w->cap - w->len)
	{
		w->overflow = true;
		return NULL;
	}
	p = w->buf + w->len;
	p[0] = (uint8_t) (tag >> 16);
	p[1] = (uint8_t) (tag >> 8);
	p[2] = (uint8_t) tag;
	p[3] = (uint8_t) type;
	put_u32(p + 4, (uint32_t) len);
	memset(p + TTLV_HEADER_LEN, 0, padded(len));
	w->len += need;
	return p + TTLV_HEADER_LEN;
}

void
ttlv_begin_struct(TtlvWriter *w, uint32_t tag)
{
	if (w->depth >= TTLV_MAX_DEPTH)
	{
		w->overflow = true;
		return;
	}
	if (put_header(w, tag, TTLV_STRUCTURE, 0) == NULL)
		return;
	w->open[w->depth++] = w->len - TTLV_HEADER_LEN;
}

void
ttlv_end_struct(TtlvWriter *w)
{
	size_t		start;

	if (w->overflow || w->depth == 0)
	{
		w->overflow = true;
		return;
	}
	start = w->open[--w->depth];
	put_u32(w->buf + start + 4, (uint32_t) (w->len - start - TTLV_HEADER_LEN));
}

void
ttlv_put_integer(TtlvWriter *w, uint32_t tag, int32_t v)
{
	uint8_t    *p = put_header(w, tag, TTLV_INTEGER, 4);

	if (p)
		put_u32(p, (uint32_t) v);
}

void
ttlv_put_long(TtlvWriter *w, uint32_t tag, int64_t v)
{
	uint8_t    *p = put_header(w, tag, TTLV_LONG_INTEGER, 8);

	if (p)
		put_u64(p, (uint64_t) v);
}

void
ttlv_put_enum(TtlvWriter *w, uint32_t tag, uint32_t v)
{
	uint8_t    *p = put_header(w, tag, TTLV_ENUMERATION, 4);

	if (p)
		put_u32(p, v);
}

void
ttlv_put_bool(TtlvWriter *w, uint32_t tag, bool v)
{
	uint8_t    *p = put_header(w, tag, TTLV_BOOLEAN, 8);

	if (p)
		put_u64(p, v ? 1 : 0);
}

void
ttlv_put_text(TtlvWriter *w, uint32_t tag, const char *s, size_t len)
{
	uint8_t    *p = put_header(w, tag, TTLV_TEXT_STRING, len);

	if (p && len > 0)
		memcpy(p, s, len);
}

void
ttlv_put_bytes(TtlvWriter *w, uint32_t tag, const uint8_t *b, size_t len)
{
	uint8_t    *p = put_header(w, tag, TTLV_BYTE_STRING, len);

	if (p && len > 0)
		memcpy(p, b, len);
}

void
ttlv_put_datetime(TtlvWriter *w, uint32_t tag, int64_t seconds)
{
	uint8_t    *p = put_header(w, tag, TTLV_DATE_TIME, 8);

	if (p)
		put_u64(p, (uint64_t) seconds);
}

void
ttlv_put_interval(TtlvWriter *w, uint32_t tag, uint32_t seconds)
{
	uint8_t    *p = put_header(w, tag, TTLV_INTERVAL, 4);

	if (p)
		put_u32(p, seconds);
}

void
ttlv_put_big_integer(TtlvWriter *w, uint32_t tag, const uint8_t *b, size_t len)
{
	uint8_t    *p;

	if (len == 0 || len % 8 != 0)
	{
		w->overflow = true;
		return;
	}
	p = put_header(w, tag, TTLV_BIG_INTEGER, len);
	if (p)
		memcpy(p, b, len);
}

bool
ttlv_writer_finish(const TtlvWriter *w, size_t *len)
{
	if (w->overflow || w->depth != 0)
		return false;
	*len = w->len;
	return true;
}

/* ---------------------------------------------------------------------------
 * Reader
 */

/* Is `len` a valid value length for `type`?  Structures are checked by walking them. */
static TtlvStatus
check_length(uint8_t type, uint32_t len)
{
	switch (type)
	{
		case TTLV_STRUCTURE:
			return len % 8 == 0 ? TTLV_OK : TTLV_ERR_LENGTH;
		case TTLV_INTEGER:
		case TTLV_ENUMERATION:
		case TTLV_INTERVAL:
			return len == 4 ? TTLV_OK : TTLV_ERR_LENGTH;
		case TTLV_LONG_INTEGER:
		case TTLV_BOOLEAN:
		case TTLV_DATE_TIME:
			return len == 8 ? TTLV_OK : TTLV_ERR_LENGTH;
		case TTLV_BIG_INTEGER:
			return len > 0 && len % 8 == 0 ? TTLV_OK : TTLV_ERR_LENGTH;
		case TTLV_TEXT_STRING:
		case TTLV_BYTE_STRING:
			return TTLV_OK;
		default:
			return TTLV_ERR_TYPE;
	}
}

/* Read the header at buf[0..avail) into *it; *size receives header + padded value. */
static TtlvStatus
read_item(const uint8_t *buf, size_t avail, TtlvItem *it, size_t *size)
{
	TtlvStatus	st;

	if (avail < TTLV_HEADER_LEN)
		return TTLV_ERR_TRUNCATED;
	it->tag = (uint32_t) buf[0] << 16 | (uint32_t) buf[1] << 8 | buf[2];
	it->type = buf[3];
	it->length = get_u32(buf + 4);
	it->value = buf + TTLV_HEADER_LEN;
	st = check_length(it->type, it->length);
	if (st != TTLV_OK)
		return st;
	/* compare without adding to a possibly huge length */
	if (padded((size_t) it->length) > avail - TTLV_HEADER_LEN)
		return TTLV_ERR_TRUNCATED;
	if (it->type == TTLV_BOOLEAN && get_u64(it->value) > 1)
		return TTLV_ERR_VALUE;
	*size = TTLV_HEADER_LEN + padded(it->length);
	return TTLV_OK;
}

static TtlvStatus
check_tree(const TtlvItem *it, int depth)
{
	size_t		pos = 0;

	if (it->type != TTLV_STRUCTURE)
		return TTLV_OK;
	if (depth >= TTLV_MAX_DEPTH)
		return TTLV_ERR_DEPTH;
	while (pos < it->length)
	{
		TtlvItem	child;
		size_t		size;
		TtlvStatus	st = read_item(it->value + pos, it->length - pos, &child, &size);

		if (st == TTLV_ERR_TRUNCATED)
			return TTLV_ERR_STRUCTURE;	/* a child runs past its parent's end */
		if (st != TTLV_OK)
			return st;
		st = check_tree(&child, depth + 1);
		if (st != TTLV_OK)
			return st;
		pos += size;
	}
	return TTLV_OK;
}

TtlvStatus
ttlv_parse(const uint8_t *buf, size_t len, TtlvItem *top)
{
	size_t		size;
	TtlvStatus	st = read_item(buf, len, top, &size);

	if (st != TTLV_OK)
		return st;
	if (size != len)
		return TTLV_ERR_TRAILING;
	return check_tree(top, 0);
}

size_t
ttlv_message_size(const uint8_t header[TTLV_HEADER_LEN])
{
	uint32_t	len = get_u32(header + 4);

	if (check_length(header[3], len) != TTLV_OK)
		return 0;
	return TTLV_HEADER_LEN + padded(len);
}

bool
ttlv_next_child(const TtlvItem *parent, size_t *pos, TtlvItem *child)
{
	size_t		size;

	if (parent->type != TTLV_STRUCTURE || *pos >= parent->length)
		return false;
	if (read_item(parent->value + *pos, parent->length - *pos, child, &size) != TTLV_OK)
		return false;			/* cannot happen after ttlv_parse */
	*pos += size;
	return true;
}

bool
ttlv_find(const TtlvItem *parent, uint32_t tag, TtlvItem *child)
{
	size_t		pos = 0;

	while (ttlv_next_child(parent, &pos, child))
		if (child->tag == tag)
			return true;
	return false;
}

bool
ttlv_get_integer(const TtlvItem *it, int32_t *v)
{
	if (it->type != TTLV_INTEGER)
		return false;
	*v = (int32_t) get_u32(it->value);
	return true;
}

bool
ttlv_get_long(const TtlvItem *it, int64_t *v)
{
	if (it->type != TTLV_LONG_INTEGER)
		return false;
	*v = (int64_t) get_u64(it->value);
	return true;
}

bool
ttlv_get_enum(const TtlvItem *it, uint32_t *v)
{
	if (it->type != TTLV_ENUMERATION)
		return false;
	*v = get_u32(it->value);
	return true;
}

bool
ttlv_get_bool(const TtlvItem *it, bool *v)
{
	if (it->type != TTLV_BOOLEAN)
		return false;
	*v = get_u64(it->value) != 0;
	return true;
}

bool
ttlv_get_datetime(const TtlvItem *it, int64_t *v)
{
	if (it->type != TTLV_DATE_TIME)
		return false;
	*v = (int64_t) get_u64(it->value);
	return true;
}

bool
ttlv_get_interval(const TtlvItem *it, uint32_t *v)
{
	if (it->type != TTLV_INTERVAL)
		return false;
	*v = get_u32(it->value);
	return true;
}

bool
ttlv_get_text(const TtlvItem *it, const char **s, size_t *len)
{
	if (it->type != TTLV_TEXT_STRING)
		return false;
	*s = (const char *) it->value;
	*len = it->length;
	return true;
}

bool
ttlv_get_bytes(const TtlvItem *it, const uint8_t **b, size_t *len)
{
	if (it->type != TTLV_BYTE_STRING)
		return false;
	*b = it->value;
	*len = it->length;
	return true;
}

const char *
ttlv_status_message(TtlvStatus status)
{
	switch (status)
	{
		case TTLV_OK:
			return "well-formed";
		case TTLV_ERR_TRUNCATED:
			return "message shorter than its length fields";
		case TTLV_ERR_TRAILING:
			return "bytes after the end of the message";
		case TTLV_ERR_TYPE:
			return "unknown item type";
		case TTLV_ERR_LENGTH:
			return "item length wrong for its type";
		case TTLV_ERR_STRUCTURE:
			return "structure not filled exactly by its items";
		case TTLV_ERR_DEPTH:
			return "structures nested too deeply";
		case TTLV_ERR_VALUE:
			return "boolean neither 0 nor 1";
	}
	return "unknown TTLV status";
}
