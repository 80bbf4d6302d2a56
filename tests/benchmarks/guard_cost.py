"""Guard costs on a GPU: the NaN check, the guarded call, the repair, a real CUDA OOM."""

import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, ".")
from mps_helpers import _call, _nan_guard, _oom_retry
from mps_helpers.testing import sd15_pipeline

dev = "cuda"
res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}


def cuda_time(f, n=200):
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


for shape in [(1, 3, 512, 512), (4, 3, 512, 512), (4, 4, 64, 64)]:
    x = torch.randn(shape, device=dev, dtype=torch.float16)
    res[f"check_ms {shape}"] = cuda_time(lambda x=x: _nan_guard.has_non_finite(x))
    res[f"isfinite_all_ms {shape}"] = cuda_time(lambda x=x: bool(torch.isfinite(x).all()))

# A real CUDA out-of-memory error.
try:
    torch.empty(2**40, dtype=torch.uint8, device=dev)
except Exception as exc:
    res["oom_type"] = type(exc).__module__ + "." + type(exc).__qualname__
    res["oom_recognised"] = _oom_retry.is_out_of_memory(exc)
    res["oom_message_head"] = str(exc)[:120]
t = time.perf_counter()
_oom_retry.free_device_memory()
res["free_device_memory_ms"] = (time.perf_counter() - t) * 1e3


@dataclasses.dataclass(frozen=True)
class P:
    device: str = "cuda"
    nan_guard: bool = True
    oom_retry: bool = True
    memory_watch: bool = False
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    batch_to_loop: bool = False

    def replace(self, **c):
        c.pop("reasons", None)
        return dataclasses.replace(self, **c)


tries = []


def run_all(kw, plan):
    tries.append(plan)
    if len(tries) == 1:
        torch.empty(2**40, dtype=torch.uint8, device=dev)
    return "ok"


with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    res["recovery_result"] = _call.call_with_recovery(
        object(), P(), run_all, {}, reapply=lambda pipe, plan: None
    )
res["recovery_warning"] = [x.category.__name__ for x in w]

t = time.perf_counter()
pipe = sd15_pipeline().to(dev, torch.float16)
pipe.set_progress_bar_config(disable=True)
res["build_s"] = time.perf_counter() - t
kw = {
    "prompt": "an astronaut riding a horse",
    "num_inference_steps": 20,
    "height": 512,
    "width": 512,
    "output_type": "np",
}


def timed(f, n=5):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return ts, out


def raw():
    return pipe(**kw, generator=torch.Generator().manual_seed(0))


def guarded():
    return _nan_guard.call_with_nan_guard(
        pipe, P(), pipe.__call__, dict(kw, generator=torch.Generator().manual_seed(0))
    )


raw()
guarded()
r_all, g_all = [], []
for _ in range(4):
    r, out_r = timed(raw, 2)
    g, out_g = timed(guarded, 2)
    r_all += r
    g_all += g
res["raw_s"] = r_all
res["guarded_s"] = g_all
res["raw_median_s"] = statistics.median(r_all)
res["guarded_median_s"] = statistics.median(g_all)
res["raw_finite"] = bool(np.isfinite(out_r.images).all())
res["guarded_equal_raw"] = bool(np.array_equal(out_r.images, out_g.images))

# Repair: make the VAE overflow in float16 only, as SDXL's does.
with torch.no_grad():
    pipe.vae.decoder.conv_in.weight.mul_(1e5)
    pipe.vae.decoder.conv_in.bias.mul_(1e5)
res["overflow_raw_finite"] = bool(np.isfinite(raw().images).all())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ts1, out1 = timed(guarded, 1)  # first: half decode, check, float32 decode
    ts2, out2 = timed(guarded, 3)  # later: float32 decode straight away
res["repair_warnings"] = [x.category.__name__ for x in w]
res["repair_first_s"] = ts1
res["repair_later_s"] = ts2
res["repair_finite"] = bool(np.isfinite(out1.images).all() and np.isfinite(out2.images).all())
res["vae_dtype_after"] = str(pipe.vae.dtype)
print(json.dumps(res, indent=1))
with open(os.environ.get("OUT", ".") + "/bench.json", "w") as fh:
    fh.write(json.dumps(res, indent=1))
