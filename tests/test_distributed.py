"""Tests of mps_helpers.generate: one process, simulated processes, and a real 2-process launch.

The launch test starts ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU) on
``tests/_distributed_worker.py`` once for the module and compares what each process got
with a one-process run in this process. Equivalence is "max abs difference <= 1e-4" on
images in [0, 1], as in test_call.py (a batch of 3 and a batch of 2 against a batch of 5:
see EVIDENCE.md, "Batch versus loop: exactness").
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mps_helpers
from mps_helpers import _distributed
from mps_helpers._distributed import collect, launched_processes, share_kwargs
from mps_helpers._errors import BatchError, DistributedGenerationError
from mps_helpers.testing import tiny_pipeline

HERE = Path(__file__).parent
TOLERANCE = 1e-4
PROMPTS = ["a red cube", "a blue ball", "a green cone", "a cat", "a dog"]
NEGATIVE = ["blurry", "dark", "noisy", "flat", "grey"]
SIZE: dict[str, Any] = {"height": 32, "width": 32, "num_inference_steps": 2}
SEED = 100  # the worker's seeds: image i uses SEED + i
LAUNCH_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever launched pytest, the tests in this process run outside a launch.
    for name in (*LAUNCH_VARS, "LOCAL_RANK", "RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)


def generators(n: int, seed: int = SEED) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The five prompts generated in this one process (what every launch must reproduce)."""
    out = mps_helpers.generate(
        tiny_pipeline("sd"),
        PROMPTS,
        negative_prompt=NEGATIVE,
        generator=generators(len(PROMPTS)),
        output_type="np",
        **SIZE,
    )
    images: np.ndarray = out.images
    return images


# ---------------------------------------------------------------------------------------
# One process


def test_one_process_is_the_prepared_call(reference: np.ndarray) -> None:
    pipe = tiny_pipeline("sd")
    out = mps_helpers.generate(
        pipe, PROMPTS, negative_prompt=NEGATIVE, generator=generators(5), output_type="np", **SIZE
    )
    # generate prepared the pipeline; calling it directly gives the same images.
    assert mps_helpers.plan_of(pipe) is not None
    direct = pipe(
        prompt=PROMPTS,
        negative_prompt=NEGATIVE,
        generator=generators(5),
        output_type="np",
        **SIZE,
    )
    np.testing.assert_array_equal(out.images, direct.images)
    np.testing.assert_array_equal(out.images, reference)


def test_seeds_are_one_cpu_generator_per_image(reference: np.ndarray) -> None:
    pipe = tiny_pipeline("sd")
    out = mps_helpers.generate(pipe, PROMPTS, negative_prompt=NEGATIVE, seeds=SEED, **SIZE)
    as_list = mps_helpers.generate(
        pipe,
        PROMPTS,
        negative_prompt=NEGATIVE,
        seeds=[SEED + i for i in range(5)],
        output_type="np",
        **SIZE,
    )
    np.testing.assert_array_equal(as_list.images, reference)
    # The default output type (PIL) and the one keyword int seed mean the same images.
    pil = np.stack([np.asarray(image) for image in out.images]) / 255.0
    assert np.abs(pil - reference).max() <= 1 / 255 + TOLERANCE


def test_a_single_prompt_string_is_one_prompt() -> None:
    out = mps_helpers.generate(tiny_pipeline("sd"), "a cat", seeds=1, output_type="np", **SIZE)
    assert out.images.shape == (1, 32, 32, 3)


def test_without_accelerate_a_launch_runs_everything_here(
    monkeypatch: pytest.MonkeyPatch, reference: np.ndarray
) -> None:
    for name in ("accelerate", "accelerate.state", "accelerate.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(RuntimeWarning, match=r"accelerate is not installed.*distributed"):
        out = mps_helpers.generate(
            tiny_pipeline("sd"),
            PROMPTS,
            negative_prompt=NEGATIVE,
            generator=generators(5),
            output_type="np",
            **SIZE,
        )
    np.testing.assert_array_equal(out.images, reference)


def test_outside_a_launch_accelerate_is_not_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    # No warning (warnings are errors here) and no import of accelerate.
    for name in ("accelerate", "accelerate.state", "accelerate.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    out = mps_helpers.generate(tiny_pipeline("sd"), PROMPTS[:2], seeds=0, gather="all", **SIZE)
    assert len(out.images) == 2


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, 1),
        ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, 1),
        ({"WORLD_SIZE": "4"}, 4),
        ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
        ({"WORLD_SIZE": "two"}, 1),
        ({"ACCELERATE_USE_CPU": "True"}, 1),
    ],
)
def test_launched_processes_reads_the_launchers_variables(
    environ: dict[str, str], expected: int
) -> None:
    assert launched_processes(environ) == expected


# ---------------------------------------------------------------------------------------
# Arguments, checked before any work


@pytest.fixture(scope="module")
def pipe() -> Any:
    return mps_helpers.prepare_pipeline(tiny_pipeline("sd"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"gather": "everyone"},
            ValueError,
            r"gather must be one of 'main', 'all'; got 'ev",
        ),
        ({"prompt": ["x"]}, TypeError, r"second argument"),
        ({"seeds": [1, 2]}, ValueError, r"seeds has 2 items but the call makes 5 images"),
        ({"seeds": 1, "generator": generators(5)}, ValueError, r"seeds= or generator="),
        ({"seeds": "1"}, ValueError, r"seeds must be an int or a list"),
        ({"seeds": [1.5] * 5}, ValueError, r"seeds must be integers"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch,
    pipe: Any,
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    calls = spy_on(monkeypatch, pipe)
    with pytest.raises(error, match=match):
        mps_helpers.generate(pipe, PROMPTS, **kwargs)
    assert calls == []


def test_seeds_cover_every_image(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
    calls = spy_on(monkeypatch, pipe)
    mps_helpers.generate(pipe, PROMPTS, seeds=3, num_images_per_prompt=2, generator=None)
    seeds = [g.initial_seed() for g in calls[0]["generator"]]
    assert seeds == list(range(3, 13))
    assert all(g.device.type == "cpu" for g in calls[0]["generator"])


def spy_on(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> list[dict[str, Any]]:
    """Replace the prepared pipeline's call by a recorder with the same signature."""
    calls: list[dict[str, Any]] = []
    original = type(pipe).__call__

    @functools.wraps(original)
    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(kwargs)

    monkeypatch.setattr(type(pipe), "__call__", record)
    return calls


def test_empty_and_non_string_prompts_are_refused(pipe: Any) -> None:
    with pytest.raises(ValueError, match="prompts is empty"):
        mps_helpers.generate(pipe, [])
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
        mps_helpers.generate(pipe, [1, 2])


# ---------------------------------------------------------------------------------------
# Several processes simulated in this one: the share each gets, and the merge


@dataclasses.dataclass
class FakeState:
    """The part of accelerate's PartialState that generate() reads, for one process."""

    process_index: int
    num_processes: int = 2
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def split_between_processes(self, inputs: list[int]) -> Any:
        import contextlib

        # accelerate's rule: contiguous runs, the first processes one longer.
        per, extra = divmod(len(inputs), self.num_processes)
        start = self.process_index * per + min(self.process_index, extra)
        stop = start + per + (1 if self.process_index < extra else 0)
        return contextlib.nullcontext(inputs[start:stop])


def simulate(
    monkeypatch: pytest.MonkeyPatch, pipes: list[Any], prompts: list[str], **kwargs: Any
) -> list[Any]:
    """Run generate() as each of len(pipes) processes in turn (the last first); return each.

    Only the main process (run last) receives every share: the others see only those sent
    before them, so use this with ``gather="main"``.
    """
    processes = len(pipes)
    sent: dict[int, Any] = {}

    def gather(state: Any, share: Any, *, to_all: bool) -> list[Any] | None:
        sent[state.process_index] = share
        if to_all or state.is_main_process:
            return [sent[i] for i in sorted(sent)]
        return None

    monkeypatch.setattr(_distributed, "_gather", gather)
    results: list[Any] = [None] * processes
    for rank in reversed(range(processes)):
        state = FakeState(rank, processes)
        monkeypatch.setattr(_distributed, "_process_state", lambda state=state: state)
        results[rank] = mps_helpers.generate(pipes[rank], prompts, **kwargs)
    return results


def test_simulated_uneven_split_keeps_prompt_order(
    monkeypatch: pytest.MonkeyPatch, reference: np.ndarray
) -> None:
    pipes = [tiny_pipeline("sd"), tiny_pipeline("sd")]
    main, other = simulate(
        monkeypatch,
        pipes,
        PROMPTS,
        negative_prompt=NEGATIVE,
        generator=generators(5),
        output_type="np",
        **SIZE,
    )
    assert other is None
    assert np.abs(main.images - reference).max() <= TOLERANCE


def test_simulated_three_processes_num_images_per_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = tiny_pipeline("sd")
    kwargs: dict[str, Any] = {"num_images_per_prompt": 2, "output_type": "np", **SIZE}
    one = mps_helpers.generate(pipe, PROMPTS[:4], seeds=7, **kwargs)
    main, *others = simulate(monkeypatch, [pipe] * 3, PROMPTS[:4], seeds=7, **kwargs)
    assert others == [None, None]
    assert main.images.shape == (8, 32, 32, 3)
    assert np.abs(main.images - one.images).max() <= TOLERANCE


def test_simulated_shared_generator_is_refused(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
    with pytest.raises(ValueError, match=r"one shared generator cannot give the same images"):
        simulate(monkeypatch, [pipe, pipe], PROMPTS, generator=torch.Generator(), **SIZE)


def test_simulated_no_generator_warns_on_the_main_process(
    monkeypatch: pytest.MonkeyPatch, pipe: Any
) -> None:
    with pytest.warns(UserWarning, match=r"no generator list or seeds") as caught:
        simulate(monkeypatch, [pipe, pipe], PROMPTS[:2], output_type="np", **SIZE)
    assert len(caught) == 1


def test_simulated_length_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch, pipe: Any) -> None:
    with pytest.raises(ValueError, match=r"negative_prompt has 2 items but the batch has 5"):
        simulate(monkeypatch, [pipe, pipe], PROMPTS, negative_prompt=["a", "b"], seeds=0, **SIZE)


def test_share_kwargs_cuts_per_prompt_arguments_and_keeps_shared_ones() -> None:
    from mps_helpers._batch import split_batch

    latents = torch.arange(10.0).reshape(5, 2)
    timesteps = [999, 500]
    kwargs: dict[str, Any] = {
        "prompt": PROMPTS,
        "negative_prompt": "ugly",
        "latents": latents,
        "timesteps": timesteps,
    }
    items = split_batch(kwargs, 5)
    share = share_kwargs(kwargs, items, [3, 4])
    assert share["prompt"] == PROMPTS[3:]
    assert share["negative_prompt"] == "ugly"
    assert share["timesteps"] is timesteps
    assert torch.equal(share["latents"], latents[3:])


def test_share_kwargs_joins_nested_and_flat_controlnet_images() -> None:
    from mps_helpers._batch import split_batch

    nested = [[f"p{i}-net1", f"p{i}-net2"] for i in range(5)]
    items = split_batch({"prompt": PROMPTS, "image": nested}, 5, multi_control=2)
    share = share_kwargs({"prompt": PROMPTS, "image": nested}, items, [1, 3], multi_control=True)
    assert share["image"] == [nested[1], nested[3]]
    batch, shared = torch.arange(5.0).reshape(5, 1, 1, 1), object()
    flat = {"prompt": PROMPTS, "image": [batch, shared]}
    items = split_batch(flat, 5, multi_control=2)
    share = share_kwargs(flat, items, [1, 3], multi_control=True)
    assert share["image"][1] is shared
    assert share["image"][0].flatten().tolist() == [1.0, 3.0]


# ---------------------------------------------------------------------------------------
# Collecting the shares


@dataclasses.dataclass(frozen=True)
class Output:
    images: list[str]
    nsfw_content_detected: list[bool] | None


def share(process: int, indices: tuple[int, ...], done: int, error: str | None = None) -> Any:
    output = Output([f"img{i}" for i in indices[:done]], None) if done else None
    return _distributed._Share(process, indices, done, output, error)


def test_collect_merges_in_prompt_order_whatever_the_arrival_order() -> None:
    shares = [share(2, (5, 6), 2), share(0, (0, 1, 2), 3), share(3, (), 0), share(1, (3, 4), 2)]
    merged = collect(shares, 7, 4)
    assert merged == Output([f"img{i}" for i in range(7)], None)


def test_collect_reports_failures_and_keeps_completed_shares() -> None:
    trace = "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: boom"
    shares = [
        share(0, (0, 1, 2), 3),
        share(1, (3, 4, 5), 1, trace),  # a looped batch that finished one prompt
        share(2, (6, 7), 0, "Traceback ...\nValueError: nope"),
        share(3, (8, 9), 2),
    ]
    with pytest.raises(DistributedGenerationError) as caught:
        collect(shares, 10, 4)
    error = caught.value
    assert isinstance(error, BatchError)
    assert error.failed == (4, 5, 6, 7)
    assert error.index == 4
    assert error.completed_indices == (0, 1, 2, 3, 8, 9)
    assert error.completed == Output(["img0", "img1", "img2", "img3", "img8", "img9"], None)
    assert error.errors == {1: trace, 2: "Traceback ...\nValueError: nope"}
    message = str(error)
    assert "4 of 10 prompts were not generated" in message
    assert "process 1 of 4 (prompts 4-5): RuntimeError: CUDA error: boom" in message
    assert "process 2 of 4 (prompts 6-7): ValueError: nope" in message


def test_collect_with_nothing_finished_has_no_completed() -> None:
    with pytest.raises(DistributedGenerationError) as caught:
        collect([share(0, (0,), 0, "E: x"), share(1, (), 0)], 1, 2)
    assert caught.value.completed is None
    assert caught.value.completed_indices == ()


# ---------------------------------------------------------------------------------------
# A real launch: two processes on this CPU (torchrun, gloo)


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """Run the worker under torchrun with 2 processes once; return each rank's results."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs accelerate (the distributed extra)")
    out = tmp_path_factory.mktemp("launch")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPS_HELPERS_TEST_FAIL_RANK="1",
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH", "")])
        ),
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port, no rendezvous server
        "--nproc_per_node",
        "2",
        str(HERE / "_distributed_worker.py"),
        str(out),
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = {}
    for rank in (0, 1):
        with (out / f"rank{rank}.pkl").open("rb") as handle:
            results[rank] = pickle.load(handle)
    return results


@pytest.mark.slow
def test_launch_shares_the_prompts_between_two_processes(launch: dict[int, Any]) -> None:
    assert launch[0]["processes"] == launch[1]["processes"] == 2
    # Uneven: 5 prompts over 2 processes, the first one longer.
    assert launch[0]["main_spans"] == ["process 0: generating prompts 0-2 on cpu:0"]
    assert launch[1]["main_spans"] == ["process 1: generating prompts 3-4 on cpu:0"]


@pytest.mark.slow
def test_launch_gathers_in_prompt_order_on_the_main_process(
    launch: dict[int, Any], reference: np.ndarray
) -> None:
    assert launch[0]["main"].shape == reference.shape
    assert np.abs(launch[0]["main"] - reference).max() <= TOLERANCE
    assert launch[1]["main"] is None


@pytest.mark.slow
def test_launch_gather_all_gives_every_process_the_result(
    launch: dict[int, Any], reference: np.ndarray
) -> None:
    for rank in (0, 1):
        assert np.abs(launch[rank]["all"] - reference).max() <= TOLERANCE


@pytest.mark.slow
def test_launch_with_fewer_prompts_than_processes(launch: dict[int, Any]) -> None:
    one = mps_helpers.generate(tiny_pipeline("sd"), ["solo"], seeds=7, output_type="np", **SIZE)
    assert np.abs(launch[0]["one"] - one.images).max() <= TOLERANCE
    assert launch[1]["one"] is None


@pytest.mark.slow
def test_launch_refuses_a_shared_generator_on_every_process(launch: dict[int, Any]) -> None:
    for rank in (0, 1):
        assert "one shared generator" in launch[rank]["shared_generator"]


@pytest.mark.slow
def test_launch_failure_is_reported_on_the_main_process(
    launch: dict[int, Any], reference: np.ndarray
) -> None:
    failure = launch[0]["fail"]
    assert failure["type"] == "DistributedGenerationError"
    assert failure["failed"] == (3, 4)
    assert failure["index"] == 3
    assert failure["completed_indices"] == (0, 1, 2)
    assert np.abs(failure["completed"] - reference[:3]).max() <= TOLERANCE
    assert list(failure["errors"]) == [1]
    assert "RuntimeError: injected failure in the UNet" in failure["errors"][1]
    assert "process 1 of 2 (prompts 3-4): RuntimeError: injected failure" in failure["message"]
    # The failing process itself returns None: the main process reports.
    assert launch[1]["fail"] is None
