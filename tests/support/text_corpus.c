#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "text_corpus.h"

size_t utf8_put(char *o, uint32_t cp)
{
	if (cp < 0x80)
		return o[0] = (char)cp, 1;
	if (cp < 0x800)
		return o[0] = (char)(0xC0 | cp >> 6), o[1] = (char)(0x80 | (cp & 0x3F)), 2;
	if (cp < 0x10000)
		return o[0] = (char)(0xE0 | cp >> 12), o[1] = (char)(0x80 | (cp >> 6 & 0x3F)),
		       o[2] = (char)(0x80 | (cp & 0x3F)), 3;
	return o[0] = (char)(0xF0 | cp >> 18), o[1] = (char)(0x80 | (cp >> 12 & 0x3F)),
	       o[2] = (char)(0x80 | (cp >> 6 & 0x3F)), o[3] = (char)(0x80 | (cp & 0x3F)), 4;
}

/* The corpus escapes (see corpus.txt): \n \r \t \\ \u{HEX}; any other stays as written. */
text_case corpus_unescape(const char *s, size_t n)
{
	text_case c = { malloc(n + 1), 0 };
	assert_non_null(c.text);
	for (size_t i = 0; i < n; i++) {
		char e = i + 1 < n ? s[i + 1] : 0;
		if (s[i] != '\\' || !e) {
			c.text[c.len++] = s[i];
		} else if (e == 'u' && i + 2 < n && s[i + 2] == '{') {
			char *end;
			c.len += utf8_put(c.text + c.len, (uint32_t)strtoul(s + i + 3, &end, 16));
			i = (size_t)(end - s);
		} else if (strchr("nrt\\", e)) {
			c.text[c.len++] = e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : '\\';
			i++;
		} else {
			c.text[c.len++] = s[i];
		}
	}
	c.text[c.len] = 0;
	return c;
}
