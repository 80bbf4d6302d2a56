"""Dtypes the device cannot hold: float64 asked for during a call, float8 and float64 weights.

mps has no float64 ("Cannot convert a MPS Tensor to float64 dtype as the MPS framework
doesn't support float64"; diffusers #9047 Flux, #11315 HiDream, #12653) and cannot compute
float8 (ComfyUI #6859, #8881; pytorch #148420). Two rescues, both cheap:

- at call time, :class:`Float64Rescue` (a ``TorchFunctionMode``, active for the length of a
  prepared call) turns every float64 *request* aimed at the device into float32: a
  ``dtype=torch.float64`` argument of a factory or conversion, ``.double()``, a float64 CPU
  tensor moved to the device. RoPE frequencies built in float64 (LTX-2, HiDream, Flux off
  mps) are then built in float32, as diffusers itself builds them on mps where it checks.
  Nothing else changes: no float64 tensor can exist on the device, so no operation can
  promote to float64 there.
- at apply time, :func:`cast_uncomputable` casts float64 and float8 parameters and buffers of
  every component to a dtype the device computes, on their current device (before the move),
  or raises before changing anything when a component cannot be cast (a quantized one),
  naming it and the fix.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mps_helpers._plan import Plan

__all__ = ["Float64Rescue", "cast_uncomputable", "rescue_available", "uncomputable_dtypes"]

logger = logging.getLogger(__name__)

#: Names of dtypes mps cannot hold or compute (float8 variants: those torch has).
UNCOMPUTABLE_ON_MPS: tuple[str, ...] = (
    "float64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
#: Names of float8 dtypes, which no device computes with plain torch ops.
FLOAT8: tuple[str, ...] = tuple(name for name in UNCOMPUTABLE_ON_MPS if name.startswith("float8"))


def uncomputable_dtypes(device: str) -> frozenset[torch.dtype]:
    """Return the dtypes whose weights are cast at apply time for ``device``.

    float8 everywhere (plain torch ops compute none of them, on any device); on mps also
    float64 and complex128.
    """
    import torch

    names = UNCOMPUTABLE_ON_MPS if device == "mps" else FLOAT8
    return frozenset(getattr(torch, name) for name in names if hasattr(torch, name))


def _is_quantized(module: Any) -> bool:
    return bool(
        getattr(module, "is_quantized", False)
        or getattr(module, "hf_quantizer", None) is not None
        or getattr(module, "is_loaded_in_8bit", False)
        or getattr(module, "is_loaded_in_4bit", False)
    )


def cast_uncomputable(pipe: Any, plan: Plan) -> dict[str, str]:
    """Cast float64/float8 weights of ``pipe``'s components to dtypes ``plan.device`` computes.

    float64 becomes float32 (or the plan's dtype for the model, whichever is the component's
    target), float8 the component's planned dtype (``plan.vae_dtype`` for the VAE,
    ``plan.dtype`` otherwise): exact, since every float8 value is a float16 and a bfloat16
    value. Casts happen where the tensors are, before the pipeline moves. Returns
    ``{component: "float8_e4m3fn -> bfloat16"}`` for what it cast.

    Raises:
        ValueError: a quantized component holds such tensors (it cannot be cast); raised
            before anything is changed, naming the component and the fix.
    """
    import torch

    bad = uncomputable_dtypes(plan.device)
    found: dict[str, set[torch.dtype]] = {}
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        dtypes = {t.dtype for t in _tensors(module) if t.dtype in bad}
        if dtypes:
            found[name] = dtypes
    for name, dtypes in found.items():
        if _is_quantized(pipe.components[name]):
            shown = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            raise ValueError(
                f"the {name} component ({type(pipe.components[name]).__name__}) is quantized "
                f"and holds {shown} tensors, which {plan.device} cannot compute, so it cannot be "
                "cast: load it unquantized (a float16/bfloat16 checkpoint), or run on "
                "device='cpu'"
            )
    done: dict[str, str] = {}
    for name, dtypes in found.items():
        module = pipe.components[name]
        target = plan.vae_dtype if name == "vae" else plan.dtype
        changes = []
        for dtype in sorted(dtypes, key=str):
            to = target
            if dtype.is_complex:
                to = torch.complex64
            _cast(module, dtype, to)
            changes.append(
                f"{str(dtype).removeprefix('torch.')} -> {str(to).removeprefix('torch.')}"
            )
        done[name] = ", ".join(changes)
        logger.info(
            "%s: %s had tensors %s cannot compute: cast %s",
            type(pipe).__name__,
            name,
            plan.device,
            done[name],
        )
    return done


def _tensors(module: Any) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _cast(module: Any, source: torch.dtype, target: torch.dtype) -> None:
    """Cast the parameters and buffers of ``source`` dtype in ``module`` to ``target``, in place."""
    import torch

    with torch.no_grad():
        for sub in module.modules():
            for key, param in list(sub._parameters.items()):
                if param is not None and param.dtype == source:
                    sub._parameters[key] = torch.nn.Parameter(
                        param.to(target), requires_grad=param.requires_grad
                    )
            for key, buf in list(sub._buffers.items()):
                if buf is not None and buf.dtype == source:
                    sub._buffers[key] = buf.to(target)


def rescue_available() -> bool:
    """Return whether this torch has ``TorchFunctionMode`` (the rescue's mechanism, 2.0+)."""
    try:
        from torch.overrides import TorchFunctionMode  # noqa: F401
    except ImportError:
        return False
    return True


def _rescue_mode_base() -> type:
    from torch.overrides import TorchFunctionMode

    return TorchFunctionMode


def _device_type(value: Any) -> str | None:
    import torch

    if isinstance(value, torch.device):
        return value.type
    if isinstance(value, str):
        return torch.device(value).type
    if isinstance(value, int):
        return "cuda"
    return None


def _default_device_type() -> str:
    import torch

    getter = getattr(torch, "get_default_device", None)  # torch 2.3+
    return "cpu" if getter is None else str(getter().type)


class _Rescue:
    """The body of :class:`Float64Rescue`, kept apart from torch's mode class (imported late)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rewrites = 0

    def handle(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``func`` with float64 requests aimed at the device turned into float32."""
        import torch

        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and name in ("double", "to", "type"):
            return self._convert(func, name, first, list(args[1:]), kwargs)
        where = self._where(args, kwargs)
        if where != self.device:
            return func(*args, **kwargs)
        if kwargs.get("dtype") is torch.float64:
            self.rewrites += 1
            return func(*args, **{**kwargs, "dtype": torch.float32})
        # Data decides the dtype: a float64 array (numpy's default) would land as float64.
        if (
            name in ("tensor", "as_tensor")
            and kwargs.get("dtype") is None
            and args
            and str(getattr(args[0], "dtype", "")).removeprefix("torch.") == "float64"
        ):
            self.rewrites += 1
            return func(*args, **{**kwargs, "dtype": torch.float32})
        return func(*args, **kwargs)

    def _where(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        import torch

        where = _device_type(kwargs.get("device"))
        if where is None:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            where = tensor.device.type if tensor is not None else _default_device_type()
        return where

    def _convert(
        self, func: Any, name: str, tensor: torch.Tensor, rest: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        """``x.double()``, ``x.to(...)``, ``x.type(...)``: float64 must not land on the device."""
        import torch

        f64 = torch.float64
        if name == "double":
            if tensor.device.type != self.device:
                return func(tensor, *rest, **kwargs)
            self.rewrites += 1
            return tensor.float()
        target = _device_type(kwargs.get("device"))
        for value in rest:
            if isinstance(value, torch.Tensor):
                target = value.device.type
            elif target is None and not isinstance(value, torch.dtype):
                target = _device_type(value)
        if (target or tensor.device.type) != self.device:
            return func(tensor, *rest, **kwargs)
        new_rest = [torch.float32 if value is f64 else value for value in rest]
        new_kwargs = dict(kwargs)
        if new_kwargs.get("dtype") is f64:
            new_kwargs["dtype"] = torch.float32
        asks_dtype = "dtype" in kwargs or any(
            isinstance(v, (torch.dtype, torch.Tensor, str)) and not _is_device_like(v) for v in rest
        )
        if tensor.dtype == f64 and not asks_dtype and name == "to":
            new_kwargs["dtype"] = torch.float32  # a float64 tensor moving onto the device
        if any(a is not b for a, b in zip(new_rest, rest, strict=True)) or (
            new_kwargs.get("dtype") is not kwargs.get("dtype")
        ):
            self.rewrites += 1
        return func(tensor, *new_rest, **new_kwargs)


def _is_device_like(value: Any) -> bool:
    import torch

    if isinstance(value, torch.device):
        return True
    if isinstance(value, str):
        try:
            torch.device(value)
        except RuntimeError:
            return False
        return True
    return False


def Float64Rescue(device: str) -> Any:  # noqa: N802 (reads as the class it returns)
    """Return a ``TorchFunctionMode`` that turns float64 requests on ``device`` into float32.

    Use it as a context manager around work on ``device`` (a device type: "mps"). Its
    ``rewrites`` attribute counts the requests it changed.
    """
    base = _rescue_mode_base()

    class _Mode(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self._rescue = _Rescue(device)

        @property
        def rewrites(self) -> int:
            return self._rescue.rewrites

        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            return self._rescue.handle(func, tuple(args), dict(kwargs or {}))

    _Mode.__name__ = _Mode.__qualname__ = "Float64Rescue"
    return _Mode()
