"""`infllmv2 train` on CUDA: LoRA fine-tuning with the Triton kernels under bf16 autocast (the frozen base in bf16),
from a model with its own (BPE) tokenizer; resuming from a LoRA checkpoint; the merged final model."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("peft")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_train import PKG, _bpe_model_folder  # noqa: E402

from infllmv2 import SparseConfig  # noqa: E402
from infllmv2.data import TokenizerAdapter, load_tokenizer  # noqa: E402
from infllmv2.train import TrainConfig, load_model_folder, read_loss_log, train  # noqa: E402

SPARSE = SparseConfig(block_size=64, kernel_size=32, kernel_stride=16, window_size=256, topk=4, dense_len=-1)


def test_lora_finetune_on_cuda_with_triton_kernels(tmp_path):
    from peft import PeftModel

    _bpe_model_folder(tmp_path / "base", hidden_size=256, num_attention_heads=4)  # head dim 64, for the kernels
    cfg = TrainConfig(out=str(tmp_path / "lora"), init=str(tmp_path / "base"), attention="infllmv2",
                      sparse=SPARSE.to_dict(), backend="triton", seq_len=2048, micro_batch=2, steps=8, lr=3e-3,
                      warmup=1, data=[PKG], doc_min_chars=8192, save_every=4, lora_rank=8, device="cuda",
                      progress=False)
    summary = train(cfg)
    losses = [r["loss"] for r in read_loss_log(os.path.join(cfg.out, "loss.jsonl"))]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert 0 < summary["trainable_params"] < summary["params"] / 5
    assert isinstance(load_tokenizer(os.path.join(cfg.out, "final")), TokenizerAdapter)

    # bf16 autocast: the frozen base was held in bf16, so the merged final is peft's merge into the bf16 base
    final = load_model_folder(os.path.join(cfg.out, "final"), torch.bfloat16).state_dict()
    base = load_model_folder(str(tmp_path / "base"), torch.bfloat16).cuda()
    merged = PeftModel.from_pretrained(base, os.path.join(cfg.out, "final_adapter")).merge_and_unload().state_dict()
    for name, weight in final.items():
        torch.testing.assert_close(weight, merged[name].cpu(), rtol=0, atol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final[q], load_model_folder(str(tmp_path / "base"), torch.bfloat16).state_dict()[q])

    # resumed at step 4 from the LoRA checkpoint: the same losses (the kernels' backward may reorder sums: close)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "cut"))
    train(cut, stop_after=4)
    resumed = train(dataclasses.replace(cut, resume=True))["loss_first_steps"]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses), rtol=2e-3, atol=2e-3)
