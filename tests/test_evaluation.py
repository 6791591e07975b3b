"""The long-context suite: generators (deterministic, exact length), scorers, a tiny model end to end."""
import collections
import glob
import json
import math
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
    # in any order: niah_multivalue's needles sit at random depths and cwe's words have equal counts, so the prompt
    # fixes no order (a perfect answer in order of appearance scored 0)
    assert exact_match(" 222, 111", ["111", "222"]) == 1.0
    assert exact_match(" 222, 333", ["111", "222"]) == 0.0 and exact_match(" 111", ["111", "222"]) == 0.0
    assert exact_match(" 111, 111, 222", ["111", "222"]) == 0.0
    s = generate_sample("niah_multivalue", TOK, 1200, seed=0)
    in_text = sorted(s.answers, key=lambda a: TOK.decode(s.input_ids).find(a))
    assert score_sample(s, " " + ", ".join(in_text)) == {"recall": 1.0, "exact": 1.0}
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


def test_perplexity_of_several_documents_combines_losses_as_a_mean(tiny, monkeypatch):
    """Documents of equal length: ppl is exp(mean NLL), and nll the mean NLL (it was a geometric mean of the losses,
    below the mean, so exp(nll) != ppl)."""
    from infllmv2 import evaluation

    losses = iter([1.0, 3.0])

    def stub(model, ids):
        nll = next(losses)
        return {"ppl": math.exp(nll), "nll": nll, "ppl_second_half": math.exp(nll)}

    monkeypatch.setattr(evaluation, "perplexity", stub)
    res = evaluate(tiny, TOK, [300], modes=("dense",), tasks=("ppl",), samples=2, progress=False, log=None,
                   ppl_roots=[PKG])
    got = res["long_ppl"]["dense"]["300"]
    assert got["nll"] == pytest.approx(2.0) and got["ppl"] == pytest.approx(math.exp(2.0))


def test_eval_of_an_nsa_model_refuses_sparse_flags_and_records_its_own_config(tmp_path, capsys):
    """Mode nsa runs the model's own selection config: sparse flags did nothing, yet results.json recorded them.
    Flags that differ from it are refused; equal ones (scripts/adaptation.sh passes every arm the same) pass."""
    import copy

    from infllmv2 import cli
    from infllmv2.train import NSA_KEY, convert_to_nsa

    model = convert_to_nsa(copy.deepcopy(build_model("tiny", max_position=1024)), SMALL.replace(topk=4))
    folder = tmp_path / "nsa"
    model.save_pretrained(folder)
    (folder / "infllmv2_tokenizer.json").write_text('{"type": "byte"}')
    argv = ["eval", "--model", str(folder), "--lengths", "300", "--samples", "1", "--modes", "nsa", "--tasks", "ppl",
            "--ppl-data", PKG, "--device", "cpu", "--no-progress", "--backend", "torch"]
    assert cli.main(argv + ["--topk", "2", "--out", str(tmp_path / "a")]) == 2
    assert "NSA model runs the selection it was trained with" in capsys.readouterr().err
    assert cli.main(argv + ["--topk", "4", "--out", str(tmp_path / "b")]) == 0  # its own value: no conflict
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["sparse_config"] == getattr(model.config, NSA_KEY) and data["sparse_config"]["topk"] == 4


def test_eval_command_line_errors_name_the_flag(tiny, tmp_path, capsys):
    """Counts that make no sense and devices torch cannot use are command-line errors naming the flag: --samples 0
    ran the suite and failed in the plot, --max-new-tokens -4 answered nothing and exited 0, a bad --device came out
    as torch's traceback."""
    from infllmv2 import cli

    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    (folder / "infllmv2_tokenizer.json").write_text('{"type": "byte"}')
    argv = ["eval", "--model", str(folder), "--lengths", "300", "--modes", "dense", "--tasks", "passkey",
            "--no-progress", "--out", str(tmp_path / "ev")]
    for flags in (["--samples", "0"], ["--samples", "-2"], ["--max-new-tokens", "-4"], ["--max-new-tokens", "0"],
                  ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(argv + flags)
        assert flags[0] in capsys.readouterr().err
    devices = [("bogus", "--device 'bogus' is not a device")]
    if not torch.cuda.is_available():
        devices.append(("cuda", "--device cuda: CUDA is not available"))
    for device, message in devices:
        assert cli.main(argv + ["--samples", "1", "--device", device]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()  # nothing ran


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


# --------------------------------------------------------------------------------------------------
# infllmv2 compare: two runs on the same samples, sample by sample
# --------------------------------------------------------------------------------------------------
def _brute_sign_p(wins, losses):
    """The sign test by enumerating every +/- assignment of the untied samples (an independent reference)."""
    import itertools

    n = wins + losses
    if n == 0:
        return 1.0
    extreme = sum(min(sum(v), n - sum(v)) <= min(wins, losses) for v in itertools.product((0, 1), repeat=n))
    return min(1.0, extreme / 2 ** n)


@pytest.mark.parametrize("wins,losses", [(0, 0), (1, 0), (5, 5), (12, 1), (3, 0), (0, 9), (7, 2), (6, 4)])
def test_sign_test_p_equals_enumeration(wins, losses):
    from infllmv2.evaluation import sign_test_p

    assert sign_test_p(wins, losses) == pytest.approx(_brute_sign_p(wins, losses), rel=1e-12)


def _fake_results(modes, recalls, answers_of=lambda task, seed: [f"{task}{seed}"]):
    """An `evaluate` result with given per-sample recalls: {mode: {task: [recall of seed 0, 1, ...]}}."""
    rows = [{"mode": m, "length": 1024, "task": t, "seed": i, "depth": None, "answers": answers_of(t, i),
             "prediction": "", "recall": r, "exact": float(r == 1.0)}
            for m in modes for t, rs in recalls[m].items() for i, r in enumerate(rs)]
    return {"modes": list(modes), "haystack": "noise", "samples_detail": rows}


def test_compare_counts_each_sample_and_pools_the_tasks():
    from infllmv2.evaluation import compare_results, compare_table, sign_test_p

    a = _fake_results(["dense", "sparse"], {"dense": {"niah_single": [1, 1, 1, 1]},
                                            "sparse": {"niah_single": [1, 1, 0, 1], "niah_multikey": [0.5, 1, 0, 1]}})
    b = _fake_results(["sparse"], {"sparse": {"niah_single": [0, 1, 0, 0], "niah_multikey": [0.25, 1, 1, 1, 1]}})
    cmp = compare_results(a, b)  # the shared mode only, and seeds 0-3 of niah_multikey (B has a fifth)
    rows = {r["task"]: r for r in cmp["rows"]}
    assert [r["mode_a"] for r in cmp["rows"]] == ["sparse"] * 3
    assert rows["niah_single"] == {"mode_a": "sparse", "mode_b": "sparse", "length": 1024, "task": "niah_single",
                                   "n": 4, "recall_a": 0.75, "recall_b": 0.25, "a_higher": 2, "b_higher": 0,
                                   "p": pytest.approx(0.5)}
    mk = rows["niah_multikey"]  # a fractional recall counts as higher or lower too
    assert (mk["n"], mk["a_higher"], mk["b_higher"], mk["recall_b"]) == (4, 1, 1, pytest.approx(0.8125))
    assert (rows["all"]["n"], rows["all"]["a_higher"], rows["all"]["b_higher"]) == (8, 3, 1)
    assert rows["all"]["p"] == pytest.approx(sign_test_p(3, 1))
    # two modes of one run: A's sparse against A's dense
    own = compare_results(a, a, "sparse", "dense")
    assert [(r["task"], r["a_higher"], r["b_higher"]) for r in own["rows"]] == [("niah_single", 0, 1), ("all", 0, 1)]
    assert "| sparse | sparse | 1024 | niah_single | 4 | 0.750 | 0.250 | 2 | 0 | 0.5 |" in compare_table(cmp)


def test_compare_refuses_other_samples_and_missing_modes():
    from infllmv2.evaluation import compare_results

    a = _fake_results(["sparse"], {"sparse": {"passkey": [1, 0]}})
    other = _fake_results(["sparse"], {"sparse": {"passkey": [1, 0]}}, answers_of=lambda t, s: [f"x{s}"])
    with pytest.raises(ValueError, match="not run on the same samples"):
        compare_results(a, other)
    with pytest.raises(ValueError, match="B has no mode 'dense'"):
        compare_results(a, a, "sparse", "dense")
    with pytest.raises(ValueError, match="share no mode"):
        compare_results(a, _fake_results(["dense"], {"dense": {"passkey": [1]}}))
    with pytest.raises(ValueError, match="A has no per-sample results"):
        compare_results({"modes": ["sparse"]}, a)
    with pytest.raises(ValueError, match="B has no per-sample results"):
        compare_results(a, [1, 2])  # JSON, but not an eval result


def test_compare_command_on_two_eval_runs(tiny, tmp_path, capsys):
    """Two `infllmv2 eval` runs of the same model and seed answer the same samples the same way (every sample a
    tie); the command writes the table and JSON, and names a bad argument."""
    from infllmv2 import cli

    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    (folder / "infllmv2_tokenizer.json").write_text('{"type": "byte"}')
    common = ["--model", str(folder), "--lengths", "512", "--samples", "2", "--modes", "dense,sparse", "--tasks",
              "passkey,niah_single", "--depths", "0.5", "--device", "cpu", "--no-progress", "--max-new-tokens", "4",
              "--block-size", "64", "--kernel-size", "32", "--kernel-stride", "16", "--window", "64", "--topk", "2",
              "--dense-len", "-1"]
    for name in ("r1", "r2"):
        assert cli.main(["eval", *common, "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "r1"), str(tmp_path / "r2" / "results.json"), "--out",
                     str(tmp_path / "cmp")]) == 0
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["command"].startswith("infllmv2 compare ")
    assert {(r["mode_a"], r["task"], r["n"], r["a_higher"], r["b_higher"], r["p"]) for r in data["rows"]} == {
        (m, t, n, 0, 0, 1.0) for m in ("dense", "sparse") for t, n in (("niah_single", 2), ("passkey", 2), ("all", 4))}
    assert (tmp_path / "cmp" / "compare.md").read_text() in capsys.readouterr().out
    # another seed asks other questions, another haystack hides the same needles elsewhere: refused, not compared
    assert cli.main(["eval", *common, "--seed", "7", "--out", str(tmp_path / "r3")]) == 0
    assert cli.main(["compare", str(tmp_path / "r1"), str(tmp_path / "r3")]) == 2
    assert "share no sample" in capsys.readouterr().err
    assert cli.main(["eval", *common, "--haystack", "code", "--out", str(tmp_path / "r4")]) == 0
    assert cli.main(["compare", str(tmp_path / "r1"), str(tmp_path / "r4")]) == 2
    assert "not run on the same samples: needles in a 'noise' haystack" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "r1"), str(tmp_path / "nowhere")]) == 2
    assert "B: no results file" in capsys.readouterr().err
