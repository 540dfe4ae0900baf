/* Python's json module with indent=2: items separated by ",\n" plus indentation, key separator
 * ": ", an empty dict as "{}", and ensure_ascii escaping: '"' and '\\' backslashed, \b \f \n \r
 * \t by name, every other byte outside ' '..'~' as \u00XX, non-ASCII code points as \uXXXX in
 * lowercase hex (UTF-16 surrogate pairs above U+FFFF). */
#include "py_json.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
	char *s;
	size_t len, cap;
	int failed;
} text_buf;

static void put(text_buf *b, const char *s, size_t n)
{
	if (b->failed)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *p = realloc(b->s, cap);
		if (!p) {
			b->failed = 1;
			return;
		}
		b->s = p;
		b->cap = cap;
	}
	memcpy(b->s + b->len, s, n);
	b->len += n;
	b->s[b->len] = '\0';
}

static void puts_(text_buf *b, const char *s)
{
	put(b, s, strlen(s));
}

static void put_u16(text_buf *b, unsigned v)
{
	char e[8];
	snprintf(e, sizeof e, "\\u%04x", v & 0xffffu);
	put(b, e, 6);
}

/* Decodes one UTF-8 sequence at s; returns its length, 0 if invalid (overlong, surrogate,
 * out of range or truncated). */
static size_t utf8_decode(const unsigned char *s, uint32_t *cp)
{
	size_t n;
	uint32_t v, min;
	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	} else if ((s[0] & 0xe0) == 0xc0) {
		n = 2, v = s[0] & 0x1f, min = 0x80;
	} else if ((s[0] & 0xf0) == 0xe0) {
		n = 3, v = s[0] & 0x0f, min = 0x800;
	} else if ((s[0] & 0xf8) == 0xf0) {
		n = 4, v = s[0] & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		v = (v << 6) | (s[i] & 0x3f);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	*cp = v;
	return n;
}

static int put_string(text_buf *b, const char *str)
{
	const unsigned char *s = (const unsigned char *)str;
	put(b, "\"", 1);
	while (*s) {
		uint32_t cp;
		size_t n = utf8_decode(s, &cp);
		if (!n)
			return -1;
		s += n;
		switch (cp) {
		case '"': puts_(b, "\\\""); continue;
		case '\\': puts_(b, "\\\\"); continue;
		case '\b': puts_(b, "\\b"); continue;
		case '\f': puts_(b, "\\f"); continue;
		case '\n': puts_(b, "\\n"); continue;
		case '\r': puts_(b, "\\r"); continue;
		case '\t': puts_(b, "\\t"); continue;
		}
		if (cp >= 0x20 && cp <= 0x7e) {
			char c = (char)cp;
			put(b, &c, 1);
		} else if (cp < 0x10000) {
			put_u16(b, cp);
		} else {
			cp -= 0x10000;
			put_u16(b, 0xd800 | (cp >> 10));
			put_u16(b, 0xdc00 | (cp & 0x3ff));
		}
	}
	put(b, "\"", 1);
	return 0;
}

int py_json_index(char *const *tensors, char *const *files, size_t n, const uint64_t *total_size,
		  char **out, size_t *len)
{
	text_buf b = {0};
	if (total_size) {
		char meta[96];
		snprintf(meta, sizeof meta, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n",
			 (unsigned long long)*total_size);
		puts_(&b, meta);
	} else {
		puts_(&b, "{\n  \"metadata\": {},\n");
	}
	puts_(&b, "  \"weight_map\": ");
	if (!n)
		puts_(&b, "{}");
	else
		puts_(&b, "{\n");
	for (size_t i = 0; i < n; i++) {
		puts_(&b, "    ");
		if (put_string(&b, tensors[i]))
			goto bad;
		puts_(&b, ": ");
		if (put_string(&b, files[i]))
			goto bad;
		puts_(&b, i + 1 < n ? ",\n" : "\n  }");
	}
	puts_(&b, "\n}");
	if (b.failed)
		goto bad;
	*out = b.s;
	*len = b.len;
	return 0;
bad:
	free(b.s);
	return -1;
}
