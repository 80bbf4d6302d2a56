"""The NaN guard (``plan.nan_guard``): NaN/black images repaired by a float32 VAE decode.

For the length of a pipeline call, ``pipe.vae.decode`` is wrapped. Each decoded batch is
checked for NaN/inf; when it has any and the latents it got were finite, the same latents are
decoded again with the VAE in float32 and the finite batch is handed back to the pipeline,
whose own post-processing (safety checker, watermark, ``output_type``, ``return_dict``) then
runs as usual. One :class:`~mps_helpers.NonFiniteOutputWarning` per pipeline;
:class:`~mps_helpers.NonFiniteOutputError` when no repair gives finite images. Why, and what
it costs: ``docs/explanation/guards.md``.
"""

from __future__ import annotations

import logging
import sys
import weakref
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from mps_helpers._errors import NonFiniteOutputError, NonFiniteOutputWarning
from mps_helpers._util import dtype_name, module_dtype, warn_once

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import torch

    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

__all__ = ["call_with_nan_guard", "has_non_finite"]

logger = logging.getLogger(__name__)

# VAEs seen to overflow in half precision: later decodes go to float32 straight away instead
# of decoding twice. Keyed on the VAE, not the pipeline, so swapping in a fixed VAE resets it.
_OVERFLOWING_VAES: weakref.WeakSet[Any] = weakref.WeakSet()


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


def call_with_nan_guard(
    pipe: Pipeline, plan: Plan, call: Callable[..., Any], kwargs: dict[str, Any]
) -> Any:
    """Return ``call(**kwargs)``, with NaN/inf images repaired by a float32 VAE decode.

    Does nothing extra when ``plan.nan_guard`` is off. Otherwise ``pipe.vae.decode`` is
    wrapped for the length of the call (see this module's docstring), and, when the call did
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
            warn_once(pipe, "vae-overflow", message, NonFiniteOutputWarning, log=logger)
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


def _is_float32(dtype: torch.dtype | None) -> bool:
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
def _float32(module: torch.nn.Module) -> Iterator[None]:
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


def _count_floating(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(1 for tensor in tensors if tensor.is_floating_point())
