#!/usr/bin/env python3
"""A straight-line reference of DESIGN §4 in Python floats (double), independent of the C engine:
non-absorbed attention (k and v expanded from c by kv_b_proj), weights dequantised up front,
HF tensor names. For tiny synthetic checkpoints only (slow). Used by tests/test_engine.c.
usage: engine_reference.py HF_DIR TOKENS(comma-separated) MAX_SEQ_LEN OUT.f32 (logits per token)"""
import json, struct, math, sys, os, glob, operator
d = sys.argv[1]; toks = [int(t) for t in sys.argv[2].split(',')]; msl = int(sys.argv[3])
cfg = json.load(open(d + '/config.json'))
T = {}
for fn in glob.glob(d + '/*.safetensors'):
    b = open(fn, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8+n])
    for k, v in h.items():
        if k != '__metadata__': T[k] = (v['dtype'], v['shape'], b[8+n+v['data_offsets'][0]:8+n+v['data_offsets'][1]])
def e4m3(v):
    s = -1.0 if v & 0x80 else 1.0; e = (v >> 3) & 15; m = v & 7
    if (v & 0x7f) == 0x7f: return float('nan')
    return s * (math.ldexp(1 + m/8, e-7) if e else math.ldexp(m/8, -6))
E4 = [e4m3(i) for i in range(256)]
def raw(name):
    dt, sh, by = T[name]
    if dt == 'BF16': vals = [struct.unpack('<f', b'\0\0' + by[i:i+2])[0] for i in range(0, len(by), 2)]
    elif dt == 'F32': vals = list(struct.unpack('<%df' % (len(by)//4), by))
    elif dt == 'F8_E4M3': vals = [E4[x] for x in by]
    return sh, vals
cache = {}
def W(name):
    if name in cache: return cache[name]
    sh, v = raw(name + '.weight')
    if len(sh) == 1: cache[name] = v; return v
    R, C = sh; rows = [v[r*C:(r+1)*C] for r in range(R)]
    if name + '.weight_scale_inv' in T:
        ssh, s = raw(name + '.weight_scale_inv')
        rows = [[rows[r][c] * s[(r//128)*ssh[1] + c//128] for c in range(C)] for r in range(R)]
    cache[name] = rows; return rows
def mv(Wr, x): return [sum(map(operator.mul, row, x)) for row in Wr]
def rms(x, w): r = 1/math.sqrt(sum(a*a for a in x)/len(x) + 1e-6); return [a*r*b for a, b in zip(x, w)]
H = cfg['num_attention_heads']; nope = cfg['qk_nope_head_dim']; rope = cfg['qk_rope_head_dim']; vd = cfg['v_head_dim']
lora = cfg['kv_lora_rank']; qlora = cfg.get('q_lora_rank') or 0
rs = cfg.get('rope_scaling') or {}; L0 = rs.get('original_max_position_embeddings', 4096); fac = rs.get('factor', 1)
theta = cfg['rope_theta']
freqs = [1/theta**(2*i/rope) for i in range(rope//2)]
scale = (nope+rope)**-0.5
if msl > L0:
    cd = lambda nr: rope*math.log(L0/(nr*2*math.pi))/(2*math.log(theta))
    lo = max(math.floor(cd(rs.get('beta_fast', 32))), 0); hi = min(math.ceil(cd(rs.get('beta_slow', 1))), rope-1)
    if lo == hi: hi += 0.001
    ramp = [min(max((i-lo)/(hi-lo), 0), 1) for i in range(rope//2)]
    freqs = [f/fac*r + f*(1-r) for f, r in zip(freqs, ramp)]
    m = 0.1*rs.get('mscale_all_dim', 1)*math.log(fac) + 1; scale *= m*m
def rot(x, pos):
    out = list(x)
    for i in range(len(x)//2):
        a = pos*freqs[i]; c, s = math.cos(a), math.sin(a)
        out[2*i] = x[2*i]*c - x[2*i+1]*s; out[2*i+1] = x[2*i]*s + x[2*i+1]*c
    return out
def silu(a): return a/(1+math.exp(-a))
def mlp(p, x):
    a = mv(W(p+'.gate_proj'), x); b = mv(W(p+'.up_proj'), x)
    return mv(W(p+'.down_proj'), [silu(u)*v for u, v in zip(a, b)])
nL = cfg['num_hidden_layers']; kcache = [[] for _ in range(nL)]; vcache = [[] for _ in range(nL)]
E = cfg.get('n_routed_experts'); G = cfg.get('n_group', 1); TG = cfg.get('topk_group', 1); K = cfg.get('num_experts_per_tok')
def attn(l, x, pos):
    p = 'model.layers.%d.self_attn' % l
    q = mv(W(p+'.q_b_proj'), rms(mv(W(p+'.q_a_proj'), x), W(p+'.q_a_layernorm'))) if qlora else mv(W(p+'.q_proj'), x)
    kv = mv(W(p+'.kv_a_proj_with_mqa'), x)
    c = rms(kv[:lora], W(p+'.kv_a_layernorm')); kpe = rot(kv[lora:], pos)
    # naive: expand k and v with kv_b (NOT absorbed)
    kvb = mv(W(p+'.kv_b_proj'), c)
    kcache[l].append((kvb, kpe)); out = []
    for h in range(H):
        qh = q[h*(nope+rope):(h+1)*(nope+rope)]; qn, qp = qh[:nope], rot(qh[nope:], pos)
        sc = []
        for kvb_t, kpe_t in kcache[l]:
            kn = kvb_t[h*(nope+vd):h*(nope+vd)+nope]
            sc.append((sum(map(operator.mul, qn, kn)) + sum(map(operator.mul, qp, kpe_t)))*scale)
        mx = max(sc); e = [math.exp(s-mx) for s in sc]; z = sum(e)
        o = [0.0]*vd
        for pr, (kvb_t, _) in zip(e, kcache[l]):
            v = kvb_t[h*(nope+vd)+nope:(h+1)*(nope+vd)]
            o = [a + pr/z*b for a, b in zip(o, v)]
        out += o
    return mv(W(p+'.o_proj'), out)
def moe(l, x):
    p = 'model.layers.%d.mlp' % l
    s = mv(W(p+'.gate'), x)
    if cfg.get('scoring_func') == 'sigmoid': s = [1/(1+math.exp(-a)) for a in s]
    else: mx = max(s); e = [math.exp(a-mx) for a in s]; z = sum(e); s = [a/z for a in e]
    s0 = list(s); bias = (p+'.gate.e_score_correction_bias') in T
    if bias: s = [a+b for a, b in zip(s, raw(p+'.gate.e_score_correction_bias')[1])]
    if G > 1:
        per = E//G; gs = []
        for g in range(G):
            grp = sorted(s[g*per:(g+1)*per], reverse=True)
            gs.append(grp[0]+grp[1] if bias else grp[0])
        keep = sorted(range(G), key=lambda g: -gs[g])[:TG]
        s = [a if (i//per) in keep else -math.inf for i, a in enumerate(s)]
    top = sorted(range(E), key=lambda i: -s[i])[:K]
    w = [s0[i] for i in top]
    if cfg.get('scoring_func') == 'sigmoid': z = sum(w); w = [a/z for a in w]
    w = [a*cfg['routed_scaling_factor'] for a in w]
    y = [0.0]*len(x)
    for i, wi in zip(top, w): y = [a + wi*b for a, b in zip(y, mlp(p+'.experts.%d' % i, x))]
    return [a+b for a, b in zip(y, mlp(p+'.shared_experts', x))]
out = []
for pos, t in enumerate(toks):
    x = W('model.embed_tokens')[t]
    for l in range(nL):
        x = [a+b for a, b in zip(x, attn(l, rms(x, W('model.layers.%d.input_layernorm' % l)), pos))]
        xn = rms(x, W('model.layers.%d.post_attention_layernorm' % l))
        f = mlp('model.layers.%d.mlp' % l, xn) if l < cfg['first_k_dense_replace'] else moe(l, xn)
        x = [a+b for a, b in zip(x, f)]
    out.append(mv(W('lm_head'), rms(x, W('model.norm'))))
with open(sys.argv[4], 'wb') as f:
    for row in out: f.write(struct.pack('<%df' % len(row), *row))
