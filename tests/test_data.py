"""Offline data pipeline: byte tokenizer, long documents, packing, length buckets, RULER rows."""
import os

import numpy as np
import pytest

from infllmv2.data import (PAPER_BUCKETS, ByteTokenizer, LengthBuckets, TrainingStream, build_documents,
                           encode_documents, list_source_files, pack_tokens, source_roots)
from infllmv2.evaluation import TASKS, generate_sample, training_sample

TOK = ByteTokenizer()
PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/infllmv2"


def test_tokenizer_round_trip():
    for text in ["", "hello world", "def f(x):\n    return x * 2\n", "héllo ☃ 日本語 🚀", "\x00\t\r\n"]:
        ids = TOK.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert TOK.decode(ids) == text
        full = TOK.encode(text, add_bos=True, add_eos=True)
        assert full[0] == TOK.bos_token_id and full[-1] == TOK.eos_token_id
        assert TOK.decode(full) == text  # specials skipped
    assert TOK.decode([104, 105, TOK.eos_token_id], skip_special_tokens=False) == "hi</s>"
    assert TOK.vocab_size == 259 and TOK.padded_vocab_size >= TOK.vocab_size
    assert np.array_equal(TOK.encode_np("abc é"), np.array(TOK.encode("abc é")))
    with pytest.raises(TypeError):
        TOK.encode(b"bytes")


def _tree(tmp_path):
    for folder, n in (("pkg_a", 5), ("pkg_b", 3), ("pkg_b/sub", 4)):
        os.makedirs(tmp_path / folder, exist_ok=True)
        for i in range(n):
            (tmp_path / folder / f"m{i}.py").write_text(f"# {folder} {i}\n" + "x = 1\n" * (200 + 37 * i))
    (tmp_path / "notes.txt").write_text("not python")
    return str(tmp_path)


def test_documents_long_and_deterministic(tmp_path):
    root = _tree(tmp_path)
    files = list_source_files([root])
    assert len(files) == 12 and files == sorted(files)
    docs = build_documents([root], min_chars=4000)
    assert docs == build_documents([root], min_chars=4000)
    assert len(docs) >= 2
    assert all(len(d) >= 4000 for d in docs)
    text = "".join(docs)
    for _, rel in files:  # every file is in, once, in sorted order
        assert text.count(f"# File: {rel}\n") == 1
    positions = [text.index(f"# File: {rel}\n") for _, rel in files]
    assert positions == sorted(positions)
    with pytest.raises(FileNotFoundError):
        source_roots([str(tmp_path / "missing")])


def test_documents_from_stdlib():
    docs = build_documents(min_chars=100_000, max_documents=2)
    assert len(docs) == 2 and all(len(d) >= 100_000 for d in docs)
    assert docs[0].startswith("# File: ")
    assert source_roots(["stdlib"])  # the interpreter's standard library is found


def test_packing_shapes():
    stream = encode_documents(["abc", "defgh"], TOK)
    assert stream.tolist() == [97, 98, 99, 258, 100, 101, 102, 103, 104, 258]
    rows = pack_tokens(stream, 4)
    assert rows.shape == (2, 4) and rows.dtype == np.int32
    assert rows.reshape(-1).tolist() == stream[:8].tolist()
    padded = pack_tokens(stream, 4, drop_last=False)
    assert padded.shape == (3, 4) and padded[-1].tolist() == [104, 258, 256, 256]
    with pytest.raises(ValueError):
        pack_tokens(stream, 0)


def _stream_tokens():
    return encode_documents(build_documents([PKG], min_chars=8192), TOK)


def test_rows_deterministic_and_segmented():
    tokens = _stream_tokens()
    s = TrainingStream(tokens, 512, seed=3, buckets=LengthBuckets.parse("0-0.25:0.5,0.25-1:0.5"))
    b1, b2 = s.batch(range(6)), s.batch(range(6))
    for k in ("input_ids", "position_ids", "labels"):
        assert b1[k].shape == (6, 512)
        assert b1[k].equal(b2[k])
    assert not b1["input_ids"][0].equal(s.batch([7])["input_ids"][0])
    for i in range(6):
        r = s.row(i)
        assert sum(r.segments) == 512
        starts = np.flatnonzero(r.position_ids == 0)
        assert starts.tolist() == np.cumsum([0] + r.segments[:-1]).tolist()
        assert (r.labels[starts] == -100).all()
        nz = r.labels != -100
        assert (r.labels[nz] == r.input_ids[nz]).all()
    one = TrainingStream(tokens, 256, seed=0)  # pretraining: one segment per row
    assert one.row(0).segments == [256] and one.row(0).position_ids.tolist() == list(range(256))


def test_bucket_mix_ratios():
    tokens = _stream_tokens()
    buckets = LengthBuckets.parse("0-0.125:0.4,0.125-0.5:0.35,0.5-1:0.25")
    s = TrainingStream(tokens, 1024, seed=0, buckets=buckets)
    scaled = buckets.scaled(1024)
    assert scaled.bounds == (0, 128, 512, 1024)
    frac = np.zeros(3)
    for i in range(600):
        segs = s.row(i).segments
        full = [n for n in segs[:-1]] or segs  # the last segment may be clipped to the row
        b = scaled.bucket_of(max(full))
        frac[b] += 1
    frac /= frac.sum()
    assert np.allclose(frac, [0.4, 0.35, 0.25], atol=0.06), frac
    for i in range(50):  # segment lengths stay inside their bucket (bar the clipped last one)
        segs = s.row(i).segments
        assert len({scaled.bucket_of(n) for n in segs[:-1]}) <= 1
    assert PAPER_BUCKETS.scaled(32768).bounds == (0, 4096, 12288, 24576, 32768)
    assert abs(sum(PAPER_BUCKETS.probs) - 1) < 1e-12
    with pytest.raises(ValueError):
        LengthBuckets.parse("0-0.5:1,0.6-1:1")
    with pytest.raises(ValueError):
        LengthBuckets.parse("garbage")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 2777])
def test_ruler_samples_length_and_answers(task, length):
    depth = 0.3 if task in ("niah_single", "niah_multikey", "passkey", "vt") else None
    s = generate_sample(task, TOK, length, seed=5, depth=depth)
    assert len(s.input_ids) == length
    text = TOK.decode(s.input_ids)
    for a in s.answers:
        assert a in text
    if s.needle_positions:
        first = s.needle_positions[0]
        needle = TOK.decode(s.input_ids[first:first + s.needle_lengths[0]])
        if task in ("niah_single", "niah_multikey", "passkey"):
            assert s.answers[0] in needle
        if depth is not None:  # at the stated depth of the context (header/question are a few % of it)
            assert abs(first / length - depth) < 0.1, (first / length, depth)


def test_ruler_depths_in_order():
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = generate_sample("passkey", TOK, 4096, seed=1, depth=depth)
        assert abs(s.needle_positions[0] / 4096 - depth) < 0.06
        assert s.answers[0] in TOK.decode(s.input_ids[s.needle_positions[0]:][:s.needle_lengths[0]])


def test_training_samples_and_mix():
    for seed in range(6):
        ids = training_sample(TOK, 1500, seed)
        assert len(ids) == 1500 and ids[-1] == TOK.eos_token_id
        text = TOK.decode(ids)
        # the completion after the answer prefix holds the answers
        assert text.rstrip().split("\n")[-1].count(",") >= 0
    tokens = _stream_tokens()
    s = TrainingStream(tokens, 2048, seed=0, buckets=LengthBuckets.parse("0.5-1:1"), ruler_ratio=0.5,
                       tokenizer=TOK)
    kinds = [s.row(i).kind for i in range(40)]
    assert 0.25 <= kinds.count("ruler") / 40 <= 0.75
    r = next(s.row(i) for i in range(40) if s.row(i).kind == "ruler")
    assert r.input_ids.shape == (2048,) and TOK.eos_token_id in r.input_ids.tolist()
    assert "special magic" in TOK.decode(r.input_ids) or "pass key" in TOK.decode(r.input_ids) \
        or "VAR " in TOK.decode(r.input_ids) or "words" in TOK.decode(r.input_ids)
