"""Guards around a prepared call: NaN/black-image repair, out-of-memory retry, memory pressure.

The prepared call (``_call.py``) runs a whole call through :func:`call_with_recovery` and each
underlying pipeline call through :func:`call_with_nan_guard`. What each guard does, and why,
is in ``docs/explanation/guards.md``; in short:

- **NaN guard** (``plan.nan_guard``): for the length of a pipeline call, ``pipe.vae.decode`` is
  wrapped. Each decoded batch is checked for NaN/inf; when it has any and the latents it got
  were finite, the same latents are decoded again with the VAE in float32 and the finite
  batch is handed back to the pipeline, whose own post-processing (safety checker, watermark,
  ``output_type``, ``return_dict``) then runs as usual. One :class:`NonFiniteOutputWarning` per
  pipeline; :class:`NonFiniteOutputError` when no repair gives finite images.
- **Out-of-memory retry** (``plan.oom_retry``): an out-of-memory error of mps or CUDA (see
  :func:`is_out_of_memory`) frees the device cache and retries the call once with
  :func:`stricter_plan`, which the pipeline keeps; a second failure raises
  :class:`DeviceOutOfMemoryError`.
- **Memory watch** (``plan.memory_watch``): swap used is read before and after the call; growth
  over :data:`SWAP_GROWTH_LIMIT` gives one :class:`MemoryPressureWarning` per pipeline.

The library never sets ``PYTORCH_MPS_HIGH_WATERMARK_RATIO``: 0 disables mps' allocation limit
and can freeze the machine, so the out-of-memory message advises against it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import traceback
import warnings
import weakref
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from mps_helpers import _probes
from mps_helpers._errors import (
    DeviceOutOfMemoryError,
    MemoryPressureWarning,
    NonFiniteOutputError,
    NonFiniteOutputWarning,
    OutOfMemoryRetryWarning,
)
from mps_helpers._util import dtype_name, empty_device_cache, format_bytes, module_dtype

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

    import torch

    from mps_helpers._plan import Plan

__all__ = [
    "OOM_MESSAGES",
    "SWAP_GROWTH_LIMIT",
    "call_with_nan_guard",
    "call_with_recovery",
    "find_out_of_memory",
    "free_device_memory",
    "has_non_finite",
    "is_out_of_memory",
    "read_memory",
    "stricter_plan",
]

logger = logging.getLogger(__name__)

#: Swap growth during one call (bytes) above which the memory watch warns.
SWAP_GROWTH_LIMIT = 256 * 2**20

#: Message fragments of out-of-memory errors raised as plain RuntimeErrors: mps always does
#: (EVIDENCE.md), CUDA did before torch 1.13 added ``torch.cuda.OutOfMemoryError``.
OOM_MESSAGES: tuple[str, ...] = ("MPS backend out of memory", "CUDA out of memory")

# Frames of this package are skipped so that warnings point at the user's call.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# pipeline -> causes already warned about ("warn once per pipeline and cause").
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

# VAEs seen to overflow in half precision: later decodes go to float32 straight away instead
# of decoding twice. Keyed on the VAE, not the pipeline, so swapping in a fixed VAE resets it.
_OVERFLOWING_VAES: weakref.WeakSet[Any] = weakref.WeakSet()

# The plan fields :func:`stricter_plan` turns on, with how the messages name them.
_STRICTER_FIELDS: tuple[tuple[str, str], ...] = (
    ("attention_slicing", "attention slicing on"),
    ("vae_slicing", "VAE slicing on"),
    ("vae_tiling", "VAE tiling on"),
    ("batch_to_loop", "prompts run one at a time"),
)


# ---------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------


def has_non_finite(value: Any) -> bool:
    """Return True when ``value`` holds a NaN or an infinity.

    ``value`` may be a torch tensor, a numpy array, or a list/tuple of them; anything else
    (PIL images, None, integers) counts as finite, since it cannot hold NaN.
    """
    if isinstance(value, (list, tuple)):
        return any(has_non_finite(item) for item in value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _tensor_has_non_finite(value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        if not numpy.issubdtype(value.dtype, numpy.floating):
            return False
        # One float64 sum is far cheaper than an elementwise mask; NaN/inf propagate through
        # it. It can only overflow for finite float64 input, which the exact check settles.
        with numpy.errstate(all="ignore"):  # an overflowing sum is expected, not an error
            total = value.sum(dtype=numpy.float64)
        if numpy.isfinite(total):
            return False
        return not bool(numpy.isfinite(value).all())
    return False


def _tensor_has_non_finite(tensor: torch.Tensor) -> bool:
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    # A float32 (float64 for float64) sum is one reduction, no elementwise bool mask: about
    # 15x cheaper on CPU than ``isfinite(x).all()``. NaN and inf propagate through it; finite
    # values can make it overflow only when huge (impossible for float16), so a non-finite
    # sum is confirmed with the exact check.
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    try:
        total = tensor.sum(dtype=acc)
    except (RuntimeError, TypeError):  # a backend without a dtype'd sum: use the exact check
        return not bool(torch.isfinite(tensor).all())
    if bool(torch.isfinite(total)):
        return False
    return not bool(torch.isfinite(tensor).all())


def is_out_of_memory(exc: BaseException) -> bool:
    """Return True when ``exc`` is a device out-of-memory error of mps or CUDA.

    Recognises ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError`` (whichever the
    installed torch has) and RuntimeErrors whose message contains one of
    :data:`OOM_MESSAGES` (mps raises a plain RuntimeError; so did CUDA before torch 1.13).
    Never imports torch: an exception of torch's can only exist once torch is imported.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        for owner in (torch, getattr(torch, "cuda", None)):
            cls = getattr(owner, "OutOfMemoryError", None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    if isinstance(exc, RuntimeError):
        message = str(exc)
        return any(fragment in message for fragment in OOM_MESSAGES)
    return False


def find_out_of_memory(exc: BaseException) -> BaseException | None:
    """Return the out-of-memory error that ``exc`` is or was raised from, or None.

    Follows ``__cause__`` (explicit ``raise ... from``), so that an out-of-memory error
    wrapped by a looped batch's :class:`~mps_helpers.BatchError` counts too.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # causes do not loop in practice; stay bounded all the same
        if seen is None:
            return None
        if is_out_of_memory(seen):
            return seen
        seen = seen.__cause__
    return None


def stricter_plan(plan: Plan) -> Plan | None:
    """Return ``plan`` with every memory saver on, or None when all of them already are.

    The savers are attention slicing, VAE slicing, VAE tiling and running prompts one at a
    time (``batch_to_loop``). Attention slicing is left as it is when ``plan`` says the
    denoiser cannot slice its attention (a transformer denoiser with diffusers' processor).
    """
    changes: dict[str, Any] = {}
    for name, _label in _STRICTER_FIELDS:
        if getattr(plan, name):
            continue
        if name == "attention_slicing" and not _can_slice_attention(plan):
            continue
        changes[name] = True
    if not changes:
        return None
    why = "on after an out-of-memory error: the retry's stricter plan (mps_helpers guards)."
    return plan.replace(**changes, reasons=dict.fromkeys(changes, why))


def _can_slice_attention(plan: Plan) -> bool:
    # The plan records whether slicing can work on this denoiser; older plans that lack the
    # field are assumed to allow it (turning it on is then harmless at worst).
    return bool(getattr(plan, "attention_slicing_supported", True))


def _plan_changes(old: Plan, new: Plan) -> list[str]:
    """Return how the messages name the memory savers that ``new`` turns on over ``old``."""
    return [
        label for name, label in _STRICTER_FIELDS if getattr(new, name) and not getattr(old, name)
    ]


# ---------------------------------------------------------------------------------------
# Warnings
# ---------------------------------------------------------------------------------------


def _warn(message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to the first caller outside this package."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    # warnings.warn's stacklevel counts frames; skip the package's own (their number depends
    # on the path through the prepared call: looped or not, warmup or not).
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def _warn_once(pipe: Any, cause: str, message: str, category: type[Warning]) -> None:
    """Warn the first time ``cause`` happens with ``pipe``; log the later times."""
    try:
        causes = _WARNED.setdefault(pipe, set())
    except TypeError:  # not weak-referenceable or unhashable: warn every time
        causes = set()
    if cause in causes:
        # INFO, not WARNING: with no logging set up, Python prints WARNING records to stderr,
        # which would repeat on every call the warning that was meant to come once.
        logger.info("%s", message)
        return
    causes.add(cause)
    _warn(message, category)


# ---------------------------------------------------------------------------------------
# NaN guard
# ---------------------------------------------------------------------------------------


def call_with_nan_guard(
    pipe: Any, plan: Plan, call: Callable[..., Any], kwargs: dict[str, Any]
) -> Any:
    """Return ``call(**kwargs)``, with NaN/inf images repaired by a float32 VAE decode.

    Does nothing extra when ``plan.nan_guard`` is off. Otherwise ``pipe.vae.decode`` is
    wrapped for the length of the call (see the module docstring), and, when the call did
    not decode through it (``output_type="latent"``, a pipeline with another decoder), the
    returned images or latents are checked instead.

    Raises:
        NonFiniteOutputError: the images (or latents) are non-finite and decoding in float32
            could not give finite ones.
    """
    if not plan.nan_guard:
        return call(**kwargs)
    vae = getattr(pipe, "vae", None)
    guard = _DecodeGuard(vae) if callable(getattr(vae, "decode", None)) else None
    if guard is None:
        result = call(**kwargs)
    else:
        with guard.installed():
            result = call(**kwargs)
    name = type(pipe).__name__
    if guard is not None and guard.decodes:
        if guard.failure is not None:
            raise NonFiniteOutputError(_failure_message(name, guard))
        if guard.repaired:
            message = (
                f"{name} decoded NaN/inf images: its VAE overflows in {guard.dtype_name}. "
                "mps_helpers decoded the same latents again with the VAE in float32 and "
                "returned those images; later calls of this pipeline decode in float32 "
                "directly. To skip the upcast, use a VAE that is safe in float16 (for SDXL: "
                "madebyollin/sdxl-vae-fp16-fix) or prepare the pipeline in float32."
            )
            _warn_once(pipe, "vae-overflow", message, NonFiniteOutputWarning)
        return result
    output = _first_output(result)
    if has_non_finite(output):
        raise NonFiniteOutputError(
            f"{name} returned NaN/inf values and called no pipe.vae.decode that mps_helpers "
            "could repeat in float32 (output_type='latent', or a pipeline that decodes "
            "another way). The denoiser overflowed in its dtype: prepare the pipeline with "
            "dtype='float32' (or 'bfloat16' where supported), or pass nan_guard=False to get "
            "the raw output."
        )
    return result


def _failure_message(name: str, guard: _DecodeGuard) -> str:
    if guard.failure == "latents":
        return (
            f"{name} produced NaN/inf latents: the denoiser overflowed in {guard.dtype_name}, "
            "so decoding them again in float32 cannot help. Prepare the pipeline with "
            "dtype='float32' (or 'bfloat16' where supported), or pass nan_guard=False to get "
            "the raw output."
        )
    if guard.failure == "quantized":
        how = f"and its VAE is quantized ({guard.dtype_name}), which cannot be cast to float32"
    elif guard.failure == "already-float32":
        how = "with its VAE already in float32"
    else:
        how = f"in {guard.dtype_name} and again with the VAE in float32"
    return (
        f"{name}'s VAE decoded NaN/inf images from finite latents {how}, so mps_helpers "
        "could not repair them. Check that the VAE belongs to this model and its weights "
        "loaded correctly; pass nan_guard=False to get the raw output."
    )


def _first_output(result: Any) -> Any:
    """Return the images (or latents) of a pipeline result: its first field or item."""
    if isinstance(result, (tuple, list)):
        return result[0] if result else None
    to_tuple = getattr(result, "to_tuple", None)
    if callable(to_tuple):  # diffusers' BaseOutput
        values = to_tuple()
        return values[0] if values else None
    return result


class _DecodeGuard:
    """Wraps one VAE's ``decode`` for one pipeline call, and records what it saw.

    Attributes:
        decodes: decode calls seen.
        repaired: decoded batches that came from a float32 decode because the VAE overflows
            in half precision (seen in this call, or in an earlier one).
        failure: None when all went well; else why a non-finite batch stayed so: "latents"
            (the latents were non-finite), "float32" (the float32 decode was too),
            "already-float32" (nothing to upcast) or "quantized" (cannot be upcast).
        dtype_name: the VAE's dtype at the last decode, e.g. "float16".
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.decodes = 0
        self.repaired = 0
        self.failure: str | None = None
        self.dtype_name = "its dtype"
        self._decode: Callable[..., Any] = vae.decode

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Put the wrapper on the VAE instance for the block, and take it off after.

        A VAE that takes no instance attributes (``__slots__``) runs unwrapped: the caller
        then sees no decodes and checks the call's output instead.
        """
        state = getattr(self.vae, "__dict__", None)
        if state is None:
            yield
            return
        had_own = "decode" in state
        own = state.get("decode")
        # nn.Module.__setattr__ stores a plain callable in the instance dict, which
        # shadows the class's method for ``self.vae.decode(...)`` inside the pipeline.
        self.vae.decode = self
        try:
            yield
        finally:
            if had_own:
                self.vae.decode = own
            else:
                del self.vae.decode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        dtype = module_dtype(self.vae)
        self.dtype_name = dtype_name(dtype)
        self.decodes += 1
        if self.vae in _OVERFLOWING_VAES and not _is_float32(dtype):
            # Known to overflow: skip the half-precision decode whose result would be dropped.
            logger.info("decoding in float32: this VAE overflowed in %s before", dtype)
            out = self._decode_float32(args, kwargs)
            sample = _sample_of(out)
            if sample is not None and not has_non_finite(sample):
                self.repaired += 1
                return _with_sample(out, sample.to(dtype))
            # Not finite in float32 either: take the normal path, which reports it.
        out = self._decode(*args, **kwargs)
        sample = _sample_of(out)
        if sample is None or not has_non_finite(sample):
            return out
        if has_non_finite(_latents_of(args, kwargs)):
            self.failure = "latents"
            return out
        if _is_float32(dtype):
            self.failure = "already-float32"
            return out
        if getattr(self.vae, "is_quantized", False):  # diffusers refuses to cast these
            self.failure = "quantized"
            return out
        fixed = self._decode_float32(args, kwargs)
        fixed_sample = _sample_of(fixed)
        if fixed_sample is None or has_non_finite(fixed_sample):
            self.failure = "float32"
            return out
        self.repaired += 1
        # A VAE that is not weak-referenceable is simply decoded twice next time too.
        with suppress(TypeError):
            _OVERFLOWING_VAES.add(self.vae)
        logger.info("VAE decode was non-finite in %s; repaired with a float32 decode", dtype)
        # The pipeline expects what the half-precision decode returns: same type and dtype.
        return _with_sample(out, fixed_sample.to(sample.dtype))

    def _decode_float32(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with _float32(self.vae):
            return self._decode(
                *(_to_float32(a) for a in args),
                **{key: _to_float32(value) for key, value in kwargs.items()},
            )


def _is_float32(dtype: Any) -> bool:
    import torch

    return dtype in (None, torch.float32, torch.float64)


def _to_float32(value: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def _latents_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Return the latents a decode call got: its first argument, or a latent keyword."""
    if args:
        return args[0]
    for key in ("z", "x", "latents", "sample"):
        if key in kwargs:
            return kwargs[key]
    return None


def _sample_of(out: Any) -> Any:
    """Return the decoded batch from a decode result (a DecoderOutput, tuple or tensor)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0] if out else None
    return getattr(out, "sample", None)


def _with_sample(out: Any, sample: Any) -> Any:
    """Return ``out`` with its decoded batch replaced by ``sample`` (same structure)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(out, torch.Tensor):
        return sample
    if isinstance(out, tuple):
        return (sample, *out[1:])
    if isinstance(out, list):
        return [sample, *out[1:]]
    out.sample = sample  # diffusers' BaseOutput keeps its dict and attribute in step
    return out


@contextmanager
def _float32(module: Any) -> Iterator[None]:
    """Run the block with ``module`` in float32, then restore each tensor's dtype.

    Casting float16/bfloat16 to float32 and back is exact, so the weights come back
    unchanged. Parameters keep their identity (``Module.to`` assigns ``.data``).
    """
    import torch

    dtypes: dict[str, tuple[bool, torch.dtype]] = {}
    for name, param in module.named_parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            dtypes[name] = (True, param.dtype)
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and buf.dtype != torch.float32:
            dtypes[name] = (False, buf.dtype)
    # torch's own Module.to: diffusers' ModelMixin.to logs a warning on every dtype cast.
    torch.nn.Module.to(module, torch.float32)
    try:
        yield
    finally:
        kinds = {dtype for _is_param, dtype in dtypes.values()}
        if len(kinds) == 1 and len(dtypes) == _count_floating(module):
            torch.nn.Module.to(module, next(iter(kinds)))
        else:  # mixed precision (e.g. parts kept in float32): restore tensor by tensor
            for name, (is_param, dtype) in dtypes.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                if is_param:
                    param = getattr(owner, leaf)
                    param.data = param.data.to(dtype)
                else:
                    setattr(owner, leaf, getattr(owner, leaf).to(dtype))


def _count_floating(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(1 for tensor in tensors if tensor.is_floating_point())


# ---------------------------------------------------------------------------------------
# Out-of-memory retry and memory watch
# ---------------------------------------------------------------------------------------


def read_memory() -> _probes.MemoryInfo:
    """Read available RAM and swap used now (psutil; fields None when unknown).

    A seam for tests, which replace it with fake readings.
    """
    return _probes.memory_info()


def free_device_memory() -> None:
    """Collect garbage and return cached device memory of mps and CUDA to the system."""
    gc.collect()
    empty_device_cache()


def call_with_recovery(
    pipe: Any,
    plan: Plan,
    run_all: Callable[[dict[str, Any], Plan], Any],
    kwargs: dict[str, Any],
) -> Any:
    """Return ``run_all(kwargs, plan)``, run under the out-of-memory and memory-pressure guards.

    With ``plan.oom_retry``, an out-of-memory error frees the device cache and the call runs
    once more with :func:`stricter_plan`, which is applied to ``pipe`` and kept for later
    calls; a :class:`OutOfMemoryRetryWarning` says what changed. Other errors pass through
    unchanged. With ``plan.memory_watch``, swap growth over :data:`SWAP_GROWTH_LIMIT` during
    the call gives one :class:`MemoryPressureWarning` per pipeline.

    Raises:
        DeviceOutOfMemoryError: out of memory also with the stricter plan, or with no
            stricter plan left to try; ``__cause__`` is torch's last error.
    """
    before = read_memory() if plan.memory_watch else None
    if plan.oom_retry:
        result, plan_used = _run_with_retry(pipe, plan, run_all, kwargs)
    else:
        result, plan_used = run_all(kwargs, plan), plan
    if before is not None:
        _check_swap(pipe, plan_used, before, read_memory())
    return result


def _run_with_retry(
    pipe: Any,
    plan: Plan,
    run_all: Callable[[dict[str, Any], Plan], Any],
    kwargs: dict[str, Any],
) -> tuple[Any, Plan]:
    states = _generator_states(kwargs.get("generator"))
    try:
        return run_all(kwargs, plan), plan
    except Exception as exc:
        if find_out_of_memory(exc) is None:
            raise
        first = exc
    # Outside the except block, so that the failed attempt's tensors can be freed: the
    # traceback's frames hold them; clearing their locals keeps the traceback printable.
    _release(first)
    name = type(pipe).__name__
    stricter = stricter_plan(plan)
    if stricter is None:
        raise DeviceOutOfMemoryError(_oom_message(name, first, None, kwargs)) from first
    changes = _plan_changes(plan, stricter)
    logger.info("%s ran out of memory; retrying with %s", name, ", ".join(changes))
    _apply_plan(pipe, stricter)
    _set_generator_states(states)  # the retry draws the same noise the first try did
    try:
        result = run_all(kwargs, stricter)
    except Exception as exc:
        if find_out_of_memory(exc) is None:
            raise
        second = exc
    else:
        _warn(
            f"{name} ran out of memory on {_oom_device(first)}; mps_helpers freed the "
            f"device cache and retried once with a stricter memory plan ({', '.join(changes)}), "
            "which worked and stays on for this pipeline's later calls (slower, smaller "
            "peak memory). To start from it, pass these options to prepare_pipeline.",
            OutOfMemoryRetryWarning,
        )
        return result, stricter
    _release(second)
    raise DeviceOutOfMemoryError(_oom_message(name, second, changes, kwargs)) from second


def _apply_plan(pipe: Any, plan: Plan) -> None:
    """Apply ``plan`` to ``pipe`` through ``mps_helpers._apply`` (a seam for tests)."""
    from mps_helpers._apply import apply_plan

    apply_plan(pipe, plan)


def _release(exc: BaseException) -> None:
    """Free what a failed attempt left allocated: its frames' locals, then the cache."""
    seen: BaseException | None = exc
    while seen is not None:  # a looped batch's BatchError holds the OOM as its cause
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__
    free_device_memory()


def _oom_device(exc: BaseException) -> str:
    message = str(find_out_of_memory(exc) or exc)
    return "mps" if "MPS" in message else "CUDA" if "CUDA" in message else "the device"


def _oom_message(
    name: str,
    exc: BaseException,
    changes: list[str] | None,
    kwargs: dict[str, Any],
) -> str:
    device = _oom_device(exc)
    if changes is None:
        tried = (
            "All of mps_helpers' memory savers were already on (attention slicing where the "
            "denoiser supports it, VAE slicing and tiling, one prompt at a time), so it did "
            "not retry."
        )
    else:
        tried = (
            "mps_helpers freed the device cache and retried once with a stricter memory plan "
            f"({', '.join(changes)}); that ran out of memory too."
        )
    size = ""
    height, width = kwargs.get("height"), kwargs.get("width")
    if isinstance(height, int) and isinstance(width, int):
        size = f" at {width}x{height} px"
    advice = (
        "What you can do: generate smaller images (height=, width=), fewer images per call "
        "(fewer prompts, num_images_per_prompt=1), and close other apps that use memory"
    )
    if device == "mps":
        advice += (
            " (on Apple Silicon the GPU shares the system's RAM). Don't set "
            "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 as torch's message suggests: without the "
            "limit the whole machine can freeze."
        )
    else:
        advice += " or other processes that hold GPU memory."
    root = find_out_of_memory(exc) or exc
    text = str(root).strip()
    first_line = text.splitlines()[0] if text else type(root).__name__
    return f"{name} ran out of memory on {device}{size}: {first_line}\n{tried}\n{advice}"


def _generator_states(generator: Any) -> list[tuple[Any, Any]]:
    """Return (generator, state) pairs for a torch.Generator or a list of them."""
    torch = sys.modules.get("torch")
    if torch is None or generator is None:
        return []
    items = generator if isinstance(generator, (list, tuple)) else [generator]
    return [(g, g.get_state()) for g in items if isinstance(g, torch.Generator)]


def _set_generator_states(states: list[tuple[Any, Any]]) -> None:
    for generator, state in states:
        generator.set_state(state)


def _check_swap(
    pipe: Any, plan: Plan, before: _probes.MemoryInfo, after: _probes.MemoryInfo
) -> None:
    """Warn (once per pipeline) when swap grew by more than :data:`SWAP_GROWTH_LIMIT`."""
    if before.swap_used is None or after.swap_used is None:
        return
    growth = after.swap_used - before.swap_used
    if growth <= SWAP_GROWTH_LIMIT:
        return
    name = type(pipe).__name__
    available = (
        f"; {format_bytes(after.available)} of RAM available after it"
        if after.available is not None
        else ""
    )
    helps = [
        f"{option}=True"
        for option, _label in _STRICTER_FIELDS
        if not getattr(plan, option)
        and (option != "attention_slicing" or _can_slice_attention(plan))
    ]
    fix = (
        f"prepare_pipeline(pipe, {', '.join(helps)}), smaller images or fewer images per call"
        if helps
        else "smaller images or fewer images per call (all memory savers are already on)"
    )
    message = (
        f"Swap grew by {format_bytes(growth)} during this call of {name} (from "
        f"{format_bytes(before.swap_used)} to {format_bytes(after.swap_used)}{available}): "
        "the machine ran short of memory and slowed down. What helps: "
        f"{fix}, or closing other apps."
    )
    _warn_once(pipe, "swap", message, MemoryPressureWarning)
