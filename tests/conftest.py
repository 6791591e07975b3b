"""Test set-up. Triton kernels run through Triton's interpreter on machines without a GPU: the
variable must be set before any kernel module is imported (decorated)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# under pytest-xdist the workers share the cores: one thread each (the interpreter's kernels are single-threaded)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
