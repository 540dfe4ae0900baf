/* The tokenizer corpus format shared by the tokenizer tests (and tests/tokenizer_ref.mjs,
 * golden/make_tokenizer_ids.py): one case per line, escapes \n \r \t \\ \u{HEX}. */
#ifndef DSV3_TEXT_CORPUS_H
#define DSV3_TEXT_CORPUS_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
	char *text; /* malloc'd, NUL-terminated */
	size_t len;
} text_case;

/* Writes code point cp as UTF-8 into o (room for 4 bytes); returns the byte count. */
size_t utf8_put(char *o, uint32_t cp);
/* The case a corpus line of n bytes stands for; an unknown escape stays as written. */
text_case corpus_unescape(const char *s, size_t n);

#endif
