import pytest
from hypothesis import given, strategies as st

from infllmv2 import SparseConfig


def test_defaults_match_minicpm4():
    c = SparseConfig()
    assert (c.block_size, c.kernel_size, c.kernel_stride, c.init_blocks) == (64, 32, 16, 1)
    assert (c.window_size, c.topk, c.dense_len, c.lse_approx, c.use_nope) == (2048, 64, 8192, True, False)
    assert c.local_blocks == 32 and c.budget == 96
    assert (c.coarse_kernel_size, c.coarse_kernel_stride) == (128, 64)


def test_from_minicpm4_dict_roundtrip():
    d = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
         "topk": 64, "use_nope": False, "dense_len": 8192}
    c = SparseConfig.from_dict(d)
    assert c == SparseConfig()
    assert SparseConfig.from_dict(c.to_dict()) == c


def test_switch_threshold():
    c = SparseConfig(dense_len=100)
    assert not c.is_sparse(99) and c.is_sparse(100)
    assert SparseConfig(dense_len=-1).is_sparse(0)


@pytest.mark.parametrize("changes, field", [
    ({"block_size": 40}, "block_size"),          # not a multiple of the stride
    ({"kernel_size": 40}, "kernel_size"),        # not a multiple of the stride
    ({"window_size": 100}, "window_size"),       # not a multiple of block_size
    ({"block_size": 0}, "block_size"),
    ({"kernel_stride": -16}, "kernel_stride"),
    ({"init_blocks": -1}, "init_blocks"),
    ({"topk": 1, "init_blocks": 1}, "topk"),     # forced blocks would not fit
    ({"dense_len": -5}, "dense_len"),
])
def test_inconsistent_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        SparseConfig(**changes)


@pytest.mark.parametrize("changes, field", [({"block_size": 64.0}, "block_size"), ({"lse_approx": 1}, "lse_approx"),
                                            ({"topk": True}, "topk")])
def test_wrong_types(changes, field):
    with pytest.raises(TypeError, match=field):
        SparseConfig(**changes)


def test_unknown_dict_key():
    with pytest.raises(ValueError, match="unknown keys.*topK"):
        SparseConfig.from_dict({"topK": 3})


@given(stride=st.integers(1, 16), lc_mult=st.integers(1, 4), b_mult=st.integers(1, 8), w_blocks=st.integers(0, 8),
       init=st.integers(0, 3), extra=st.integers(0, 10))
def test_valid_configs_have_consistent_budget(stride, lc_mult, b_mult, w_blocks, init, extra):
    c = SparseConfig(block_size=stride * b_mult, kernel_size=stride * lc_mult, kernel_stride=stride,
                     window_size=stride * b_mult * w_blocks, init_blocks=init, topk=init + 1 + extra)
    assert c.local_blocks == w_blocks
    assert c.budget >= c.init_blocks + c.local_blocks + 1  # the forced blocks always fit
