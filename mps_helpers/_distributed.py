"""Scale-out: :func:`generate` spreads a prompt list over the processes of a launch.

In one process, :func:`generate` is the prepared call: ``generate(pipe, prompts, **kw)``
returns what ``pipe(prompt=prompts, **kw)`` returns. Under ``accelerate launch`` or
``torchrun`` with N > 1 processes (one device each), every process runs the same script and
the same call; each one prepares its pipeline for its own device (accelerate's
``PartialState().device``), takes a contiguous share of the prompts with accelerate's
``split_between_processes`` together with the matching share of the per-prompt and per-image
arguments (the batch-to-loop adapter's rules, :func:`mps_helpers._batch.split_batch`),
generates it, and the shares are gathered back in prompt order.

Why a function and not an option of ``pipe(...)``: a distributed call is a collective. Every
process must make it, with the same arguments, or the others wait forever; a plain-looking
``pipe(...)`` that silently became one would hide that. ``generate`` says it at the call site,
and it is also the one call that means the same thing in one process and in many.

Reproducibility: a list with one generator per image (or ``seeds=``) gives each image its own
noise, so the images are the same whatever the number of processes. One shared generator
cannot do that (each process would hold its own copy, and each copy would start the noise of
that process's first prompt), so it is refused under N > 1 processes.

accelerate is an optional dependency (the ``distributed`` extra); without it, or outside a
launch, :func:`generate` runs everything in the calling process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import os
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Literal

from mps_helpers._batch import batch_size, bind_call, merge_outputs, merge_values, split_batch
from mps_helpers._errors import BatchError, DistributedGenerationError
from mps_helpers._per_prompt import control_nets
from mps_helpers._util import DEVICES

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import torch

    from mps_helpers._facts import Pipeline
    from mps_helpers._per_prompt import CallRoles

__all__ = ["GATHER_CHOICES", "collect", "generate", "launched_processes", "share_kwargs"]

logger = logging.getLogger(__name__)

#: Where :func:`generate` delivers the full result under several processes.
GATHER_CHOICES: tuple[str, ...] = ("main", "all")

# Environment variables that launchers set to the number of processes: torchrun and
# `accelerate launch` (WORLD_SIZE), and the MPI launchers accelerate supports on CPUs.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
# Accelerator families, besides CUDA, that accelerate gives a distributed backend of its own.
_ACCELERATOR_PROBES = ("is_xpu_available", "is_npu_available", "is_mlu_available")


def generate(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] | None = None,
    gather: Literal["main", "all"] = "main",
    **call_kwargs: Any,
) -> Any:
    """Return the pipeline's result for ``prompts``, spread over the launch's processes.

    In a single process (no launch, or accelerate not installed) this is the prepared call:
    ``pipe(prompt=list(prompts), **call_kwargs)``, after preparing ``pipe`` with
    :func:`mps_helpers.prepare_pipeline` if it was not prepared yet.

    Under ``accelerate launch`` or ``torchrun`` with N > 1 processes, every process must make
    this same call. Each one prepares ``pipe`` for its own device (keeping the options of an
    earlier :func:`~mps_helpers.prepare_pipeline`, with the device replaced), generates its
    contiguous share of the prompts (process 0 the first ones) with the matching share of
    per-prompt arguments (``negative_prompt`` lists, image lists, embeddings) and per-image
    ones (a ``generator`` list, ``latents``), and the shares are gathered in prompt order.

    Args:
        pipe: a diffusers pipeline, prepared or not; each process passes its own copy.
        prompts: one prompt or a list of them.
        seeds: one seed per image (prompts x ``num_images_per_prompt``), or one int ``s`` for
            seeds ``s, s + 1, ...`` in image order; each image gets a CPU
            ``torch.Generator`` seeded with its seed, so an image depends only on its prompt
            and seed (not on the device's random generator, the batch, or the number of
            processes). Not together with ``generator=``.
        gather: under several processes, "main" returns the full result on the main process
            and None on the others; "all" returns it on every process. Ignored in one process.
        **call_kwargs: the pipeline call's other arguments, as for ``pipe(...)``.

    Returns:
        What the pipeline's call returns (its output class, or a tuple with
        ``return_dict=False``), holding every image in prompt order; None on the processes
        other than the main one when ``gather="main"``. Under several processes, tensors
        (``output_type="pt"`` or "latent") come back on the CPU.

    Raises:
        ValueError: ``gather`` is not one of :data:`GATHER_CHOICES`; ``prompts`` is empty;
            ``seeds`` has the wrong length or comes with ``generator``; a per-prompt or
            per-image argument has the wrong length; or, under several processes, a single
            shared ``generator`` (pass one per image, or ``seeds``). Raised before any work,
            by every process alike.
        TypeError: ``prompt`` is passed in ``call_kwargs``, or the arguments do not fit the
            pipeline's call.
        DistributedGenerationError: under several processes, some process failed; raised where
            the result is delivered. It names the prompt indices that were not generated and
            the error of each failed process, and keeps the finished prompts' results in
            ``completed`` (prompt order; their indices in ``completed_indices``).

    .. versionadded:: 0.1
    """
    if not isinstance(gather, str) or gather not in GATHER_CHOICES:
        valid = ", ".join(repr(choice) for choice in GATHER_CHOICES)
        raise ValueError(f"gather must be one of {valid}; got {gather!r}")
    if "prompt" in call_kwargs:
        raise TypeError(
            "generate() takes the prompts as its second argument, not as prompt=: "
            "call generate(pipe, prompts, ...)"
        )
    prompt_list = _prompt_list(prompts)
    kwargs: dict[str, Any] = {"prompt": prompt_list, **call_kwargs}
    bound = bind_call(functools.partial(type(pipe).__call__, pipe), (), kwargs)
    if bound is None:
        raise TypeError(
            f"the arguments {sorted(kwargs)} do not fit {type(pipe).__name__}.__call__; "
            "pass the pipeline's own keyword arguments"
        )
    per_prompt = bound.num_images_per_prompt
    if seeds is not None:
        if kwargs.get("generator") is not None:
            raise ValueError("pass seeds= or generator=, not both")
        kwargs["generator"] = _generators(seeds, len(prompt_list) * per_prompt, per_prompt)

    state = _process_state()
    if state is None:
        _prepare_for(pipe, None)
        return pipe(**kwargs)
    return _generate_share(
        pipe, kwargs, state, per_prompt=per_prompt, to_all=gather == "all", roles=bound.roles
    )


# ---------------------------------------------------------------------------------------
# Arguments


def _prompt_list(prompts: object) -> list[str]:
    """Return ``prompts`` as a non-empty list of strings."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            f"prompts must be a string or a list of strings; got {type(prompts).__name__}"
        )
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    return list(prompts)


def _generators(seeds: object, images: int, per_prompt: int) -> list[torch.Generator]:
    """Return one CPU generator per image, seeded from ``seeds`` (an int or one per image)."""
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list, tuple)):
        raise ValueError(f"seeds must be an int or a list of ints; got {seeds!r}")
    values = list(range(seeds, seeds + images)) if isinstance(seeds, int) else list(seeds)
    if len(values) != images:
        raise ValueError(
            f"seeds has {len(values)} items but the call makes {images} images "
            f"({images // per_prompt} prompts x {per_prompt} per prompt): pass one seed per "
            "image, or one int for consecutive seeds"
        )
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"seeds must be integers; got {values!r}")
    import torch

    # CPU generators: diffusers draws on the generator's device and moves the noise, so the
    # same seed gives the same starting noise on mps, CUDA and CPU (pytorch #84288,
    # diffusers #934).
    return [torch.Generator("cpu").manual_seed(value) for value in values]


# ---------------------------------------------------------------------------------------
# The launch


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """Return the number of processes a launcher started, read from its environment (1: none).

    torchrun and ``accelerate launch`` set ``WORLD_SIZE``; MPI launchers their own variables.
    """
    env = os.environ if environ is None else environ
    sizes = [1]
    for name in _WORLD_SIZE_VARS:
        try:
            sizes.append(int(env.get(name, "1")))
        except ValueError:
            continue
    return max(sizes)


def _process_state() -> Any:
    """Return accelerate's ``PartialState`` when this process is one of several, else None."""
    launched = launched_processes()
    if launched <= 1:
        return None
    try:
        state_module = importlib.import_module("accelerate.state")
    except ImportError:
        warnings.warn(
            f"this process is one of {launched} that a launcher started, but accelerate is not "
            "installed: each process runs every prompt. Install accelerate (the distributed "
            'extra: pip install "accelerate>=0.20") to share the prompts between them.',
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    partial_state = state_module.PartialState
    if getattr(partial_state, "_shared_state", None):
        state = partial_state()  # already set up by the caller (an Accelerator, say)
    else:
        state = partial_state(cpu=_cpu_only())
    if int(state.num_processes) <= 1:
        logger.warning(
            "the environment says %d processes but accelerate sees one: running every prompt "
            "in this process",
            launched,
        )
        return None
    return state


def _cpu_only() -> bool:
    """Return True when accelerate should run this launch on CPUs (gloo).

    accelerate's ``PartialState`` only sets up a multi-CPU launch when asked (``cpu=True``);
    without an accelerator it would otherwise report a single process under torchrun.
    """
    flag = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower()
    if flag in ("1", "true", "yes"):
        return True
    import torch

    if torch.cuda.is_available():
        return False
    utils = importlib.import_module("accelerate.utils")
    return not any(bool(getattr(utils, probe, lambda: False)()) for probe in _ACCELERATOR_PROBES)


# ---------------------------------------------------------------------------------------
# One process's share


@dataclasses.dataclass(frozen=True)
class _Share:
    """What one process sends back: its prompt indices and their result, or its error.

    ``done`` counts the indices (a prefix) whose results are in ``output``; a failed process
    may have finished some (a looped batch's :class:`~mps_helpers.BatchError`).
    """

    process: int
    indices: tuple[int, ...]
    done: int
    output: Any
    error: str | None


def _generate_share(
    pipe: Pipeline,
    kwargs: dict[str, Any],
    state: Any,
    *,
    per_prompt: int,
    to_all: bool,
    roles: CallRoles,
) -> Any:
    """Run this process's share of the prompts and return the gathered result (or None)."""
    processes = int(state.num_processes)
    prompts = batch_size(kwargs, roles)
    generator = kwargs.get("generator")
    if generator is not None and not isinstance(generator, list):
        raise ValueError(
            f"one shared generator cannot give the same images on {processes} processes as on "
            "one (each process holds its own copy): pass generator= a list with one generator "
            f"per image ({prompts} prompts x {per_prompt} per prompt), or seeds="
        )
    if generator is None and kwargs.get("latents") is None and state.is_main_process:
        warnings.warn(
            f"no generator list or seeds: the {processes} processes draw their noise from "
            "their own random generators, so the images change with the number of processes "
            "(and repeat between processes where the script seeds torch's global generator). "
            "Pass seeds= or one generator per image.",
            UserWarning,
            stacklevel=3,
        )
    nets = control_nets(pipe)
    multi_control = nets > 0
    # Validates every per-prompt length, on every process alike, before any work.
    items = split_batch(
        kwargs, prompts, num_images_per_prompt=per_prompt, multi_control=nets, roles=roles
    )
    with state.split_between_processes(list(range(prompts))) as mine:
        indices = tuple(int(i) for i in mine)
    share = _run_share(pipe, kwargs, items, indices, state, multi_control=multi_control)
    shares = _gather(state, share, to_all=to_all)
    if shares is None:
        return None
    return collect(shares, prompts, processes)


def _run_share(
    pipe: Any,
    kwargs: Mapping[str, Any],
    items: Sequence[Mapping[str, Any]],
    indices: tuple[int, ...],
    state: Any,
    *,
    multi_control: bool,
) -> _Share:
    """Generate the prompts at ``indices`` on this process; catch and describe a failure."""
    process = int(state.process_index)
    if not indices:
        logger.info("process %d: no prompts to generate", process)
        return _Share(process, indices, 0, None, None)
    span = _span(indices)
    try:
        _prepare_for(pipe, state.device)
        logger.info("process %d: generating prompts %s on %s", process, span, state.device)
        output = pipe(**share_kwargs(kwargs, items, indices, multi_control=multi_control))
    except Exception as exc:
        done = 0
        partial = None
        if isinstance(exc, BatchError) and exc.completed is not None:
            done, partial = exc.index, _to_cpu(exc.completed)
        text = "".join(traceback.format_exception(exc)).rstrip()
        logger.error("process %d: prompts %s failed: %s", process, span, exc)
        return _Share(process, indices, done, partial, text)
    return _Share(process, indices, len(indices), _to_cpu(output), None)


def share_kwargs(
    kwargs: Mapping[str, Any],
    items: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    *,
    multi_control: bool = False,
) -> dict[str, Any]:
    """Return the keyword arguments of the batch made of the prompts at ``indices``.

    ``items`` are :func:`~mps_helpers._batch.split_batch`'s per-prompt arguments of
    ``kwargs``. An argument that the split cut (a new object per prompt) is joined back over
    ``indices`` (lists concatenated, tensors and arrays along their first dimension); one it
    gave to every prompt unchanged (the same object) is passed as it is.
    """
    share: dict[str, Any] = {}
    for name, value in kwargs.items():
        parts = [items[i][name] for i in indices]
        if all(part is value for part in parts):
            share[name] = value
        elif (
            multi_control
            and name in ("image", "control_image")
            and isinstance(value, list)
            and not any(isinstance(entry, list) for entry in value)
        ):
            # One entry per ControlNet, each split on its own (or shared by every prompt); a
            # nested list (one list per prompt) is joined back as any list.
            share[name] = [
                entry
                if all(part[j] is entry for part in parts)
                else merge_values([part[j] for part in parts])
                for j, entry in enumerate(value)
            ]
        else:
            share[name] = merge_values(parts)
    return share


def _prepare_for(pipe: Pipeline, device: torch.device | None) -> None:
    """Prepare ``pipe`` for ``device`` (None: this machine's choice), keeping its options.

    A pipeline prepared earlier keeps its plan when the device type matches; otherwise it is
    prepared again with its options and this device type. The plan names a device type
    ("cuda"), so a process whose device has an index ("cuda:1") then moves the pipeline there.
    """
    from mps_helpers._apply import plan_of, prepare_pipeline

    plan = plan_of(pipe)
    if device is None:
        if plan is None:
            prepare_pipeline(pipe)
        return
    kind = str(device.type)
    if kind in DEVICES:
        if plan is None:
            prepare_pipeline(pipe, device=kind)
        elif plan.device != kind:
            options: dict[str, Any] = {**plan.options, "device": kind}
            prepare_pipeline(pipe, **options)
    if kind != "cpu" and not _all_on(pipe, device):
        pipe.to(device)
        logger.info("%s: moved to %s", type(pipe).__name__, device)


def _all_on(pipe: Pipeline, device: torch.device) -> bool:
    """Return True when every module of ``pipe`` holding parameters is on ``device``."""
    import torch

    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        param = next(component.parameters(), None)
        if param is None:
            continue
        where = param.device
        if where.type != device.type or (
            device.index is not None and where.index is not None and where.index != device.index
        ):
            return False
    return True


def _to_cpu(value: object) -> Any:
    """Return ``value`` with every torch tensor in it moved to the CPU (for the trip).

    A CUDA tensor pickled on one process would be rebuilt on the same GPU index by the
    process that receives it.
    """
    module = type(value).__module__
    if module.startswith("torch") and hasattr(value, "device") and hasattr(value, "cpu"):
        return value if value.device.type == "cpu" else value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return type(value)(**fields)
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# Gathering


def _gather(state: Any, share: _Share, *, to_all: bool) -> list[_Share] | None:
    """Return every process's share on the receiving processes, None on the others.

    Shares are pickled (``all_gather_object`` / ``gather_object``): PIL images, arrays and
    CPU tensors travel on gloo and NCCL alike. With "main" only the main process receives
    them, so the other processes never hold the whole result in memory.
    """
    if not to_all:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            received: list[Any] | None = (
                [None] * int(state.num_processes) if state.is_main_process else None
            )
            dist.gather_object(share, received, dst=0)
            return list(received) if received is not None else None
    operations = importlib.import_module("accelerate.utils")
    everything = list(operations.gather_object([share]))
    return everything if to_all or state.is_main_process else None


def _span(indices: Sequence[int]) -> str:
    """Return a contiguous run of indices as "3-4" (or "3" for one)."""
    if not indices:
        return "none"
    first, last = indices[0], indices[-1]
    if list(indices) == list(range(first, last + 1)):
        return str(first) if first == last else f"{first}-{last}"
    return ", ".join(str(i) for i in indices)


def collect(shares: Sequence[Any], prompts: int, processes: int) -> Any:
    """Return the shares' outputs merged in prompt order, or raise for failed shares.

    Raises:
        DistributedGenerationError: some share failed; it carries the merged results of the
            prompts that finished (prompt order) and the failed processes' errors.
    """
    ordered = sorted(shares, key=lambda s: s.indices[0] if s.indices else prompts)
    finished = [s for s in ordered if s.done and s.output is not None]
    failures = [s for s in ordered if s.error is not None]
    if not failures:
        return merge_outputs([s.output for s in finished])
    completed_indices = tuple(i for s in finished for i in s.indices[: s.done])
    failed = tuple(i for s in failures for i in s.indices[s.done :])
    completed = merge_outputs([s.output for s in finished]) if finished else None
    errors = {s.process: s.error or "" for s in failures}
    first_line = {
        s.process: (s.error or "").strip().splitlines()[-1] if s.error else "" for s in failures
    }
    where = "; ".join(
        f"process {s.process} of {processes} (prompts {_span(s.indices[s.done :])}): "
        f"{first_line[s.process]}"
        for s in failures
    )
    raise DistributedGenerationError(
        f"{len(failed)} of {prompts} prompts were not generated: {where}. The "
        f"{len(completed_indices)} prompt(s) that finished are in this error's .completed "
        "(prompt order, their indices in .completed_indices); each failed process's "
        "traceback is in .errors.",
        index=failed[0] if failed else 0,
        completed=completed,
        failed=failed,
        completed_indices=completed_indices,
        errors=errors,
    )
