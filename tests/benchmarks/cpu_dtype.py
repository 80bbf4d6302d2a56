"""CPU dtype micro-benchmark: float32 against bfloat16 (and float16), with and without the
CPU's native bfloat16 instructions.

The plan chooses bfloat16 on a CPU whose torch backend reports native bfloat16 instructions
(AVX512-BF16 or AMX) and float32 elsewhere. This script measures the two ops that dominate
a Stable Diffusion step (a large matmul and the UNet's 320-channel 3x3 convolution) in each
dtype, once as the machine is and once with those instructions hidden from torch
(``ATEN_CPU_CAPABILITY`` for ATen's kernels, ``ONEDNN_MAX_CPU_ISA`` for oneDNN's
convolutions and matmuls: AVX-512 without its BF16 extension, as on Intel Skylake-SP to Ice
Lake, and AVX2, as on most desktop CPUs before AMD Zen 4), which is how such a CPU runs.
Each setting runs in a fresh process (both variables are read once, at start-up),
single-threaded, after a warm-up.

    python tests/benchmarks/cpu_dtype.py [--repeats 5] [--float16] [--settings NAME...]

float16 is left out by default: on CPUs without AVX512-FP16 its convolution takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import _common

#: The settings measured: the machine as it is, then the instructions of two older CPU
#: families (torch's own kernels and oneDNN's limited to them).
SETTINGS: dict[str, dict[str, str]] = {
    "as is": {},
    "AVX-512 without BF16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def _ops(dtype: Any) -> dict[str, Any]:
    """The two ops, ready to call, with inputs and weights in ``dtype``."""
    import torch

    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    x = torch.randn(2, 320, 64, 64, dtype=dtype)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).to(dtype)
    return {"matmul 1024x1024": lambda: a @ b, "conv 3x3, 320 ch, 64x64, batch 2": lambda: conv(x)}


def _measure(dtypes: list[str], repeats: int) -> dict[str, Any]:
    """Time each op in each dtype in this process; return medians in seconds."""
    import time

    import torch

    from mps_helpers._probes import cpu_bf16_supported

    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        for name in dtypes:
            for op_name, run in _ops(getattr(torch, name)).items():
                run()  # warm-up: first-call dispatch and oneDNN primitive creation
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                seconds[f"{op_name} | {name}"] = _common.median(times)
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_supported": cpu_bf16_supported(torch.cpu),
        "seconds": seconds,
    }


def _child(dtypes: list[str], repeats: int, env: dict[str, str]) -> dict[str, Any]:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import cpu_dtype; "
        "print(json.dumps(cpu_dtype._measure(sys.argv[2].split(','), int(sys.argv[3]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), ",".join(dtypes), str(repeats)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--float16", action="store_true", help="also time float16 (slow)")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="NAME"
    )
    args = parser.parse_args(argv)
    dtypes = ["float32", "bfloat16"] + (["float16"] if args.float16 else [])

    settings = {name: SETTINGS[name] for name in args.settings}
    results = {name: _child(dtypes, args.repeats, env) for name, env in settings.items()}
    rows = []
    for setting, res in results.items():
        secs = res["seconds"]
        for key, value in secs.items():
            op, dtype = key.split(" | ")
            ratio = value / secs[f"{op} | float32"]
            rows.append([setting, res["cpu_capability"], op, dtype, f"{value:.4f}", f"{ratio:.2f}"])
    print(_common.md_table(["setting", "ATen ISA", "op", "dtype", "s (median)", "x float32"], rows))
    _common.write_json(
        args.out / "cpu_dtype.json",
        {
            "machine": _common.machine_info("cpu"),
            "repeats": args.repeats,
            "settings": {k: {"env": settings[k], **v} for k, v in results.items()},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
