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
