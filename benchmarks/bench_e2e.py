"""End-to-end benchmark (issue 4): a MiniCPM4-8B-shaped Llama, dense SDPA vs InfLLM-V2 (default config).

Model: hidden 4096, 32 layers, 32 query / 2 KV heads, head dim 128, intermediate 16384, vocab 73448,
random bf16 weights (std 1/sqrt(fan_in)); a self-contained Llama block (RMSNorm, RoPE, GQA attention,
SwiGLU MLP) so the device needs no transformers. On CUDA its prefill and decode step run the norms, RoPE and SiLU x
up as ``torch.compile`` kernels, as a serving stack fuses them (``--eager-pointwise``: eager PyTorch, which spent 30% of
the prefill's non-attention time in elementwise kernels at 128K, and about a quarter of the decode step's).
Measured, in one process:

* prefill (time to first token: the whole prompt through all layers + the last token's logits), batch 1,
  at 32K/64K/96K/128K: ``dense_prefill`` (SDPA, cuDNN backend) and ``infllmv2_prefill``
  (``infllmv2_attention`` with the Triton selection + sparse attention), each from random token ids
  (``pattern: random``) and from input embeddings following the BENCHMARKS.md ``local`` random walk
  (``pattern: local``);
* one decode step (all layers + logits + argmax) with a filled KV cache of n tokens, batch 1 and 8,
  captured in a CUDA graph: ``dense_decode`` (SDPA over the static cache) and ``infllmv2_decode``
  (``infllmv2_with_kvcache``: the cache write with the incremental compressed-key update of
  ``infllmv2.cache.StaticCompressedKeys``, then the Triton decode kernels given the cached fine/coarse keys). The cache
  holds random keys/values (``pattern: random``).

Writes e2e_h200.json (layout of attention_h200.json), e2e_h200.md and e2e_h200.png to --out-dir
(rows are also appended to e2e_rows.jsonl as they come, so a timeout keeps them).
``--weights int4`` (with ``--decode-only``) runs every weight in 4 bits through torch's weight-only int4 kernel
(``Int4Weight``), as the paper's 4-bit model; the run first checks that kernel against x @ its dequantized weight.
``--tiny`` runs a miniature model on the CPU (Triton interpreter for the decode kernel) as a smoke
test, and checks that the sparse decode step with a budget covering the cache gives the dense one's logits.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infllmv2 import SparseConfig, infllmv2_attention, infllmv2_with_kvcache  # noqa: E402
from infllmv2.attention import dense_attention_sdpa  # noqa: E402
from infllmv2.cache import StaticCompressedKeys  # noqa: E402

FULL_SHAPE = dict(hidden=4096, layers=32, hq=32, hkv=2, d=128, inter=16384, vocab=73448)
TINY_SHAPE = dict(hidden=128, layers=2, hq=8, hkv=2, d=32, inter=256, vocab=112)  # vocab % 16 == 0 for --weights int4


# --------------------------------------------------------------------------------------------------
# A minimal Llama
# --------------------------------------------------------------------------------------------------
def _silu_mul(g_, u):
    return F.silu(g_) * u


class Int4Weight:
    """A layer weight in 4 bits a value, for ``--weights int4``: group-wise asymmetric quantization along the input
    dimension (groups of ``group``: w = (q - 8) * scale + zero, q in 0..15, scale and zero bf16), run by torch's own
    weight-only int4 kernel (``aten._weight_int4pack_mm``, tinygemm, as gpt-fast's and torchao's int4 weight-only
    paths; ``..._for_cpu`` on the CPU). The paper's decode speed-ups come from a 4-bit model: quarter-size weights leave
    attention a larger share of the step. ``w``: (in, out), as the bf16 model stores it."""

    def __init__(self, w, group=128, inner_k_tiles=8, keep_q=None):
        k, n = w.shape
        n_mult = 8 if w.is_cuda else 16  # the kernels' layouts
        if k % group or k % (inner_k_tiles * 16) or n % n_mult:
            raise ValueError(f"int4 weights need in % {max(group, inner_k_tiles * 16)} == 0 and out % {n_mult} == 0, "
                             f"got ({k}, {n})")
        wg = w.t().float().reshape(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-6).to(torch.bfloat16)  # the kernel reads them in bf16: round first,
        zero = (lo + 8 * scale).to(torch.bfloat16)                     # then put each weight on that grid
        grid0 = zero.float() - 8 * scale.float()
        q = ((wg - grid0[..., None]) / scale.float()[..., None]).round().clamp_(0, 15).to(torch.int32)
        q = q.reshape(n, k).contiguous()  # wg is a view of w's transpose
        self.scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (k/g, n, 2)
        self.group, self.in_features, self.out_features = group, k, n
        self.q = q if (not w.is_cuda if keep_q is None else keep_q) else None  # for dequantize(): checks and tests
        if w.is_cuda:  # two values a byte, the even column in the high nibble
            self.packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                                     inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
            self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def dequantize(self, q=None):
        """The (in, out) weight the kernel multiplies by, in fp32 (``q``: the 4-bit values, (out, in) int32)."""
        q = self.q if q is None else q
        sz = self.scales_zeros.float().transpose(0, 1)  # (n, k/g, 2)
        w = (q.reshape(self.out_features, -1, self.group).float() - 8) * sz[..., :1] + sz[..., 1:]
        return w.reshape(self.out_features, self.in_features).t()

    def mm(self, x):
        """x (m, in) -> x @ w (m, out), in x's dtype."""
        return self._mm(x.to(torch.bfloat16), self.packed, self.group, self.scales_zeros).to(x.dtype)


def linear(x, w):
    """x @ w for a bf16 (in, out) weight or an ``Int4Weight``."""
    return w.mm(x) if isinstance(w, Int4Weight) else x @ w


def add_linear_(x, a, w):
    """x += a @ w, in place: in the product's epilogue (cuBLAS beta = 1) for bf16 weights; into another tensor cuBLAS
    would first copy x (2.3 us a layer of the decode step at batch 8, profile_e2e_decode.py)."""
    return x.add_(linear(a, w)) if isinstance(w, Int4Weight) else x.addmm_(a, w)


class Llama:
    def __init__(self, shape, device, dtype, seed=0, compile_pointwise=False, weights="bf16"):
        """``compile_pointwise``: the prefill's norms, RoPE and SiLU x up run as ``torch.compile`` kernels (one
        fused kernel each, as a serving stack fuses them) instead of eager PyTorch's chains of elementwise kernels:
        at 128K those took 36 of the 120 ms a layer spends outside attention, 7 ms compiled
        (``benchmarks/profile_e2e_nonattn.py``). Dense and sparse prefill and decoding share them (the decode step
        at 128K, batch 8, spent about 75 of its 237 us a layer outside attention in eager elementwise kernels,
        ``benchmarks/profile_e2e_decode.py``). ``weights="int4"``: the layers' and the head's weights as
        ``Int4Weight`` (decode only: the kernel is for few rows), built from the same random bf16 weights."""
        if weights not in ("bf16", "int4"):
            raise ValueError(f"weights must be 'bf16' or 'int4', got {weights!r}")
        self.s = shape
        self.device, self.dtype = device, dtype
        self.ops = dict(rms=self.rms, rope=self.rope, silu_mul=_silu_mul)
        if compile_pointwise:  # dynamic: one compilation for every prompt length
            self.ops = {name: torch.compile(fn, dynamic=True) for name, fn in self.ops.items()}
        g = torch.Generator(device=device).manual_seed(seed)
        h, hq, hkv, d, inter = shape["hidden"], shape["hq"], shape["hkv"], shape["d"], shape["inter"]

        def lin(in_f, out_f):
            """A layer's weight stored (in, out), its product x @ w: at batch 8 cuBLAS streamed the MLP's weights
            4-7% faster in this layout than (out, in) with x @ w.t(), and the others equally fast (decode, H200,
            ``benchmarks/dev_skinny_gemm.py``)."""
            w = torch.randn(in_f, out_f, device=device, dtype=dtype, generator=g) * in_f ** -0.5
            return Int4Weight(w) if weights == "int4" else w

        self.embed = torch.randn(shape["vocab"], h, device=device, dtype=dtype, generator=g)
        # a bf16 head stays (vocab, hidden) with x @ head.t(): 144 us against 149 us transposed at batch 8
        self.head = lin(h, shape["vocab"])
        if weights == "bf16":
            self.head = self.head.t().contiguous()
        self.layers = []
        for _ in range(shape["layers"]):
            self.layers.append(dict(wqkv=lin(h, (hq + 2 * hkv) * d), wo=lin(hq * d, h), w13=lin(h, 2 * inter),
                                    w2=lin(inter, h), n1=torch.ones(h, device=device, dtype=dtype),
                                    n2=torch.ones(h, device=device, dtype=dtype)))
        self.norm = torch.ones(h, device=device, dtype=dtype)
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        self.inv_freq = inv

    def rope_table(self, n):
        t = torch.arange(n, device=self.device, dtype=torch.float32)
        f = torch.outer(t, self.inv_freq)
        emb = torch.cat([f, f], -1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def rms(x, w, eps=1e-6):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    @staticmethod
    def rope(x, cos, sin):  # x (..., n, H, d), cos/sin (n, d)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[..., None, :] + rot * sin[..., None, :]

    def qkv(self, L, h):
        s = self.s
        qkv = linear(h, L["wqkv"])
        q, k, v = qkv.split([s["hq"] * s["d"], s["hkv"] * s["d"], s["hkv"] * s["d"]], -1)
        return (q.unflatten(-1, (s["hq"], s["d"])), k.unflatten(-1, (s["hkv"], s["d"])),
                v.unflatten(-1, (s["hkv"], s["d"])))

    def mlp(self, L, x, chunk, ops=None):
        """x += MLP(rms(x)), in place, ``chunk`` rows at a time."""
        rms, silu_mul = (ops["rms"], ops["silu_mul"]) if ops else (self.rms, _silu_mul)
        for a in range(0, x.shape[0], chunk):
            h = rms(x[a:a + chunk], L["n2"])
            g_, u = linear(h, L["w13"]).chunk(2, -1)
            add_linear_(x[a:a + chunk], silu_mul(g_, u), L["w2"])
        return x

    @torch.no_grad()
    def prefill(self, x, attn, mlp_chunk=16384):
        """x: (n, hidden) input embeddings of one sequence -> logits of the last token (vocab,)."""
        n = x.shape[0]
        cos, sin = self.rope_table(n)
        rms, rope = self.ops["rms"], self.ops["rope"]
        x = x.clone()  # the residual stream, updated in place
        for L in self.layers:
            q, k, v = self.qkv(L, rms(x, L["n1"]))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            o = attn(q[None], k[None], v[None])[0]
            add_linear_(x, o.reshape(n, -1), L["wo"])
            del q, k, v, o
            x = self.mlp(L, x, mlp_chunk, self.ops)
        return self.logits(rms(x[-1:], self.norm))

    def logits(self, h):
        return linear(h, self.head) if isinstance(self.head, Int4Weight) else h @ self.head.t()


class DecodeState:
    """Static KV cache (batch, max_len, Hkv, d) per layer plus the InfLLM-V2 compressed keys."""

    def __init__(self, model, batch, max_len, config, fill_seed=3):
        s = model.s
        g = torch.Generator(device=model.device).manual_seed(fill_seed)
        self.k = [torch.randn(batch, max_len, s["hkv"], s["d"], device=model.device, dtype=model.dtype, generator=g)
                  for _ in model.layers]
        self.v = [torch.randn(k.shape, device=k.device, dtype=k.dtype, generator=g) for k in self.k]
        lens = torch.full((batch,), max_len, dtype=torch.int32, device=model.device)
        self.comp = []
        for k in self.k:
            c = StaticCompressedKeys(batch, max_len, s["hkv"], s["d"], config, model.dtype, model.device)
            c.prefill(k, lens)
            self.comp.append(c)
        self.cos, self.sin = model.rope_table(max_len)

    def narrow(self, b):
        new = object.__new__(DecodeState)
        new.k, new.v = [k[:b] for k in self.k], [v[:b] for v in self.v]
        new.comp = [c.narrow_batch(b) for c in self.comp]
        new.cos, new.sin = self.cos, self.sin
        return new


@torch.no_grad()
def decode_step(model, st, tokens, pos, n_ctx, config, sparse, fused_append=False, logits=False):
    """One token per row at position ``pos`` (b,) long (its key/value are written there); attention over
    the ``n_ctx`` = pos + 1 first cache slots (equal lengths, static shapes). Returns the argmax ids (the logits
    with ``logits``). ``fused_append``: each layer's cache write is one Triton launch (the new key / value, and for
    InfLLM-V2 the compressed windows they complete: ``infllmv2_with_kvcache``); else index writes, and torch's
    compressed-key append before the decode kernel."""
    from infllmv2.cache import append_windows
    from infllmv2.ops.triton import infllmv2_decode_triton
    b = tokens.shape[0]
    rows = torch.arange(b, device=tokens.device)
    x = model.embed[tokens]  # (b, hidden)
    cos, sin = st.cos[pos], st.sin[pos]  # (b, d)
    lens = (pos + 1).to(torch.int32)
    cached = pos.to(torch.int32)  # keys in the cache before this token's
    scale = model.s["d"] ** -0.5
    rms, rope = model.ops["rms"], model.ops["rope"]
    for li, L in enumerate(model.layers):
        q, k, v = model.qkv(L, rms(x, L["n1"]))  # (b, H, d)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # cos / sin (b, d): one position a row
        kc, vc = st.k[li], st.v[li]
        if sparse and fused_append:
            o = infllmv2_with_kvcache(q[:, None], kc, vc, cached, config, k=k[:, None], v=v[:, None],
                                      compressed_keys=st.comp[li], softmax_scale=scale, backend="triton")[:, 0]
        else:
            if fused_append:
                append_windows([], kc, lens, fused=True, new=(k, v, vc))
            else:
                kc[rows, pos] = k
                vc[rows, pos] = v
            if sparse is None:  # no attention at all: the step's floor (weights, norms, RoPE, cache write, logits)
                o = q
            elif sparse:
                c = st.comp[li]
                c.append(kc, lens)
                o = infllmv2_decode_triton(q, kc, vc, lens, config, scale, k_fine=c.fine, k_coarse=c.coarse)
            else:
                o = F.scaled_dot_product_attention(q[:, :, None], kc[:, :n_ctx].transpose(1, 2),
                                                   vc[:, :n_ctx].transpose(1, 2), scale=scale,
                                                   enable_gqa=True)[:, :, 0]
        add_linear_(x, o.reshape(b, -1), L["wo"])  # in place (x is this step's own)
        x = model.mlp(L, x, b, model.ops)
    out = model.logits(rms(x, model.norm))
    return out if logits else out.argmax(-1)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def random_walk(n, dim, device, rho=0.97, chunk=256, seed=0):
    """BENCHMARKS.md `local`: x[t] = rho x[t-1] + sqrt(1 - rho^2) e[t] per coordinate, in chunks."""
    g = torch.Generator(device=device).manual_seed(seed)
    e = torch.randn(n, dim, device=device, generator=g)
    b = math.sqrt(1 - rho ** 2)
    i = torch.arange(chunk, device=device)
    A = torch.where(i[:, None] >= i[None, :], rho ** (i[:, None] - i[None, :]).clamp_min(0).float(), 0.0) * b
    pad = (-n) % chunk
    ep = torch.cat([e, e.new_zeros(pad, dim)]).view(-1, chunk, dim)
    within = torch.matmul(A, ep)
    decay = rho ** (i.float() + 1)
    out = torch.empty_like(within)
    prev = torch.zeros(dim, device=device)
    for c in range(within.shape[0]):
        out[c] = within[c] + decay[:, None] * prev
        prev = out[c, -1]
    return out.view(-1, dim)[:n]


def prefill_input(model, n, pattern, device, dtype):
    """The benchmark's prefill input of n tokens (n, hidden): embeddings of random token ids (`random`, seed n) or the
    `local` random walk (seed n)."""
    if pattern == "local":
        return random_walk(n, model.s["hidden"], device, seed=n).to(dtype)
    ids = torch.randint(0, model.s["vocab"], (n,), device=device,
                        generator=torch.Generator(device=device).manual_seed(n))
    return model.embed[ids]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device, reps=1):
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


class RowLog:
    """A run's rows: printed, kept, and appended to a JSONL file as they come (a timeout keeps them), each given
    ``defaults`` for the keys it lacks. ``attempt(label, fn)`` runs one row: a failure is recorded in ``errors`` and
    the run goes on."""

    def __init__(self, path, device, defaults=None):
        self.rows, self.errors, self.path, self.device, self.defaults = [], [], path, device, defaults or {}

    def add(self, **row):
        for key, value in self.defaults.items():
            row.setdefault(key, value)
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def attempt(self, label, fn):
        try:
            fn()
        except Exception as e:  # keep going: a failure of one row is reported, not fatal
            traceback.print_exc()
            self.errors.append(f"{label}: {type(e).__name__}: {e}")
            if self.device == "cuda":
                torch.cuda.empty_cache()


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def run(args):
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    lengths = args.lengths or ([256, 384] if args.tiny else [32768, 65536, 98304, 131072])
    batches = args.batches or ([1, 2] if args.tiny else [1, 8])
    config = SparseConfig() if not args.tiny else SparseConfig(block_size=16, kernel_size=16, kernel_stride=8,
                                                               window_size=32, topk=4, dense_len=128)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "e2e_meta.json"), "w") as f:
        json.dump(_meta(), f)
    log = RowLog(os.path.join(args.out_dir, "e2e_rows.jsonl"), device,
                 dict(weights=args.weights, hq=shape["hq"], hkv=shape["hkv"], d=shape["d"]))
    rows, errors, add, attempt = log.rows, log.errors, log.add, log.attempt

    t_start = time.perf_counter()
    model = Llama(shape, device, dtype, compile_pointwise=device == "cuda" and not args.eager_pointwise,
                  weights=args.weights)
    print(f"model built in {time.perf_counter() - t_start:.1f}s", flush=True)
    if args.weights == "int4":  # the kernel against the weights it stands for, at the model's product shapes
        attempt("int4 check", lambda: check_int4(shape, device, dtype, add))
    scale = shape["d"] ** -0.5

    def dense_attn(q, k, v):
        if device == "cuda":
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return dense_attention_sdpa(q, k, v, scale)
        return dense_attention_sdpa(q, k, v, scale)

    def sparse_attn(q, k, v):
        return infllmv2_attention(q, k, v, config, softmax_scale=scale, backend="auto")

    # ---------------- decode
    if not args.prefill_only:
        def decode_rows():
            max_len = max(lengths) + 1
            full = DecodeState(model, max(batches), max_len, config)
            print(f"decode cache built at {time.perf_counter() - t_start:.1f}s", flush=True)
            for b in batches:
                st = full.narrow(b)
                tokens = torch.randint(0, shape["vocab"], (b,), device=device)
                for n in lengths:
                    pos = torch.full((b,), n, dtype=torch.long, device=device)  # the new token is number n+1
                    outs = {}
                    modes = (("infllmv2", True), ("dense", False)) + ((("no_attention", None),) if args.floor else ())
                    for name, sparse in modes:
                        def one(name=name, sparse=sparse):
                            fn = lambda: decode_step(model, st, tokens, pos, n + 1, config, sparse, args.fused_append)
                            if device == "cuda":
                                g = graphed(fn)
                                from triton.testing import do_bench
                                ms = do_bench(g.replay, warmup=5, rep=args.decode_rep_ms, return_mode="median")
                                del g
                            else:
                                outs[name] = fn()
                                ms = time_once(fn, device)
                            add(path=f"{name}_decode", n=n, batch=b, pattern="random" if sparse else None, ms=ms,
                                visible_blocks=config.budget if sparse else None, mode="cuda_graph"
                                if device == "cuda" else "eager")
                        attempt(f"{name}_decode n={n} b={b}", one)
                print(f"decode b={b} done at {time.perf_counter() - t_start:.1f}s", flush=True)
            del full, st
        attempt("decode", decode_rows)
        if device == "cuda":
            torch.cuda.empty_cache()

    # ---------------- prefill
    if not args.decode_only:
        warm = lengths[0] if args.tiny else 16384
        for name, fn in (("dense", dense_attn), ("infllmv2", sparse_attn)):
            x = model.embed[torch.randint(0, shape["vocab"], (warm,), device=device)]
            model.prefill(x, fn)
        sync(device)
        print(f"warm-up done at {time.perf_counter() - t_start:.1f}s", flush=True)
        for n in lengths:
            for pattern in args.patterns:
                x = prefill_input(model, n, pattern, device, dtype)
                paths = (("infllmv2", sparse_attn), ("dense", dense_attn))
                if args.floor:  # the prefill without attention (each layer's output = its query): the shared floor
                    paths += (("no_attention", lambda q, k, v: q),)
                for name, fn in paths:
                    if name != "infllmv2" and pattern != args.patterns[0] and not args.dense_each_pattern:
                        continue  # dense (and floor) time does not depend on the input: measured once per length

                    def one(name=name, fn=fn, x=x, pattern=pattern):
                        ms = time_once(lambda: model.prefill(x, fn), device, reps=args.prefill_reps)
                        add(path=f"{name}_prefill", n=n, batch=1, pattern=pattern if name == "infllmv2" else None,
                            ms=ms, visible_blocks=config.budget if name == "infllmv2" else None)
                    attempt(f"{name}_prefill n={n} {pattern}", one)
                del x
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"prefill n={n} done at {time.perf_counter() - t_start:.1f}s", flush=True)

    # ---------------- tiny: correctness of the two decode paths against each other
    if args.tiny:
        def check():
            cover = config.replace(topk=64)  # the budget covers every cache: sparse == dense
            st = DecodeState(model, 2, max(lengths) + 1, cover)
            tokens = torch.tensor([5, 7])
            pos = torch.full((2,), max(lengths), dtype=torch.long)
            st2, st3 = (DecodeState(model, 2, max(lengths) + 1, cover) for _ in range(2))
            b = decode_step(model, st2, tokens, pos, max(lengths) + 1, cover, False, logits=True)
            for fused, state in ((False, st), (True, st3)):  # index writes + append / infllmv2_with_kvcache
                a = decode_step(model, state, tokens, pos, max(lengths) + 1, cover, True, fused, logits=True)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            for ka, kb in zip(st3.k + st3.v, st2.k + st2.v):  # the same cache writes (up to the layers' rounding)
                torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-4)
            assert torch.equal(st3.k[0], st2.k[0]) and not torch.equal(st3.k[0], DecodeState(model, 2, max(
                lengths) + 1, cover).k[0])  # layer 0 sees the same input: bitwise, and the step did write
            print("tiny check: sparse decode step (covering budget) == dense decode step (logits)", flush=True)
        attempt("tiny check", check)
    return rows, errors, config


def check_int4(shape, device, dtype, add, batch=8):
    """``Int4Weight``'s kernel at the model's product shapes against x @ its dequantized weight in fp32; rows of path
    ``int4_check`` record the largest error against the reference's largest value. Raises past bf16 rounding."""
    g = torch.Generator(device=device).manual_seed(11)
    h, inter, qkv = shape["hidden"], shape["inter"], (shape["hq"] + 2 * shape["hkv"]) * shape["d"]
    for k, n in ((h, qkv), (shape["hq"] * shape["d"], h), (h, 2 * inter), (inter, h), (h, shape["vocab"])):
        w = Int4Weight(torch.randn(k, n, device=device, dtype=dtype, generator=g) * k ** -0.5, keep_q=True)
        x = torch.randn(batch, k, device=device, dtype=dtype, generator=g)
        ref = x.float() @ w.dequantize()
        err = (linear(x, w).float() - ref).abs().max().item() / ref.abs().max().item()
        add(path="int4_check", n=k, batch=batch, out_features=n, rel_err=err)
        if not err < 1e-2:  # bf16 output rounding is 2^-9 of the largest value; a wrong layout gives O(1)
            raise AssertionError(f"int4 product ({k} -> {n}) off by {err:.3g} of its largest value")


def _meta():
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = None
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (tiny smoke test)",
            "torch": torch.__version__, "triton": tv, "date": datetime.date.today().isoformat(),
            "command": "python3 benchmarks/bench_e2e.py " + " ".join(sys.argv[1:])}


def write_outputs(rows, errors, args, config, meta=None):
    os.makedirs(args.out_dir, exist_ok=True)
    if meta is None:
        meta = _meta()
    res = dict(meta)
    wdesc = "random bf16 weights" if args.weights == "bf16" else ("random bf16 weights quantized to int4 (groups of "
                                                                  "128, torch's weight-only int4 kernel)")
    res.update(model="Llama, MiniCPM4-8B shape (hidden 4096, 32 layers, 32/2 heads, d 128, inter 16384), "
                     + wdesc if not args.tiny else "tiny", weights=args.weights, sparse_config=config.to_dict(),
               rows=rows, errors=errors)
    with open(os.path.join(args.out_dir, "e2e_h200.json"), "w") as f:
        json.dump(res, f, indent=1)

    def pick(path, **m):
        for r in rows:
            if r["path"] == path and all(r.get(k) == v for k, v in m.items()):
                return r["ms"]
        return None

    lines = [f"# End-to-end benchmark ({res['gpu']}, torch {res['torch']}, triton {res['triton']}, {res['date']})",
             "", f"Command: `{res['command']}`", "",
             f"Llama with the MiniCPM4-8B shape, {wdesc}; InfLLM-V2 default config "
             "(96 blocks = 6144 visible tokens, dense_len 8192). Prefill = whole prompt + last logits, batch 1; "
             "decode = one step (all layers + logits), CUDA graph, random KV cache.", "",
             "## Prefill (time to first token)", "",
             "| n | dense SDPA (cuDNN) ms | InfLLM-V2 random ms | speed-up | InfLLM-V2 local ms | speed-up |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n in sorted({r["n"] for r in rows if r["path"].endswith("prefill")}):
        d = pick("dense_prefill", n=n)
        cells = [f"{d:.0f}" if d else "-"]
        for pat in ("random", "local"):
            s = pick("infllmv2_prefill", n=n, pattern=pat)
            cells += [f"{s:.0f}" if s else "-", f"{d / s:.2f}x" if s and d else "-"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    floors = sorted({r["n"] for r in rows if r["path"] == "no_attention_prefill"})
    if floors:  # what attention costs inside the prefill: (prefill - floor) / layers
        layers = FULL_SHAPE["layers"] if not args.tiny else TINY_SHAPE["layers"]
        lines += ["", f"Attention inside the prefill, per layer: (prefill - no-attention prefill) / {layers} layers.",
                  "", "| n | no attention ms | dense attention ms a layer | InfLLM-V2 random ms a layer | "
                  "InfLLM-V2 local ms a layer |", "| --- | --- | --- | --- | --- |"]
        for n in floors:
            f0 = pick("no_attention_prefill", n=n)
            cells = [pick("dense_prefill", n=n)] + [pick("infllmv2_prefill", n=n, pattern=p) for p in ("random", "local")]
            lines.append(f"| {n} | {f0:.0f} | " + " | ".join(f"{(c - f0) / layers:.1f}" if c else "-" for c in cells)
                         + " |")
    lines += ["", "## Decode step", "",
              "| n | batch | dense ms | InfLLM-V2 ms | speed-up | no attention ms (floor) | bound: dense / floor |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for n, b in sorted({(r["n"], r["batch"]) for r in rows if r["path"].endswith("decode")}):
        d, s = pick("dense_decode", n=n, batch=b), pick("infllmv2_decode", n=n, batch=b)
        f0 = pick("no_attention_decode", n=n, batch=b)
        fl = [f"{f0:.3f}", f"{d / f0:.2f}x" if d else "-"] if f0 else ["-", "-"]
        lines.append(" | ".join([f"| {n} | {b} | {d:.3f} | {s:.3f} | {d / s:.2f}x" if d and s else
                                 f"| {n} | {b} | {d} | {s} | -"] + fl) + " |")
    checks = [r for r in rows if r["path"] == "int4_check"]
    if checks:
        lines += ["", "int4 products against x @ the dequantized weight (fp32), batch 8: largest error / largest value "
                  + ", ".join(f"{r['n']}->{r['out_features']} {r['rel_err']:.1e}" for r in checks)]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    with open(os.path.join(args.out_dir, "e2e_h200.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for path, pat in (("dense_prefill", None), ("infllmv2_prefill", "random"), ("infllmv2_prefill", "local")):
            pts = sorted((r["n"], r["ms"]) for r in rows if r["path"] == path and r.get("pattern") == pat)
            if pts:
                axes[0].plot(*zip(*pts), marker="o", label=f"{path}" + (f" ({pat})" if pat else ""))
        for path in ("dense_decode", "infllmv2_decode"):
            for b in sorted({r["batch"] for r in rows if r["path"] == path}):
                pts = sorted((r["n"], r["ms"]) for r in rows if r["path"] == path and r["batch"] == b)
                axes[1].plot(*zip(*pts), marker="o", label=f"{path} batch {b}")
        for ax, title in zip(axes, ("prefill (batch 1)", "decode step (CUDA graph)")):
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("ms")
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, "e2e_h200.png"), dpi=110)
    except Exception as e:  # the plot is optional, the numbers are not
        print("plot failed:", e)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--tiny", action="store_true", help="miniature model on the CPU (smoke test)")
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--patterns", nargs="+", default=["local", "random"], choices=["local", "random"])
    p.add_argument("--dense-each-pattern", action="store_true", help="time dense prefill for each pattern too")
    p.add_argument("--prefill-reps", type=int, default=1)
    p.add_argument("--decode-rep-ms", type=int, default=100)
    p.add_argument("--prefill-only", action="store_true")
    p.add_argument("--fused-append", action="store_true",
                   help="each layer's decode cache write in one Triton launch (the new key / value, and for InfLLM-V2 "
                   "the compressed windows: infllmv2_with_kvcache, as a serving loop calls it); else index writes")
    p.add_argument("--decode-only", action="store_true")
    p.add_argument("--floor", action="store_true", help="also time the decode step and the prefill without attention "
                   "(paths no_attention_decode / no_attention_prefill: the floor any attention adds to)")
    p.add_argument("--eager-pointwise", action="store_true",
                   help="norms, RoPE and SiLU x up in eager PyTorch, prefill and decode (the default on CUDA: "
                   "torch.compile)")
    p.add_argument("--weights", choices=["bf16", "int4"], default="bf16",
                   help="int4: the layers' and the head's weights in 4 bits (groups of 128, torch's weight-only int4 "
                   "kernel, as the paper's 4-bit model); decode only")
    p.add_argument("--replot", help="rewrite the md/png (and json) in --out-dir from an e2e_h200.json")
    args = p.parse_args()
    if args.weights == "int4" and not (args.decode_only or args.replot):
        p.error("--weights int4 needs --decode-only (the int4 kernel is for few rows a product, not a prefill)")
    if args.replot:
        if args.replot.endswith(".jsonl"):  # rows of an interrupted run + its e2e_meta.json
            res = json.load(open(os.path.join(os.path.dirname(args.replot), "e2e_meta.json")))
            res.update(rows=[json.loads(line) for line in open(args.replot)], sparse_config=SparseConfig().to_dict(),
                       errors=["run interrupted (time limit): rows written before it"])
        else:
            res = json.load(open(args.replot))
        meta = {k: res[k] for k in ("gpu", "torch", "triton", "date", "command")}
        args.tiny = res.get("model") == "tiny"
        args.weights = res.get("weights", "bf16")
        write_outputs(res["rows"], res.get("errors", []), args, SparseConfig.from_dict(res["sparse_config"]), meta=meta)
        return
    rows, errors, config = run(args)
    write_outputs(rows, errors, args, config)


if __name__ == "__main__":
    main()
