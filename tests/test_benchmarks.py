"""The attention benchmark's offline re-rendering (--replot): merges runs into one json/md with the ratios."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(path, ms, **kw):
    return dict(path=path, n=131072, hq=32, hkv=2, d=128, ms=ms, peak_extra_mib=None, visible_blocks=kw.pop(
        "visible_blocks", None), pattern=kw.pop("pattern", None), **kw)


def test_replot_merges_runs(tmp_path):
    head = dict(gpu="GPU", torch="t", triton="tr", date="2026-11-28")
    full = dict(head, command="python3 benchmarks/bench_attention.py", errors=[], rows=[
        _row("cudnn_fwd", 260.0), _row("infllmv2_fwd", 80.0, visible_blocks=96, pattern="local")])
    dec = dict(head, command=["python3 benchmarks/bench_attention.py --decode-only"], errors=["x failed"], rows=[
        _row("decode_step", 0.0625, visible_blocks=96, pattern="random", mode="cuda_graph", batch=8),
        _row("dense_decode_step", 0.25, mode="cuda_graph", batch=8)])
    files = []
    for i, r in enumerate((full, dec)):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_attention.py"), "--replot", *map(str, files),
                    "--out-dir", str(out)], check=True, capture_output=True, cwd=ROOT)
    res = json.loads((out / "attention_h200.json").read_text())
    assert len(res["rows"]) == 4 and res["errors"] == ["x failed"] and len(res["command"]) == 2
    md = (out / "attention_h200.md").read_text()
    assert "| complete fwd vs cuDNN fwd | 131072 | local | 3.25x |" in md
    assert "| decode step vs dense SDPA decode, batch 8, cuda_graph | 131072 | random | 4.00x |" in md
    assert "| decode_step (cuda_graph) | 131072 | 32/2/128 | 96 | random | 0.062 |" in md


def _topk_search_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("topk_search_steps", ROOT / "benchmarks/topk_search_steps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_topk_search_transcription_finds_each_rows_threshold():
    """benchmarks/topk_search_steps.py's NumPy transcription of the top-k kernel's threshold search, under the
    default and extreme settings, on rows built to be hard (every key equal, long runs of ties, keys spread over
    the whole exponent range, one candidate) and on real pooled rows: its threshold selects exactly the sort's
    top `need` keys (ties to lower blocks), and it ends within 2 x 32 steps."""
    import numpy as np
    from infllmv2.config import SparseConfig
    from infllmv2.ops import naive
    from infllmv2.ops.triton import selection
    import torch
    mod = _topk_search_module()
    rng = np.random.default_rng(0)
    f32 = lambda a: np.asarray(a, np.float32).view(np.int32).astype(np.int64)  # noqa: E731
    rows = [(f32(np.ones(300)), 40), (f32(np.repeat(rng.random(30), 10)), 57), (f32(2.0 ** -np.arange(126)), 9),
            (f32(rng.integers(0, 4, 500)), 100), (f32(rng.random(2048) ** 8), 62), (f32([0.5]), 1)]
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=5, dense_len=-1)
    q, k = torch.randn(24, 8, 16), torch.randn(700, 2, 16)
    pooled = mod.pooled_scores(q, k, cfg)
    # the pooling without the reference's mask equals the reference's
    assert torch.allclose(pooled, naive.block_scores(q, k, cfg, 16 ** -0.5), rtol=1e-6, atol=0)
    keys, needs = mod.search_rows(pooled, 700, cfg)
    rows += [(key, need) for key, need in zip(keys, needs)]
    for setting in {selection._TOPK_SEARCH, (2, 0.0, 1 << 30), (4, 0.2, 0), (1, 0.2, 0), (1000, 0.45, 0)}:
        for key, need in rows:
            thr, cnt_ge, cnt_gt, steps = mod.search(key, need, *setting)
            assert steps <= 64, (setting, steps)
            assert cnt_ge == int((key >= thr).sum()) >= need
            if cnt_ge > need:  # ended on a tie: hi = thr + 1
                assert cnt_gt == int((key > thr).sum())
            # the kernel's selection: keys > thr, and keys == thr of rank < need - cnt_hi
            chosen = np.flatnonzero(key > thr).tolist() + np.flatnonzero(key == thr)[:need - cnt_gt].tolist()
            order = sorted(np.flatnonzero(key >= 0), key=lambda b: (-key[b], b))  # stable: lower block first
            assert sorted(chosen) == sorted(order[:need]), setting
    # the search seeded by a guess (the previous row's threshold): brackets that hold the threshold, miss it below or
    # above, or have no guess, select the sort's top `need` keys too
    for key, need in rows:
        order = sorted(np.flatnonzero(key >= 0), key=lambda b: (-key[b], b))
        thr0 = mod.search(key, need, *selection._TOPK_SEARCH)[0]
        for guess in (None, thr0, thr0 + 5, int(key.max()) + 1000, 0):
            for delta in (1, 1 << 20):
                thr, cnt_ge, cnt_gt, _ = mod.search_seeded(key, need, guess, delta, *selection._TOPK_SEARCH)
                assert cnt_ge == int((key >= thr).sum()) >= need
                if cnt_ge > need:
                    assert cnt_gt == int((key > thr).sum())
                chosen = np.flatnonzero(key > thr).tolist() + np.flatnonzero(key == thr)[:need - cnt_gt].tolist()
                assert sorted(chosen) == sorted(order[:need]), (guess, delta)


def test_e2e_tiny_runs_both_paths_and_its_decode_check_passes(tmp_path):
    """``bench_e2e.py --tiny``: the e2e model (fused QKV / gate-up products, residual adds in the products' epilogue)
    on the CPU; its check asserts that a sparse decode step whose budget covers the cache gives the dense step's
    logits, and a failed check lands in ``errors``."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_e2e.py"), "--tiny", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny check: sparse decode step (covering budget) == dense decode step (logits)" in run.stdout
    res = json.loads((tmp_path / "e2e_h200.json").read_text())
    assert res["errors"] == [] and res["model"] == "tiny"
    paths = {(r["path"], r["n"]) for r in res["rows"]}
    for path in ("dense_prefill", "infllmv2_prefill", "dense_decode", "infllmv2_decode"):
        assert {(path, 256), (path, 384)} <= paths, path


def test_e2e_int4_weight_rounds_to_its_group_grid_and_its_kernel_multiplies_by_it():
    """``bench_e2e.Int4Weight`` (``--weights int4``): every weight lands within half a step of its group's 16-level
    grid from the group's min to its max (an independent quantizer here), and torch's int4 kernel multiplies by exactly
    the dequantized weight, up to bf16 rounding; bad shapes are refused."""
    import pytest
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_e2e
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    g = torch.Generator().manual_seed(0)
    k, n = 256, 48
    w = torch.randn(k, n, generator=g) * torch.linspace(0.1, 3.0, n)  # columns of different ranges
    q = bench_e2e.Int4Weight(w)
    groups = w.t().reshape(n, k // 128, 128)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    per_weight = lambda t: t.reshape(n, -1).repeat_interleave(128, 1).t()  # noqa: E731  (n, k/128, 1) -> (k, n)
    deq = q.dequantize()
    # scale and zero are stored in bf16 (relative rounding <= 2^-8), zero = lo + 8 scale from the rounded scale: level
    # j's value moves by at most 2^-8 |zero| + (8 + |j - 8|) 2^-8 step <= 2^-8 (|zero| + 16 step), a small part of a
    # step; every weight lands on a level j = 0..15 of that grid, within half a step of its value
    moved = per_weight(2.0 ** -8 * (1.01 * (lo + 8 * step).abs() + 16 * step))
    assert (moved < 0.1 * per_weight(step)).all()
    level = (deq - per_weight(lo)) / per_weight(step)
    assert ((level - level.round()).abs() * per_weight(step) <= moved).all()
    assert level.round().min() == 0 and level.round().max() == 15
    assert ((deq - w).abs() <= per_weight(step) / 2 + moved).all()
    x = torch.randn(5, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ deq
    torch.testing.assert_close(bench_e2e.linear(x, q).float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    with pytest.raises(ValueError, match="int4 weights need"):
        bench_e2e.Int4Weight(torch.randn(200, 48))


def test_e2e_tiny_int4_decode_runs_and_checks_its_products(tmp_path):
    """``bench_e2e.py --tiny --decode-only --weights int4``: every path's decode step on 4-bit weights, the run's own
    product check recorded, and the prefill refused with int4 by name."""
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_e2e.py"), "--tiny", "--out-dir", str(tmp_path), "--weights",
           "int4"]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode != 0 and "--weights int4 needs --decode-only" in bad.stderr
    run = subprocess.run(cmd + ["--decode-only", "--floor", "--lengths", "256"], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny check: sparse decode step (covering budget) == dense decode step (logits)" in run.stdout
    res = json.loads((tmp_path / "e2e_h200.json").read_text())
    assert res["errors"] == [] and res["weights"] == "int4"
    checks = [r for r in res["rows"] if r["path"] == "int4_check"]
    assert len(checks) == 5 and all(r["rel_err"] < 1e-2 for r in checks)
    assert {r["path"] for r in res["rows"] if r["path"] != "int4_check"} == {
        "dense_decode", "infllmv2_decode", "no_attention_decode"}


def test_generate_tiny_runs_every_row_and_its_check_passes(tmp_path):
    """``bench_generate.py --tiny``: transformers' generate() on a small Llama, dense and ``infllmv2.enable``d, every
    row (time to first token on both patterns, eager and static-cache decode steps); its check asserts that with a
    budget covering the sequence the enabled model generates the dense model's tokens. ``--replot`` re-renders the
    table from the JSON alone."""
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_generate.py"), "--tiny", "--out-dir", str(tmp_path),
           "--new-tokens", "4", "--eager-tokens", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiny check: enabled model with a covering budget generates the dense tokens" in run.stdout
    res = json.loads((tmp_path / "generate_h200.json").read_text())
    assert res["errors"] == [] and res["model"] == "tiny"
    got = {(r["path"], r["n"], r.get("pattern")) for r in res["rows"]}
    for n in (192, 256):
        assert {("dense_ttft", n, None), ("infllmv2_ttft", n, "random"), ("infllmv2_ttft", n, "local"),
                ("dense_decode_eager", n, None), ("infllmv2_decode_eager", n, "random")} <= got
    assert {("dense_decode_compiled", 256, None), ("infllmv2_decode_compiled", 256, None)} <= got
    assert all(r["ms"] > 0 for r in res["rows"])
    table = (tmp_path / "generate_h200.md").read_text()
    (tmp_path / "generate_h200.md").unlink()
    again = tmp_path / "again"
    rp = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_generate.py"), "--replot",
                         str(tmp_path / "generate_h200.json"), "--out-dir", str(again)], capture_output=True, text=True,
                        cwd=ROOT, timeout=600)
    assert rp.returncode == 0, rp.stderr[-2000:]
    assert (again / "generate_h200.md").read_text() == table


def test_e2e_ab_variants_set_and_restore_module_attributes():
    """``benchmarks/e2e_ab.py``'s variants: each sets ``module.ATTR`` of ``infllmv2.ops.triton`` for its turn, the
    next variant starts from the defaults again, and an attribute the module lacks is refused by name."""
    import pytest
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import e2e_ab
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from infllmv2.ops.triton import selection, sparse_attention as SA
    bins, seed_tile = SA.UNION_BITMAP_MAX_BINS, selection._SELECT_TILE
    use = e2e_ab._setter()
    use({"name": "a", "sparse_attention.UNION_BITMAP_MAX_BINS": 0, "selection._SELECT_TILE": 512})
    assert (SA.UNION_BITMAP_MAX_BINS, selection._SELECT_TILE) == (0, 512)
    use({"name": "b", "selection._SELECT_TILE": 256})
    assert (SA.UNION_BITMAP_MAX_BINS, selection._SELECT_TILE) == (bins, 256)
    use({})
    assert (SA.UNION_BITMAP_MAX_BINS, selection._SELECT_TILE) == (bins, seed_tile)
    with pytest.raises(SystemExit, match="NO_SUCH"):
        use({"name": "c", "selection.NO_SUCH": 1})


def test_generate_without_compiled_decode_times_eager_steps_only(tmp_path):
    """``bench_generate.py --no-compiled-decode``: time to first token and eager decode rows, no compiled ones; it
    excludes ``--compiled-decode-only``."""
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_generate.py"), "--tiny", "--out-dir", str(tmp_path),
           "--lengths", "192", "--patterns", "random", "--eager-tokens", "2"]
    run = subprocess.run(cmd + ["--no-compiled-decode"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((tmp_path / "generate_h200.json").read_text())
    assert res["errors"] == []
    assert {r["path"] for r in res["rows"]} == {"dense_ttft", "infllmv2_ttft", "dense_decode_eager",
                                                "infllmv2_decode_eager"}
    both = subprocess.run(cmd + ["--no-compiled-decode", "--compiled-decode-only"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_profile_decode_host_mocked_launches_times_each_variant(tmp_path):
    """``profile_decode_host.py --mock-launches`` (CPU): the host time of each decode variant, Triton launches as
    no-ops (at 20000 tokens the selection runs too), and with ``--attention-functions`` the time inside each
    attention function of eager decode steps; the JSON names its command."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    decode = ("decode", "decode_custom_op", "decode_custom_op_triton_cdiv")
    for extra, want in ((["--lengths", "20000"], {(20000, v) for v in decode}),
                        (["--lengths", "600", "--attention-functions", "--steps", "3"],
                         {(600, v) for v in decode + ("sdpa_attention_function", "infllmv2_attention_function")})):
        out = tmp_path / extra[1]
        out.mkdir()
        cmd = [sys.executable, str(ROOT / "benchmarks/profile_decode_host.py"), "--mock-launches", "--calls", "3"]
        run = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env=dict(env, OUT=str(out)))
        assert run.returncode == 0, run.stderr[-2000:]
        res = json.loads((out / "profile_decode_host.json").read_text())
        assert res["command"].endswith(" ".join(["--mock-launches", "--calls", "3"] + extra))
        assert {(r["n"], r["variant"]) for r in res["rows"]} == want
        assert all(r["host_us"] > 0 and r["gpu_us"] is None for r in res["rows"])
