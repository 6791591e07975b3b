# timeline of the fused decode kernel (batch 8 and 1, 128K): per role, when its programs begin, wait, work, end
import json, os, torch
from infllmv2.config import SparseConfig
from infllmv2.ops.triton import decode as D
from infllmv2.ops.triton import infllmv2_decode_triton
res = {}
for b in (8, 1):
    torch.manual_seed(0)
    L = 131072
    q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, L, 2, 128, device="cuda", dtype=torch.bfloat16); vc = torch.randn_like(kc)
    sl = torch.full((b,), L, dtype=torch.int32, device="cuda")
    cfg = SparseConfig()
    D._TRACE = torch.zeros(4096 * 5, dtype=torch.int64, device="cuda")
    for _ in range(5):
        infllmv2_decode_triton(q, kc, vc, sl, cfg)
    torch.cuda.synchronize()
    pairs = b * 2
    from infllmv2.ops.triton.selection import _decode_key_splits
    n_lse, _, n_score, _ = _decode_key_splits(b, 2, L, cfg, 64)
    known, n_split = 9, 9 + 21
    t = D._TRACE.view(-1, 5)[: pairs * (n_lse + n_score + n_split)].cpu().double()
    t0 = t[:, 0].min()
    t = (t - t0) / 1000.0  # us
    ends = [pairs * n_lse, pairs * (n_lse + n_score), pairs * (n_lse + n_score + known), len(t)]
    names = ["lse", "score", "known", "chosen"]
    lo = 0; rows = {}
    for nm, hi in zip(names, ends):
        x = t[lo:hi]
        rows[nm] = dict(n=hi - lo, begin=[round(x[:, 0].min().item(), 2), round(x[:, 0].max().item(), 2)],
                        ticket=[round(x[:, 1].min().item(), 2), round(x[:, 1].max().item(), 2)],
                        waited=[round(x[:, 2].min().item(), 2), round(x[:, 2].max().item(), 2)],
                        worked=[round(x[:, 3].min().item(), 2), round(x[:, 3].max().item(), 2)],
                        end=[round(x[:, 4].min().item(), 2), round(x[:, 4].max().item(), 2)],
                        mean_wait=round((x[:, 2] - x[:, 1]).mean().item(), 2),
                        mean_work=round((x[:, 3] - x[:, 2]).mean().item(), 2))
        lo = hi
    res[b] = rows
    print("batch", b)
    for nm, r in rows.items():
        print(" ", nm, r)
    D._TRACE = None
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "fused_trace.json"), "w"), indent=1)
