"""scripts/adaptation.sh (issue 5's experiment) end to end in miniature on the CPU: pretrain, three
fine-tuning arms, evaluation of each, and the summary in the issue's schema."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_pipeline_writes_summary(tmp_path):
    env = dict(os.environ, SCALE="cpu-smoke", OUT_DIR=str(tmp_path / "adaptation"), PY=sys.executable,
               HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # CPU runs use the torch path; no kernels needed here
    # in two runs, as two GPU calls would: pretraining, then the arms from its saved weights
    for stages in ("pretrain", "arms"):
        subprocess.run(["bash", str(ROOT / "scripts" / "adaptation.sh")], check=True, cwd=ROOT,
                       env=dict(env, STAGES=stages), capture_output=True, timeout=900)
    s = json.loads((tmp_path / "adaptation" / "summary.json").read_text())
    assert {"command", "model", "pretrain", "finetune", "loss_first_steps", "ruler", "long_ppl"} <= set(s)
    for arm in ("full", "infllmv2", "nsa"):
        losses = s["loss_first_steps"][arm]
        assert len(losses) == 12 and all(0 < x < 10 for x in losses)
    assert set(s["ruler"]) == {"full", "infllmv2_sparse", "infllmv2_dense", "nsa"}
    for row in s["ruler"].values():
        assert 0.0 <= row["avg"] <= 1.0
    assert (tmp_path / "adaptation" / "loss_switch.png").read_bytes()[:4] == b"\x89PNG"
    # Fine-tuning starts from the pretrained weights: its first loss is far below a fresh model's ln(vocab).
    assert s["loss_first_steps"]["full"][0] < 4.0


@pytest.mark.parametrize("folder", ["smollm2_adaptation", "smollm2_adaptation_600steps"])
def test_smollm2_adaptation_summary_reproduces_from_its_results(tmp_path, folder):
    """scripts/smollm2_adaptation.sh's summary (ARMS=summary: no runs) rebuilt from the committed H200 results
    equals the committed table, sample-by-sample comparison included; an empty folder is refused with a message."""
    import shutil

    results = ROOT / "results" / folder
    shutil.copytree(results, tmp_path / "r")
    (tmp_path / "r" / "summary.md").unlink()
    env = dict(os.environ, ARMS="summary", OUT_DIR=str(tmp_path / "r"), PY=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "smollm2_adaptation.sh")], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=120)
    assert (tmp_path / "r" / "summary.md").read_text() == (results / "summary.md").read_text()
    empty = subprocess.run(["bash", str(ROOT / "scripts" / "smollm2_adaptation.sh")], cwd=ROOT, capture_output=True,
                           text=True, env=dict(env, OUT_DIR=str(tmp_path / "empty")), timeout=120)
    assert empty.returncode != 0 and "no evaluation results" in empty.stderr


def test_smollm2_600steps_comparisons_reproduce_from_their_results(tmp_path, capsys):
    """The committed `infllmv2 compare` tables of the 48-sample evaluations, rebuilt from the committed results
    with the command each names."""
    import shlex

    from infllmv2 import cli

    base = ROOT / "results" / "smollm2_adaptation_600steps" / "samples48"
    folders = sorted(base.glob("compare_*"))
    assert len(folders) == 3
    for folder in folders:
        argv = shlex.split(json.loads((folder / "compare.json").read_text())["command"])[1:]
        out = argv.index("--out") + 1
        argv[out] = str(tmp_path / folder.name)
        cwd = os.getcwd()
        os.chdir(ROOT)  # the command names the results relative to the repository
        try:
            assert cli.main(argv) == 0
        finally:
            os.chdir(cwd)
        assert (tmp_path / folder.name / "compare.md").read_text() == (folder / "compare.md").read_text()
    capsys.readouterr()
