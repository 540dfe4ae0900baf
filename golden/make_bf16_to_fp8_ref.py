#!/usr/bin/env python3
"""Reference for dsv3-bf16-to-fp8 (issue 7 §4), independent of the C code.

  make_bf16_to_fp8_ref.py build  [--dir golden/bf16_to_fp8]
      Writes the small BF16 input checkpoint golden/bf16_to_fp8/input/ (two safetensors files,
      model.safetensors.index.json, config.json, generation_config.json). The values are bit
      patterns from a seeded splitmix64 (pure Python, so the committed input is the same on
      every machine), with the edge blocks the quantiser must get right: partial blocks
      ([300, 200], [130, 64], [64, 129], [5, 3]), an all-zero block, a block with one huge
      outlier, a block of values far below the 1e-4 floor (E4M3 subnormals), a block whose every
      value equals its amax (x / s lands on 448), negative zeros, and tensors that must stay BF16
      (embedding, lm_head, norms, mlp.gate, a bias, an MTP eh_proj).

  make_bf16_to_fp8_ref.py expect [--dir golden/bf16_to_fp8] [--no-torch]
      Quantises that input as issue 7 §4 defines it and writes expected.sha256: one line per
      output tensor and scale format, "SHA256  FMT  NAME  DTYPE  SHAPE" (FMT default or ue8m0;
      SHAPE like 3x2; SHA-256 of the tensor's row-major little-endian bytes). By default in
      PyTorch (safetensors.torch.load_file; torch's float8_e4m3fn conversion rounds to nearest
      even); with --no-torch in plain Python (exact integer/float reasoning, no numpy), for a
      provisional file on a machine without torch. With torch it also runs the plain-Python
      version and exits 1, naming each tensor, where the two disagree (the torch file is
      written either way). tests/test_bf16_to_fp8.c fails if the C tool disagrees with the
      committed file.

Per 128x128 block: amax = max |x| (float32 of the BF16 value), s = max(amax, float32(1e-4)) / 448
in float32 (ue8m0: the smallest power of two >= s, via frexp/ldexp), q = e4m3(float32(x) / s).
"""
import argparse
import hashlib
import json
import math
import os
import struct
import sys

BLOCK = 128
MASK64 = (1 << 64) - 1


# ---- the input ----

class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def bf16_bits(rng, exp_lo, exp_hi):
    """A random BF16 with biased exponent in [exp_lo, exp_hi], random sign and mantissa."""
    r = rng.next()
    sign = r & 1
    exp = exp_lo + (r >> 1) % (exp_hi - exp_lo + 1)
    mant = (r >> 16) & 0x7F
    return (sign << 15) | (exp << 7) | mant


def make_tensor(seed, rows, cols, exp_lo=118, exp_hi=127, edits=None):
    """rows x cols BF16 bit patterns (a flat list); edits(r, c, bits) may replace each."""
    rng = SplitMix64(seed)
    out = []
    for r in range(rows):
        for c in range(cols):
            b = bf16_bits(rng, exp_lo, exp_hi)
            if edits:
                b = edits(r, c, b)
            out.append(b)
    return out


def q_a_edits(r, c, b):
    if r < 128 and 128 <= c < 200:
        return 0x8000 if (r + c) % 7 == 0 else 0       # all-zero block (some -0)
    if 128 <= r < 256 and c < 128:
        if (r, c) == (200, 77):
            return 0x46EA                                # 30000: one huge outlier
        return b
    if r >= 256 and c < 128:
        return (b & 0x807F) | (100 << 7)                 # ~2^-27: far below the 1e-4 floor
    if r >= 256 and c >= 128:
        return 0x3FC0 if (r + c) % 2 else 0xBFC0        # +-1.5: every value is the amax
    return b


def input_tensors():
    """(file, name, shape, bits) of the input checkpoint."""
    t = []
    f1, f2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    t.append((f1, "model.embed_tokens.weight", [64, 32], make_tensor(1, 64, 32)))
    t.append((f1, "model.layers.0.input_layernorm.weight", [32], make_tensor(2, 1, 32)))
    t.append((f1, "model.layers.0.self_attn.q_a_proj.weight", [300, 200],
              make_tensor(3, 300, 200, 110, 127, q_a_edits)))
    t.append((f1, "model.layers.0.self_attn.kv_b_proj.weight", [128, 128],
              make_tensor(4, 128, 128, 100, 135)))
    t.append((f1, "model.layers.0.self_attn.o_proj.weight", [64, 300], make_tensor(5, 64, 300)))
    t.append((f1, "model.layers.0.mlp.gate.weight", [8, 64], make_tensor(6, 8, 64)))
    t.append((f2, "model.layers.0.mlp.experts.0.gate_proj.weight", [130, 64],
              make_tensor(7, 130, 64, 90, 140)))
    t.append((f2, "model.layers.0.mlp.experts.0.gate_proj.bias", [130], make_tensor(8, 1, 130)))
    t.append((f2, "model.layers.0.mlp.shared_experts.down_proj.weight", [64, 129],
              make_tensor(9, 64, 129)))
    t.append((f2, "model.layers.1.eh_proj.weight", [32, 64], make_tensor(10, 32, 64)))
    t.append((f2, "model.layers.1.mlp.up_proj.weight", [5, 3], make_tensor(11, 5, 3, 60, 127)))
    t.append((f2, "model.norm.weight", [32], make_tensor(12, 1, 32)))
    t.append((f2, "lm_head.weight", [64, 32], make_tensor(13, 64, 32)))
    return t


def write_safetensors(path, tensors):
    """tensors: [(name, shape, bits)], all BF16, laid out by name as the reference writer."""
    header, data, off = {}, bytearray(), 0
    for name, shape, bits in sorted(tensors, key=lambda x: x[0]):
        raw = struct.pack("<%dH" % len(bits), *bits)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def build(d):
    inp = os.path.join(d, "input")
    os.makedirs(inp, exist_ok=True)
    tensors = input_tensors()
    files = sorted({f for f, _, _, _ in tensors})
    for fname in files:
        write_safetensors(os.path.join(inp, fname),
                          [(n, s, b) for f, n, s, b in tensors if f == fname])
    total = sum(2 * len(b) for _, _, _, b in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, n, _, _ in tensors}}
    with open(os.path.join(inp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    config = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 32,
              "model_type": "deepseek_v3", "num_hidden_layers": 1, "rms_norm_eps": 1e-06,
              "torch_dtype": "bfloat16", "vocab_size": 64}
    with open(os.path.join(inp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(inp, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.6}, f, indent=2)


# ---- which tensors, shared by both quantisers ----

def quantisable(name):
    """DeepSeek's FP8 set: model.layers.*.X_proj.weight, X_proj not eh_proj."""
    if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
        return False
    return name.split(".")[-2] != "eh_proj"


# ---- plain Python ----

def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]   # round to nearest even float32


def bf16_value(bits):
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def e4m3_code(v):
    """E4M3 (fn) of a float32 value, round to nearest even; |v| < 464 here by construction."""
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    assert a < 464.0, v
    if a >= 2.0 ** -6:
        m, e = math.frexp(a)           # a = m * 2^e, m in [0.5, 1): 16m is the mantissa in 1/8s
        n, ue = round(m * 16), e - 1   # round(): exact, ties to even
        if n == 16:
            n, ue = 8, ue + 1
        if ue > 8 or (ue == 8 and n > 14):
            return sign | 0x7E
        return sign | ((ue + 7) << 3) | (n - 8)
    return sign | round(a * 512)       # subnormals: steps of 2^-9 (code 8 is 2^-6)


def block_scale(amax, ue8m0):
    s = f32(max(amax, f32(1e-4)) / 448.0)
    if ue8m0:
        m, e = math.frexp(s)
        s = s if m == 0.5 else math.ldexp(1.0, e)
    return s


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        out[name] = (h["dtype"], h["shape"], raw[8 + n + a:8 + n + b])
    return out


def quantise_py(shape, raw, ue8m0):
    rows, cols = shape
    x = [bf16_value(b) for b in struct.unpack("<%dH" % (rows * cols), raw)]
    sr, sc = -(-rows // BLOCK), -(-cols // BLOCK)
    amax = [0.0] * (sr * sc)
    for r in range(rows):
        for c in range(cols):
            k = (r // BLOCK) * sc + c // BLOCK
            amax[k] = max(amax[k], abs(x[r * cols + c]))
    s = [block_scale(a, ue8m0) for a in amax]
    q = bytes(e4m3_code(f32(x[r * cols + c] / s[(r // BLOCK) * sc + c // BLOCK]))
              for r in range(rows) for c in range(cols))
    return q, struct.pack("<%df" % len(s), *s), [sr, sc]


def outputs_py(inp, ue8m0):
    """(name, dtype, shape, bytes) of every output tensor."""
    out = []
    for fname in sorted(os.listdir(inp)):
        if not fname.endswith(".safetensors"):
            continue
        for name, (dtype, shape, raw) in read_safetensors(os.path.join(inp, fname)).items():
            if quantisable(name):
                q, s, sshape = quantise_py(shape, raw, ue8m0)
                out.append((name, "F8_E4M3", shape, q))
                out.append((name + "_scale_inv", "F32", sshape, s))
            else:
                out.append((name, dtype, shape, raw))
    return out


# ---- PyTorch ----

def outputs_torch(inp, ue8m0):
    import torch
    from safetensors.torch import load_file

    def raw(t):
        return bytes(t.contiguous().view(torch.uint8).flatten().tolist())

    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    out = []
    for fname in sorted(os.listdir(inp)):
        if not fname.endswith(".safetensors"):
            continue
        for name, t in load_file(os.path.join(inp, fname), device="cpu").items():
            if not quantisable(name):
                out.append((name, names[t.dtype], list(t.shape), raw(t)))
                continue
            rows, cols = t.shape
            sr, sc = -(-rows // BLOCK), -(-cols // BLOCK)
            x = t.float()
            padded = torch.zeros(sr * BLOCK, sc * BLOCK, dtype=torch.float32)
            padded[:rows, :cols] = x.abs()
            amax = padded.view(sr, BLOCK, sc, BLOCK).amax(dim=(1, 3))
            s = torch.clamp(amax, min=1e-4) / 448.0
            if ue8m0:
                m, e = torch.frexp(s)             # s = m * 2^e, m in [0.5, 1)
                k = torch.where(m == 0.5, e - 1, e).to(torch.int32)
                s = ((k + 127) << 23).view(torch.float32)  # 2^k from its bits: exact
            full = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
            q = (x / full).to(torch.float8_e4m3fn)
            out.append((name, "F8_E4M3", [rows, cols], raw(q)))
            out.append((name + "_scale_inv", "F32", [sr, sc], raw(s.contiguous())))
    return out


def expect(d, no_torch):
    """Writes expected.sha256; with torch, also says where plain Python disagrees (exit 1)."""
    inp = os.path.join(d, "input")
    lines, disagree = [], 0
    for fmt, ue8m0 in (("default", False), ("ue8m0", True)):
        outs = outputs_py(inp, ue8m0) if no_torch else outputs_torch(inp, ue8m0)
        if not no_torch:
            for a, b in zip(sorted(outs), sorted(outputs_py(inp, ue8m0))):
                if a != b:
                    print("%s: %s: torch and plain Python differ" % (fmt, a[0]), file=sys.stderr)
                    disagree += 1
        for name, dtype, shape, data in sorted(outs):
            shape_text = "x".join(str(n) for n in shape)
            lines.append("%s  %s  %s  %s  %s\n" % (hashlib.sha256(data).hexdigest(), fmt, name,
                                                  dtype, shape_text))
    with open(os.path.join(d, "expected.sha256"), "w") as f:
        f.write("# made by make_bf16_to_fp8_ref.py expect%s\n" %
                (" --no-torch (provisional)" if no_torch else " (PyTorch)"))
        f.writelines(lines)
    return 1 if disagree else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["build", "expect"])
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "bf16_to_fp8"))
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    if a.what == "build":
        build(a.dir)
        return 0
    return expect(a.dir, a.no_torch)


if __name__ == "__main__":
    sys.exit(main())
