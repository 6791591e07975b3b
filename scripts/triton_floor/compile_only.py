"""pytest plugin for ``run.sh <version> compile``: the Triton kernels compiled for an sm_90 GPU on a machine without
one. A stand-in driver reports the target; every launch becomes a warm-up, which compiles the kernel through
TTIR -> TTGIR -> LLIR -> PTX -> cubin (Triton's bundled ptxas) and launches nothing, so the tests' results are
garbage and only compile errors count: one JSON line a kernel and outcome in $COMPILE_LOG."""
import json
import os
import traceback

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

try:
    from triton.runtime.driver import driver as _driver
except ImportError:  # older layout
    from triton.runtime import driver as _driver

LOG = os.environ.get("COMPILE_LOG", "compile_log.jsonl")


def _bench(fn, *args, quantiles=None, **kwargs):  # autotuning: every config "takes" the same time
    fn()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class StandInDriver:
    def is_active(self): return True
    def get_current_device(self): return 0
    def set_current_device(self, device): pass
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", int(os.environ.get("COMPILE_CC", "90")), 32)
    def get_active_torch_device(self): return torch.device("cpu")
    def get_device_interface(self): return torch.cuda
    def get_benchmarker(self): return _bench
    def get_empty_cache_for_benchmark(self): return torch.empty(16, dtype=torch.int8)
    def clear_cache(self, cache): pass
    def map_python_to_cpp_type(self, ty): return ty


_driver.set_active(StandInDriver())
import triton.runtime.autotuner as _autotuner  # noqa: E402
import triton.testing as _testing  # noqa: E402

_testing.do_bench = _autotuner.do_bench = _bench
_run, _logged = JITFunction.run, set()


def _log(record):
    key = (record["kernel"], record.get("error", "ok")[:200])
    if key not in _logged:
        _logged.add(key)
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def _compile_instead(self, *args, grid=None, warmup=False, **kwargs):
    name = getattr(self, "__name__", None) or self.fn.__name__
    try:
        _run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as err:
        where = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in traceback.extract_tb(err.__traceback__)
                 if "infllmv2" in f.filename][-1:]
        _log(dict(kernel=name, ok=False, error=f"{type(err).__name__}: {str(err)[:600]}", where=where))
        raise
    _log(dict(kernel=name, ok=True))


JITFunction.run = _compile_instead

if os.environ.get("COMPILE_ALL_BRANCHES") == "1":
    # the sparse attention takes its union and TMA kernels for CUDA tensors or under the interpreter: here neither
    import infllmv2.ops.triton.sparse_attention as _sparse_attention
    _sparse_attention._INTERPRET = True
