"""The long-context suite: generators (deterministic, exact length), scorers, a tiny model end to end."""
import collections
import glob
import json
import os
import re

import pytest
import torch

from infllmv2 import SparseConfig
from infllmv2.data import ByteTokenizer, as_tokenizer
from infllmv2.evaluation import (TASKS, evaluate, exact_match, generate_sample, generate_task, greedy_generate,
                                 perplexity, recall_match, score_sample, set_attention_mode, training_sample)
from infllmv2.train import build_model

TOK = ByteTokenizer()
PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infllmv2")
SMALL = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, window_size=16, topk=2, dense_len=-1)


@pytest.fixture(scope="module")
def bpe():
    """A small BPE Hugging Face tokenizer trained here (no hub): generators must hit exact lengths with it too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([open(f).read() for f in sorted(glob.glob(os.path.join(PKG, "*.py")))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("task", TASKS)
def test_generators_deterministic(task):
    a = generate_sample(task, TOK, 1500, seed=11)
    b = generate_sample(task, TOK, 1500, seed=11)
    c = generate_sample(task, TOK, 1500, seed=12)
    assert a.input_ids == b.input_ids and a.answers == b.answers
    assert a.input_ids != c.input_ids
    assert [s.input_ids for s in generate_task(task, TOK, 1200, 2, seed=3)] == \
        [s.input_ids for s in generate_task(task, TOK, 1200, 2, seed=3)]


@pytest.mark.parametrize("task", TASKS)
def test_exact_length_any_tokenizer(task, bpe):
    tok = as_tokenizer(bpe)
    for length in (700, 1001, 3000):
        s = generate_sample(task, tok, length, seed=2)
        assert len(s.input_ids) == length
        text = tok.decode(s.input_ids)
        for ans in s.answers:
            assert ans in text
    ids = training_sample(bpe, 2000, seed=4)
    assert len(ids) == 2000 and ids[-1] == tok.eos_token_id


def test_code_haystack():
    s = generate_sample("niah_single", TOK, 4000, seed=0, depth=0.5, haystack="code")
    text = TOK.decode(s.input_ids)
    assert len(s.input_ids) == 4000 and s.answers[0] in text
    assert "The grass is green" not in text


def test_word_tasks_answers_are_the_most_frequent():
    s = generate_sample("cwe", TOK, 6000, seed=1)
    words = collections.Counter(re.findall(r"\n- (\w+)", TOK.decode(s.input_ids)))
    top = [w for w, _ in words.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert min(words[a] for a in s.answers) > max(c for w, c in words.items() if w not in s.answers)
    s = generate_sample("fwe", TOK, 6000, seed=1)
    body = TOK.decode(s.input_ids).split("\n")[1]
    counts = collections.Counter(body.split())
    assert [w for w, _ in counts.most_common(3)] == s.answers
    s = generate_sample("vt", TOK, 3000, seed=1)
    text = TOK.decode(s.input_ids)
    assert len(s.answers) == 5
    for prev, cur in zip(s.answers, s.answers[1:]):
        assert f"VAR {cur} = VAR {prev}." in text


def test_scorers():
    assert recall_match(" 1234567", ["1234567"]) == 1.0
    assert recall_match("The number is 1234567.", ["1234567"]) == 1.0
    assert recall_match(" 12345678", ["1234567"]) == 0.0  # whole words only
    assert recall_match(" 7654321", ["1234567"]) == 0.0
    assert recall_match(" 111, 222, 999", ["111", "222", "333", "444"]) == 0.5
    assert recall_match("\n\n aa, BB", ["aa", "bb"]) == 1.0  # leading blank lines skipped, case-insensitive
    assert recall_match(" xx\n1234567", ["1234567"]) == 0.0  # only the first line counts
    assert recall_match("anything", []) == 0.0
    assert exact_match(" 1234567.", ["1234567"]) == 1.0
    assert exact_match(" 111, 222", ["111", "222"]) == 1.0
    assert exact_match(" 1234567 and more", ["1234567"]) == 0.0
    assert exact_match(" 222, 111", ["111", "222"]) == 0.0
    s = generate_sample("niah_multivalue", TOK, 1200, seed=0)
    assert score_sample(s, s.answer_text) == {"recall": 1.0, "exact": 1.0}
    assert score_sample(s, " 0000000")["recall"] == 0.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", max_position=4096).eval()


def test_greedy_generate_matches_recompute(tiny):
    ids = TOK.encode("def main():\n    return")
    fast = greedy_generate(tiny, ids, 6)
    slow = list(ids)
    with torch.no_grad():
        for _ in range(6):
            slow.append(int(tiny(torch.tensor([slow])).logits[0, -1].argmax()))
    assert fast == slow[len(ids):]


def test_greedy_generate_stop_cuts_the_same_tokens(tiny):
    ids = TOK.encode("def main():\n    return")
    full = greedy_generate(tiny, ids, 12)
    cut = greedy_generate(tiny, ids, 12, stop=lambda new: len(new) == 5)
    assert cut == full[:5]


def test_perplexity_modes_agree_when_budget_covers(tiny):
    ids = generate_sample("passkey", TOK, 600, seed=0).input_ids
    set_attention_mode(tiny, "dense")
    dense = perplexity(tiny, ids, chunk=128)
    set_attention_mode(tiny, "infllmv2_dense", SMALL)
    assert abs(perplexity(tiny, ids)["nll"] - dense["nll"]) < 1e-4
    set_attention_mode(tiny, "sparse", SMALL.replace(topk=64))  # budget covers 600 tokens: sparse == dense
    assert abs(perplexity(tiny, ids)["nll"] - dense["nll"]) < 1e-4
    set_attention_mode(tiny, "sparse", SMALL)
    assert abs(perplexity(tiny, ids)["nll"] - dense["nll"]) > 1e-6  # really sparse
    set_attention_mode(tiny, "dense")
    with pytest.raises(ValueError, match="NSA model"):
        set_attention_mode(tiny, "nsa")  # a dense model is no NSA model


def test_tiny_model_through_suite(tiny, tmp_path):
    res = evaluate(tiny, TOK, [1024], modes=("dense", "sparse", "infllmv2_dense"), tasks=("niah_single", "passkey", "ppl"),
                   samples=1, depths=(0.5,), sparse_config=SMALL, progress=False, log=None, ppl_roots=[PKG],
                   max_new_tokens=8)
    assert set(res["summary"]) == {"dense", "sparse", "infllmv2_dense"}
    for mode in res["summary"]:
        sc = res["summary"][mode]["1024"]
        assert 0.0 <= sc["avg"] <= 1.0 and sc["ppl"] > 1.0
    # the same model, saved, through the command-line path: all tasks, JSON + markdown + PNG
    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    (folder / "infllmv2_tokenizer.json").write_text('{"type": "byte"}')
    from infllmv2 import cli

    argv = ["eval", "--model", str(folder), "--lengths", "1024", "--samples", "1", "--modes", "dense", "--out",
            str(tmp_path / "ev"), "--no-progress", "--ppl-data", PKG, "--device", "cpu", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert data["command"] == "infllmv2 " + " ".join(argv)  # the result names the command that produced it
    assert set(data["summary"]["dense"]["1024"]) >= set(TASKS) | {"avg", "ppl"}
    assert "dense" in data["ruler"] and data["long_ppl"]["dense"]["1024"]["ppl"] > 1
    assert (tmp_path / "ev" / "results.png").stat().st_size > 0
    assert "| dense | 1024 |" in (tmp_path / "ev" / "results.md").read_text()


def test_eval_command_runs_the_sparse_config_the_model_was_saved_with(tiny, tmp_path):
    import copy

    from infllmv2 import cli, enable

    folder = tmp_path / "model"
    enable(copy.deepcopy(tiny), SMALL).save_pretrained(folder)  # as `infllmv2 train --attention infllmv2` leaves it
    (folder / "infllmv2_tokenizer.json").write_text('{"type": "byte"}')

    def eval_ppl(*flags):
        out = tmp_path / f"ev{len(flags)}"
        assert cli.main(["eval", "--model", str(folder), "--lengths", "1024", "--samples", "1", "--modes", "sparse",
                         "--tasks", "ppl", "--ppl-data", PKG, "--device", "cpu", "--no-progress", "--out", str(out),
                         *flags]) == 0
        data = json.loads((out / "results.json").read_text())
        return data["sparse_config"], data["long_ppl"]["sparse"]["1024"]["ppl"]

    def direct_ppl(config):
        return evaluate(tiny, TOK, [1024], modes=("sparse",), tasks=("ppl",), samples=1, sparse_config=config,
                        progress=False, log=None, ppl_roots=[PKG])["long_ppl"]["sparse"]["1024"]["ppl"]

    saved, ppl = eval_ppl()  # no flags: the model's own config, not MiniCPM4's (dense below 8K)
    assert saved == SMALL.to_dict() and ppl == pytest.approx(direct_ppl(SMALL), rel=1e-6)
    assert ppl != pytest.approx(direct_ppl(SparseConfig()), rel=1e-6)
    # a flag given overrides that field only
    saved, ppl = eval_ppl("--topk", "64", "--no-lse-approx")
    assert saved == SMALL.replace(topk=64, lse_approx=False).to_dict()
    assert ppl == pytest.approx(direct_ppl(SMALL.replace(topk=64, lse_approx=False)), rel=1e-6)


def test_greedy_generate_of_an_enabled_model_keeps_the_compressed_keys(tiny, monkeypatch):
    """The suite's decoding loop gives an enabled model InfLLM-V2's cache (no plain cache, which pools every key
    again at every step and warns), and the tokens of generate()."""
    import copy
    import warnings

    from infllmv2 import enable
    from infllmv2.models import transformers as integration

    model = enable(copy.deepcopy(tiny), SMALL)
    model.generation_config.eos_token_id = None
    ids = generate_sample("passkey", TOK, 600, seed=0).input_ids
    monkeypatch.setattr(integration, "_WARNED_PLAIN_CACHE", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        new = greedy_generate(model, ids, 6)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert new == ref.tolist()
