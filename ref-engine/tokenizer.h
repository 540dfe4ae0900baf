/* DeepSeek-V3's tokenizer: byte-level BPE read from a Hugging Face tokenizer.json (DESIGN §5),
 * with the same ids as the HF `tokenizers` library for that file, a decoder that streams whole
 * UTF-8 characters only, and the chat format of DeepSeek-V3.
 *
 * Encoding, in the order `tokenizers` applies it:
 *   1. invalid UTF-8 is replaced first: each maximal ill-formed subpart becomes U+FFFD, exactly
 *      as Python's bytes.decode("utf-8", "replace") and WHATWG's TextDecoder do (HF tokenizers
 *      only takes valid strings, so this is what its callers feed it);
 *   2. added tokens are cut out of the raw text (leftmost, longest; first those with
 *      "normalized": false, then the others in the remaining pieces; the normalizer is empty);
 *   3. each other piece goes through the pre-tokenizer's Split regexes in turn (PCRE2,
 *      UTF+UCP, behaviour Isolated), then the byte-to-unicode map of GPT-2;
 *   4. BPE merges by rank inside each pre-token.
 * Any other tokenizer.json construct (another normalizer, behaviour, model option) is refused.
 */
#ifndef DSV3_TOKENIZER_H
#define DSV3_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

typedef struct dsv3_tokenizer dsv3_tokenizer;

/* Loads DIR/tokenizer.json and DIR/tokenizer_config.json (BOS and EOS tokens, add_bos_token). */
int tokenizer_open(dsv3_tokenizer **out, const char *dir, dsv3_error *err);
void tokenizer_close(dsv3_tokenizer *tok);

/* Number of ids (vocab and added tokens): valid ids are 0 .. n-1. */
int32_t tokenizer_n_ids(const dsv3_tokenizer *tok);
int32_t tokenizer_bos_id(const dsv3_tokenizer *tok);
int32_t tokenizer_eos_id(const dsv3_tokenizer *tok);
/* add_bos_token of tokenizer_config.json (false when absent). */
int tokenizer_adds_bos(const dsv3_tokenizer *tok);

/* Encodes len bytes of text (any bytes; invalid UTF-8 is replaced, see above). With add_bos the
 * BOS id comes first. *ids is malloc'ed (free it); *n_ids its length. */
int tokenizer_encode(const dsv3_tokenizer *tok, const char *text, size_t len, int add_bos, int32_t **ids,
		     size_t *n_ids, dsv3_error *err);

/* The bytes id stands for: the byte map reversed, or an added token's content. NULL when id is
 * out of range. */
const char *tokenizer_id_bytes(const dsv3_tokenizer *tok, int32_t id, size_t *len);

/* Decodes ids into malloc'ed bytes (*out, NUL-terminated, *len without the NUL). The bytes are
 * what the ids stand for, which may not be valid UTF-8; utf8_replace_invalid makes them text.
 * DSV3_EDATA naming the id when one is out of range. */
int tokenizer_decode(const dsv3_tokenizer *tok, const int32_t *ids, size_t n, char **out, size_t *len,
		     dsv3_error *err);

/* Returns a malloc'ed, NUL-terminated copy of in with every maximal ill-formed UTF-8 subpart
 * replaced by U+FFFD (Unicode §3.9 "substitution of maximal subparts", as Python's "replace"
 * and TextDecoder); *out_len its length. NULL when out of memory. */
char *utf8_replace_invalid(const char *in, size_t len, size_t *out_len);

/* Streaming decoder: push ids one by one, get text that always ends on a whole UTF-8 character.
 * An incomplete trailing sequence is held back until the next id completes it; a sequence that
 * can never complete comes out as U+FFFD. The concatenated output equals
 * utf8_replace_invalid(tokenizer_decode(all ids)). */
typedef struct {
	unsigned char held[4];
	size_t n_held;
} tokenizer_stream;

/* Appends the text that id completes to *buf (malloc'ed/realloc'ed, NUL-terminated; *len and
 * *cap track it). DSV3_EDATA when id is out of range. */
int tokenizer_stream_push(const dsv3_tokenizer *tok, tokenizer_stream *st, int32_t id, char **buf, size_t *len,
			  size_t *cap, dsv3_error *err);
/* Ends the stream: a held incomplete sequence comes out as U+FFFD. */
int tokenizer_stream_finish(tokenizer_stream *st, char **buf, size_t *len, size_t *cap, dsv3_error *err);

/* DeepSeek-V3's chat format (its chat_template without tools):
 *   <｜begin▁of▁sentence｜>{system prompts joined by "\n\n"}
 *   then per turn <｜User｜>{u} or <｜Assistant｜>{a}<｜end▁of▁sentence｜>,
 *   and <｜Assistant｜> at the end, where the model's answer starts. */
enum chat_role { CHAT_SYSTEM, CHAT_USER, CHAT_ASSISTANT };
typedef struct {
	enum chat_role role;
	const char *content;
} chat_turn;

/* Returns the malloc'ed prompt text for turns, or NULL when out of memory. The text already
 * starts with the BOS token: encode it with add_bos 0. */
char *chat_format_prompt(const chat_turn *turns, size_t n);

#endif
