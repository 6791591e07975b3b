"""Static look at a kernel's machine code for the H100/H200 (sm90), without a GPU.

    python benchmarks/sass_stats.py score|score_sm90|score_sm90_ws|lse|lse_sm90|select|union|union_bitmap|row_bitmap|fwd|fwd_sm90|fwd_sm90_ws|dq|dkdv [--warps 4] [--stages 2] [--maxnreg N] [-D NAME=VALUE ...] [--sass FILE]

Compiles one of the stage-1 / stage-2 kernels at the standard shape (Hq 32, Hkv 2, d 128, bf16) with the same
integer specialisation the JIT gives real launches (pointers and strides divisible by 16), then prints its
registers, shared memory and, for each loop of the SASS, the instruction mix per iteration. This is how the
ninth session counted, for instance, 507 instructions per scoring step (64 of them MUFU) and a top-k search
step of 96 instructions against about 1400 outside the loop. ``-D`` overrides a constexpr (``-D BLOCK_NB=1024``).
Needs Triton's NVIDIA backend binaries (cuobjdump, nvdisasm), which the triton wheel ships. The local Triton
may be newer than the GPU machine's: treat the counts as a guide and confirm timings on the GPU.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
try:
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:  # pragma: no cover
    GluonASTSource = None

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infllmv2.ops.triton import lse_sm90, score_sm90, selection, sparse_attention, sparse_fwd_sm90  # noqa: E402


def _ints(*names):
    return {n: "i32" for n in names}


def _ptrs(kind, *names):
    return {n: kind for n in names}


def _kernels():
    """name -> (jit function, signature, constexprs) at the standard shape's default launch."""
    lay = lay_names = ("tile_seq_ptr", "tile_off_ptr", "q_start_ptr", "q_len_ptr", "k_len_ptr")
    score = dict(_ptrs("*bf16", "q_ptr", "k1_ptr"), lse_ptr="*fp32", ws_ptr="*fp32",
                 **_ptrs("*i32", *lay, "c1_start_ptr", "c1_len_ptr"),
                 **_ints("stride_qt", "stride_qh", "stride_k1t", "stride_k1h", "stride_ls", "stride_lt", "stride_wh",
                         "stride_wr", "tile_base", "n_tiles", "n_lse_splits", "windows_per_split", "nb_ws"),
                 qk_scale="fp32", **_ints("D", "rows1"))
    lse = dict(_ptrs("*bf16", "q_ptr", "k1_ptr", "k2_ptr"), lse_ptr="*fp32",
               **_ptrs("*i32", *lay, "c1_start_ptr", "c1_len_ptr", "c2_start_ptr", "c2_len_ptr"),
               **_ints("stride_qt", "stride_qh", "stride_k1t", "stride_k1h", "stride_k2t", "stride_k2h", "stride_ls",
                       "stride_lt"),
               qk_scale="fp32", **_ints("D", "keys_per_split", "rows1", "rows2"))
    select = dict(ws_ptr="*fp32", out_ptr="*i32", **_ptrs("*i32", *lay),
                  **_ints("stride_wh", "stride_wr", "stride_oh", "stride_ot", "tile_base", "budget"))
    union = dict(BI="*i32", **_ptrs("*i32", "TILE_Q0", "TILE_NQ", "TILE_POS0", "UB"), UBITS="*i64", UCNT="*i32",
                 **_ints("stride_bh", "stride_bt", "stride_u_h", "stride_u_t", "stride_cnt_h", "budget", "u_cap",
                         "block_size"))
    union_bitmap = dict(WORDS="*i32", **_ptrs("*i32", "TILE_Q0", "TILE_NQ", "TILE_POS0", "UB"), UBITS="*i64",
                        UCNT="*i32", **_ints("stride_wh", "stride_wt", "stride_u_h", "stride_u_t", "stride_cnt_h",
                                             "u_cap", "block_size"))
    row_bitmap = dict(BI="*i32", WORDS="*i32", **_ints("n_rows", "budget", "stride_bh", "stride_bt", "stride_wh",
                                                       "stride_wt"))
    fwd = dict(Q="*bf16", K="tensordesc<bf16[64, 128]>", V="tensordesc<bf16[64, 128]>", O="*bf16", R="*bf16",
               LSE="*fp32", UB="*i32", UBITS="*i64", UCNT="*i32",
               **_ptrs("*i32", "TILE_SEQ", "TILE_Q0", "TILE_NQ", "TILE_POS0", "CU_K"),
               **_ints("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_ot",
                       "stride_oh", "stride_rt", "stride_rh", "stride_lse_h", "stride_u_h", "stride_u_t",
                       "stride_cnt_h", "n_tiles"),
               scale_log2="fp32")
    dq = dict(fwd, DO="*bf16", DELTA="*fp32", DQ="*fp32",
              **_ints("stride_dot", "stride_doh", "stride_dqt", "stride_dqh"), scale="fp32")
    dkdv = dict(_ptrs("*bf16", "Q", "K", "V", "DO"), LSE="*fp32", DELTA="*fp32", DK="*fp32", DV="*fp32",
                **_ptrs("*i32", "CH_GB", "CH_START", "CH_END", "E_TOK", "GB_SEQ", "GB_BLK", "CU_Q", "CU_K"),
                **_ints("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_dot",
                        "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh", "stride_lse_h",
                        "stride_ch_h", "stride_e_h"), scale="fp32", scale_log2="fp32")
    stage1 = dict(G=16, GP=16, BLOCK_T=8, TG=8, BLOCK_N=64, BLOCK_D=128, KS1=32, ST1=16, TO_F32=False, PREC="tf32",
                  DECODE=False, PDL=False)
    kernels = {}
    if score_sm90.HAVE_GLUON:  # the Gluon kernel: a descriptor argument whose type names its shared layout
        lay = score_sm90.gl.NVMMASharedLayout.get_default_for([64, 128], score_sm90.gl.bfloat16)
        sm90 = dict(q_ptr="*bf16", k_desc=f"tensordesc<bf16[64, 128],{lay!r}>", lse_ptr="*fp32", ws_ptr="*fp32",
                    **_ptrs("*i32", *lay_names, "c1_start_ptr", "c1_len_ptr"),
                    **_ints("stride_qt", "stride_qh", "stride_lt", "stride_wh", "stride_wr", "tile_base", "n_tiles",
                            "nb_ws"), qk_scale="fp32")
        kernels["score_sm90"] = (score_sm90._score_kernel_sm90, sm90,
                                 dict(G=16, GP=16, BLOCK_T=8, D=128, KS1=32, ST1=16, R=4, L=2, BS=64, LOCAL=32, INIT=1,
                                      STAGES=score_sm90._STAGES, PAIRS=score_sm90._PAIRS, GROUP=0))
        kernels["score_sm90_ws"] = (score_sm90._score_kernel_sm90_ws, sm90,
                                    dict(G=16, GP=16, BLOCK_T=8, D=128, KS1=32, ST1=16, R=4, L=2, BS=64, LOCAL=32,
                                         INIT=1, STAGES=score_sm90._WS_STAGES,
                                         CONSUMER_REGS=score_sm90._WS_CONSUMER_REGS))
        desc = f"tensordesc<bf16[64, 128],{lay!r}>"
        lse90 = dict(q_ptr="*bf16", k1_desc=desc, k2_desc=desc, lse_ptr="*fp32",
                     **_ptrs("*i32", *lay_names, "c1_start_ptr", "c1_len_ptr", "c2_start_ptr", "c2_len_ptr"),
                     **_ints("stride_qt", "stride_qh", "stride_lt", "n_tiles"), qk_scale="fp32")
        kernels["lse_sm90"] = (lse_sm90._lse_kernel_sm90, lse90,
                               dict(G=16, GP=16, D=128, KS1=32, ST1=16, KS2=128, ST2=64, LSE_APPROX=True,
                                    **lse_sm90._SETTINGS[128]))
        fwd_sm90 = dict(q_ptr="*bf16", k_desc=f"tensordesc<bf16[64, 128],{lay!r}>",
                        v_desc=f"tensordesc<bf16[64, 128],{lay!r}>", o_ptr="*bf16", r_ptr="*bf16", lse_ptr="*fp32",
                        ub_ptr="*i32", ubits_ptr="*i64", ucnt_ptr="*i32",
                        **_ptrs("*i32", "tile_seq_ptr", "tile_q0_ptr", "tile_nq_ptr", "tile_pos0_ptr", "cu_k_ptr"),
                        **_ints("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_rt", "stride_rh",
                                "stride_lse_h", "stride_u_h", "stride_u_t", "stride_cnt_h"), scale_log2="fp32")
        kernels["fwd_sm90"] = (sparse_fwd_sm90._sparse_fwd_kernel_sm90, fwd_sm90,
                               dict(G=16, T=4, D=128, STORE_RESID=False, **sparse_fwd_sm90._SETTINGS[128]))
        kernels["fwd_sm90_ws"] = (sparse_fwd_sm90._sparse_fwd_kernel_sm90_ws, fwd_sm90,
                                  dict(G=16, T=4, D=128, STORE_RESID=False, **sparse_fwd_sm90._WS_SETTINGS[128]))
    return kernels | {
        "score": (selection._score_kernel, score,
                  dict(stage1, R=4, L=2, BS=64, LOCAL=32, INIT=1, TRANS=True, NSP=1)),
        "lse": (selection._lse_kernel, lse, dict(stage1, KS2=128, ST2=64, LSE_APPROX=True)),
        "select": (selection._select_kernel, select,
                   dict(BLOCK_T=8, SEL_T=1, BLOCK_NB=2048, BUDGET_P=128, BS=64, LOCAL=32, INIT=1, DECODE=False,
                        PDL=False, SCAN_RUN=16,
                        **dict(zip(("SEARCH_BISECT", "SEARCH_CLAMP", "SEARCH_TIGHT"), selection._TOPK_SEARCH)))),
        "dq": (sparse_attention._sparse_bwd_dq_kernel, dq,
               dict(G=16, T=4, BLOCK_M=64, BLOCK_N=64, D=128, NB=1, UPCAST=False, PREC="tf32", HAS_RESID=True,
                    EXACT_DELTA=True, TMA=True, ROW_MASK=True)),
        "dkdv": (sparse_attention._sparse_bwd_dkdv_kernel, dkdv,
                 dict(G=16, T=4, BLOCK_M=64, BLOCK_N=64, D=128, UPCAST=False, PREC="tf32")),
        # the union build by a sort: 12-token tiles, 12 x 96 candidates as 2048 keys (--warps 16; the warp-specialised
        # forward's plan uses the bitmap build instead, "union_bitmap" --warps 2)
        "union": (sparse_attention._tile_union_kernel, union,
                  dict(T=12, TB=2048, PAD=sparse_attention._PAD_KEY, TOK_BITS=sparse_attention._MAX_TOKENS_PER_TILE)),
        "union_bitmap": (sparse_attention._tile_union_bitmap_kernel, union_bitmap, dict(W=64)),
        "row_bitmap": (sparse_attention._row_bitmap_kernel, row_bitmap, dict(W=64, ROWS=16, BP=128)),
        "fwd": (sparse_attention._sparse_fwd_kernel, fwd,
                dict(G=16, T=4, BLOCK_M=64, BLOCK_N=64, D=128, NB=1, UPCAST=False, PREC="tf32", STORE_RESID=False,
                     TMA=True, ROW_MASK=True)),
    }


def _value(text):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def loop_mixes(sass: str):
    """(first address, last address, Counter of opcodes) for each backward branch's loop body."""
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            ins.append((addr, m.group(2)))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA\b.*?\.(L_x_\d+)", text)
        if m and labels.get(m.group(1), addr + 1) < addr:
            lo = labels[m.group(1)]
            body = [t for a, t in ins if lo <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            loops.append((lo, addr, ops))
    return loops, len(ins)


def main():
    kernels = _kernels()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=sorted(kernels))
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=None, help="default: 2 (stage 1) or 3 (fwd)")
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--sass", metavar="FILE", help="also write the whole disassembly there (to diff two versions)")
    ap.add_argument("--ir", metavar="FILE", help="also write the TTGIR and the LLVM IR there (where barriers come from)")
    args = ap.parse_args()
    fn, sig, cx = kernels[args.kernel]
    for d in args.defines:
        name, _, val = d.partition("=")
        if name not in cx:
            raise SystemExit(f"-D {name}: not a constexpr of {args.kernel} ({', '.join(cx)})")
        cx[name] = _value(val)
    sg = dict(sig, **{n: "constexpr" for n in cx})
    # the JIT's specialisation of real launches: pointers and 16-divisible integers (strides, d) carry divisibility
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in sig and (sig[n].startswith("*") or n.startswith("stride") or n == "D")}
    opts = dict(num_warps=args.warps, num_stages=args.stages or (3 if args.kernel in ("fwd", "dkdv") else 2))
    if args.maxnreg:
        opts["maxnreg"] = args.maxnreg
    src = (GluonASTSource if args.kernel.endswith("_sm90") else ASTSource)(fn, sg, cx, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                          check=True).stdout
    os.unlink(f.name)
    if args.sass:
        with open(args.sass, "w") as out:
            out.write(sass)
    if args.ir:
        with open(args.ir, "w") as out:
            out.write(k.asm["ttgir"] + "\n\n" + k.asm["llir"])
    regs = re.search(r"REG:(\d+)", usage)
    spill = re.search(r"STACK:(\d+)", usage)
    print(f"{args.kernel}: triton {triton.__version__}, sm90, {opts}")
    print(f"registers {regs.group(1) if regs else '?'}, stack {spill.group(1) if spill else '?'} B, "
          f"shared memory {k.metadata.shared} B")
    loops, total = loop_mixes(sass)
    print(f"{total} instructions in all")
    for lo, hi, ops in loops:
        print(f"loop {lo:#x}-{hi:#x}: {sum(ops.values())} instructions per iteration: "
              + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()
