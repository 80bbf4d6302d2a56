"""One process of tests/test_distributed.py's launch: run generate() scenarios, save results.

Run by ``torchrun --standalone --nproc_per_node 2 tests/_distributed_worker.py OUT_DIR``.
Every process builds the same tiny pipeline and runs the same scenarios; each writes what
generate() returned to it (arrays, None, or the error's fields) to ``OUT_DIR/rank<N>.pkl``.
``MPS_HELPERS_TEST_FAIL_RANK`` names the process whose UNet raises in the "fail" scenario.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

import mps_helpers
from mps_helpers import _probes
from mps_helpers.testing import tiny_pipeline

PROMPTS = ["a red cube", "a blue ball", "a green cone", "a cat", "a dog"]
NEGATIVE = ["blurry", "dark", "noisy", "flat", "grey"]
SIZE: dict[str, Any] = {"height": 32, "width": 32, "num_inference_steps": 2}
SEED = 100


class _Spans(logging.Handler):
    """Record the "generating prompts ..." messages: which prompts this process ran."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "generating prompts" in message:
            self.messages.append(message)


def _images(output: Any) -> Any:
    return None if output is None else output.images


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure in the UNet")


def main(out_dir: Path) -> None:
    """Run every scenario on this process and write the results."""
    torch.set_num_threads(1)
    # The test process computes its float32 reference on a CPU detected without native
    # bfloat16 (tests/conftest.py); plan the same dtype here, whatever this CPU has.
    _probes.cpu_bf16_supported = lambda torch_cpu: False
    spans = _Spans()
    log = logging.getLogger("mps_helpers._distributed")
    log.addHandler(spans)
    log.setLevel(logging.INFO)

    pipe = tiny_pipeline("sd")
    generators = [torch.Generator().manual_seed(SEED + i) for i in range(len(PROMPTS))]
    out = mps_helpers.generate(
        pipe, PROMPTS, negative_prompt=NEGATIVE, generator=generators, output_type="np", **SIZE
    )
    # generate() set accelerate up (a CPU launch: gloo); this is the same shared state.
    state = PartialState()
    results: dict[str, Any] = {"processes": state.num_processes, "rank": state.process_index}
    results["main"] = _images(out)
    results["main_spans"] = list(spans.messages)

    out = mps_helpers.generate(
        pipe, PROMPTS, negative_prompt=NEGATIVE, seeds=SEED, gather="all", output_type="np", **SIZE
    )
    results["all"] = _images(out)

    # One prompt over two processes: process 1 gets nothing to do.
    out = mps_helpers.generate(pipe, ["solo"], seeds=7, output_type="np", **SIZE)
    results["one"] = _images(out)

    try:
        mps_helpers.generate(pipe, PROMPTS, generator=torch.Generator().manual_seed(0), **SIZE)
    except ValueError as error:
        results["shared_generator"] = str(error)

    if state.process_index == int(os.environ.get("MPS_HELPERS_TEST_FAIL_RANK", "-1")):
        pipe.unet.forward = _boom
    try:
        out = mps_helpers.generate(
            pipe, PROMPTS, negative_prompt=NEGATIVE, seeds=SEED, output_type="np", **SIZE
        )
    except mps_helpers.BatchError as error:
        results["fail"] = {
            "type": type(error).__name__,
            "message": str(error),
            "index": error.index,
            "failed": getattr(error, "failed", None),
            "completed_indices": getattr(error, "completed_indices", None),
            "completed": _images(error.completed),
            "errors": getattr(error, "errors", None),
        }
    else:
        results["fail"] = _images(out)

    with (out_dir / f"rank{state.process_index}.pkl").open("wb") as handle:
        pickle.dump(results, handle)
    # Without this, gloo's threads may abort the process at exit.
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
