#!/usr/bin/env python3
"""Independent references for the weight tools, run on the GPU machine (PyTorch + safetensors).

For a synthetic checkpoint made by dsv3-synth this script performs, in PyTorch, what DeepSeek's
convert.py and fp8_cast_bf16.py do (DESIGN §3.3 and §4: rename, split dim per module, experts by
rank, whole tensors saved with safetensors.torch.save_file; FP8 x 128x128 block scale in float32,
rounded to bfloat16), and writes the SHA-256 of every file it produced. It also writes the
serializer fixture: a small file saved by the Python safetensors library, which dsv3's writer must
reproduce byte for byte. The C tools never run here; only their input checkpoint is shared.

usage: make_tool_refs.py --ckpt NAME=DIR [--ckpt ...] --mp 1,2,4 --out OUTDIR
"""
import argparse
import hashlib
import json
import os
import re
from glob import glob

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# module name -> (converted name, split dim); DESIGN §3.3, plus the MTP modules dsv3 keeps on request.
MODULES = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None), "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate": ("gate", None), "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1), "up_proj": ("w3", 0), "norm": ("norm", None), "lm_head": ("head", 0),
    "scale": ("scale", None),
}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sums(directory, listing):
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors") or n.endswith(".json"))
    with open(listing, "w") as out:
        for n in names:
            out.write(f"{sha256_file(os.path.join(directory, n))}  {n}\n")


def converted_name(name):
    name = name[len("model."):] if name.startswith("model.") else name
    for old, new in (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"),
                     ("e_score_correction_bias", "bias")):
        name = name.replace(old, new)
    key = name.split(".")[-2]
    new_key, dim = MODULES[key]
    return name.replace(key, new_key), dim


def convert(ckpt, out, n_experts, mp, n_layers):
    per_rank = n_experts // mp
    shards = [{} for _ in range(mp)]
    layer_re = re.compile(r"^model\.layers\.(\d+)\.")
    for path in sorted(glob(os.path.join(ckpt, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                m = layer_re.match(hf_name)
                if m and int(m.group(1)) >= n_layers:
                    continue  # the MTP layer, dropped as by DeepSeek's script
                tensor = f.get_tensor(hf_name)
                name, dim = converted_name(hf_name)
                for rank in range(mp):
                    if "experts" in name and "shared_experts" not in name:
                        expert = int(name.split(".")[-3])
                        if expert // per_rank == rank:
                            shards[rank][name] = tensor
                    elif dim is None:
                        shards[rank][name] = tensor
                    else:
                        assert tensor.size(dim) % mp == 0, name
                        width = tensor.size(dim) // mp
                        shards[rank][name] = tensor.narrow(dim, rank * width, width).contiguous()
    os.makedirs(out, exist_ok=True)
    for rank in range(mp):
        save_file(shards[rank], os.path.join(out, f"model{rank}-mp{mp}.safetensors"))


def fp8_to_bf16(ckpt, out, block=128):
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    everything = {}
    for path in sorted(glob(os.path.join(ckpt, "*.safetensors"))):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                everything[name] = f.get_tensor(name)
    os.makedirs(out, exist_ok=True)
    converted = []
    for path in sorted(glob(os.path.join(ckpt, "*.safetensors"))):
        result = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("_scale_inv"):
                    continue
                w = everything[name]
                if w.dtype == torch.float8_e4m3fn:
                    s = everything[name + "_scale_inv"].to(torch.float32)
                    rows, cols = w.shape
                    full = s.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
                    result[name] = (w.to(torch.float32) * full).to(torch.bfloat16)
                    converted.append(name)
                else:
                    result[name] = w
        save_file(result, os.path.join(out, os.path.basename(path)))
    for name in converted:
        weight_map.pop(name + "_scale_inv", None)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def writer_fixture(out):
    """A file exercising every dtype's rank, name ties in byte order, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(7)
    t = {
        "b.f32": torch.randn(3, 5, generator=g),
        "a.f64": torch.randn(4, generator=g, dtype=torch.float64),
        "a.bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "a.f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "z.i64": torch.arange(-3, 4, dtype=torch.int64),
        "y.i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "x.i16": torch.arange(-2, 3, dtype=torch.int16),
        "w.i8": torch.arange(-4, 4, dtype=torch.int8),
        "v.u8": torch.arange(0, 250, 31, dtype=torch.uint8),
        "u.bool": torch.tensor([True, False, True]),
        "layers.10.e4m3": (torch.randn(4, 4, generator=g) * 8).to(torch.float8_e4m3fn),
        "layers.9.e4m3": (torch.randn(3, generator=g) * 8).to(torch.float8_e4m3fn),
        "layers.9.e5m2": (torch.randn(3, generator=g) * 8).to(torch.float8_e5m2),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(t, os.path.join(out, "writer_fixture.safetensors"))
    save_file({"w": torch.ones(2, 2, dtype=torch.bfloat16)}, os.path.join(out, "writer_fixture_meta.safetensors"),
              metadata={"format": "pt"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", default=[], help="NAME=DIR of a dsv3-synth checkpoint")
    ap.add_argument("--mp", default="1,2,4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    writer_fixture(args.out)
    with open(os.path.join(args.out, "writer_fixture.sha256"), "w") as out:
        for n in ("writer_fixture.safetensors", "writer_fixture_meta.safetensors"):
            out.write(f"{sha256_file(os.path.join(args.out, n))}  {n}\n")
    import safetensors
    print("torch", torch.__version__, "safetensors", safetensors.__version__)
    for spec in args.ckpt:
        label, ckpt = spec.split("=", 1)
        with open(os.path.join(ckpt, "config.json")) as f:
            cfg = json.load(f)
        write_sums(ckpt, os.path.join(args.out, f"{label}-input.sha256"))
        for mp in (int(x) for x in args.mp.split(",")):
            d = os.path.join(args.out, "work", f"{label}-mp{mp}")
            convert(ckpt, d, cfg["n_routed_experts"], mp, cfg["num_hidden_layers"])
            write_sums(d, os.path.join(args.out, f"{label}-convert-mp{mp}.sha256"))
        if "quantization_config" in cfg:
            d = os.path.join(args.out, "work", f"{label}-bf16")
            fp8_to_bf16(ckpt, d)
            write_sums(d, os.path.join(args.out, f"{label}-fp8-to-bf16.sha256"))


if __name__ == "__main__":
    main()
