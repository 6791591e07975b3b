# prints registers / spills / shared memory of the decode kernels compiled in this process (after a decode call)
import torch
from infllmv2.config import SparseConfig
from infllmv2.ops.triton import decode as D, selection as S
from infllmv2.ops.triton import infllmv2_decode_triton
torch.manual_seed(0)
b, L = 8, 131072
q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
kc = torch.randn(b, L, 2, 128, device="cuda", dtype=torch.bfloat16)
vc = torch.randn_like(kc)
sl = torch.full((b,), L, dtype=torch.int32, device="cuda")
for fused in (False, True):
    D._DECODE_FUSED = fused
    infllmv2_decode_triton(q, kc, vc, sl, SparseConfig())
torch.cuda.synchronize()
for fn in (D._decode_fused_kernel, D._decode_split_kernel, S._score_kernel, S._lse_kernel, S._select_kernel):
    try:
        caches = fn.device_caches
        for dev, c in caches.items():
            kc_ = c[0] if isinstance(c, tuple) else c
            for key, k in kc_.items():
                print(fn.__name__, "regs", getattr(k, "n_regs", None), "spills", getattr(k, "n_spills", None),
                      "shared", getattr(k.metadata, "shared", None), "warps", getattr(k.metadata, "num_warps", None))
    except Exception as e:
        print(fn.__name__, "introspection failed", repr(e))
