"""``auto_prepare``: prepare every pipeline that existing code loads, without editing it.

While an ``auto_prepare`` scope is active in a thread, diffusers' pipeline loaders
(``from_pretrained``, ``from_single_file``, ``from_pipe``, on ``DiffusionPipeline``, the
``AutoPipelineFor*`` classes and any pipeline class that overrides them) return pipelines that
went through :func:`~mps_helpers.prepare_pipeline` with the scope's options.

How it stays contained:

- The loaders are patched process-wide while at least one scope is active anywhere (a counter
  under a lock), and the original descriptors are put back, identical, when the last scope
  ends. Patched loaders consult the calling thread's own stack of scopes (a context variable),
  so a thread with no active scope gets exactly what diffusers returns.
- Only the outermost loader call of a thread is prepared: a loader that calls another one
  (``AutoPipelineForText2Image.from_pretrained`` calls the concrete class's) prepares once.

Two pipeline methods are also intercepted, only in a thread with an active scope and only for
pipelines that have a plan, so that code written for one machine cannot undo the plan:

- ``pipe.to(device)`` for a device this machine does not have (``"mps"`` on Linux, ``"cuda"``
  on a Mac) keeps the pipeline where its plan put it, device and dtype, with an
  :class:`AutoPrepareWarning`; so does a ``.to()`` that contradicts a ``device`` or ``dtype``
  given to the scope. Any other move is done as asked.
- ``pipe.enable_attention_slicing()`` / ``disable_attention_slicing()``, when the plan uses the
  library's own attention processor (``attention_processor="safe"``), keep the plan's attention
  set-up, with an :class:`AutoPrepareWarning`: diffusers' sliced processor gives NaN (black)
  images on mps, and its slicing costs time with no memory saved where SDPA is available.
  Force slicing with the ``attention_slicing`` option instead.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import threading
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

from mps_helpers._util import dtype_name

if TYPE_CHECKING:
    import torch

    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

__all__ = ["AutoPrepare", "AutoPrepareWarning", "active_options", "auto_prepare"]

_log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

_LOADERS: Final = ("from_pretrained", "from_single_file", "from_pipe")


class AutoPrepareWarning(UserWarning):
    """Code running under :func:`auto_prepare` asked for something its plan overrides.

    Issued for ``pipe.to(...)`` aimed at a device the machine does not have, or against a
    ``device`` or ``dtype`` given to the scope, and for ``pipe.enable_attention_slicing()`` /
    ``disable_attention_slicing()`` on a pipeline whose plan uses the library's own attention
    processor. The warning points at the line that made the call.

    .. versionadded:: 0.1
    """


# The calling thread's (or task's) stack of active option sets, innermost last. New threads
# start with the default: no scope, so they see no options.
_stack: contextvars.ContextVar[tuple[Mapping[str, Any], ...]] = contextvars.ContextVar(
    "mps_helpers_auto_prepare", default=()
)
# True inside a patched loader of this thread: nested loader calls return unprepared results
# and only the outermost one prepares.
_loading: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mps_helpers_auto_prepare_loading", default=False
)


class _Patches:
    """The process-wide patches, installed while at least one scope is active in any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scopes = 0
        # (owner class, attribute name, original descriptor, replacement) of each patch.
        self.installed: list[tuple[type, str, Any, Any]] = []

    def acquire(self) -> None:
        with self._lock:
            if self._scopes == 0:
                _install(self.installed)
            self._scopes += 1

    def release(self) -> None:
        with self._lock:
            self._scopes -= 1
            if self._scopes == 0:
                _uninstall(self.installed)


_patches = _Patches()


def active_options() -> Mapping[str, Any] | None:
    """Return the options of this thread's innermost active scope, or None outside any scope."""
    stack = _stack.get()
    return stack[-1] if stack else None


@overload
def auto_prepare(func: _F, /) -> _F: ...


@overload
def auto_prepare(func: None = None, /, **options: Any) -> AutoPrepare: ...


def auto_prepare(func: _F | None = None, /, **options: Any) -> _F | AutoPrepare:
    """Return a decorator and context manager that prepares every pipeline loaded inside it.

    Three forms::

        @auto_prepare
        def main(): ...

        @auto_prepare(attention_slicing=False)
        def main(): ...

        with auto_prepare(device="cpu"):
            pipe = DiffusionPipeline.from_pretrained(...)

    Inside, every pipeline created through ``from_pretrained``, ``from_single_file`` or
    ``from_pipe`` (of ``DiffusionPipeline``, of any pipeline class, of the
    ``AutoPipelineFor*`` classes) is returned already prepared by
    :func:`~mps_helpers.prepare_pipeline` with ``options``; a pipeline that the decorated
    function returns is prepared too. On exit, normal or by an exception, diffusers is exactly
    as before. Scopes nest: an inner scope's options are merged over the outer one's. A scope
    is seen only by the thread (or asyncio task) that entered it: other threads loading
    pipelines meanwhile get them unprepared.

    While a scope is active, a prepared pipeline's ``.to(device)`` to a device this machine
    lacks (or against a ``device``/``dtype`` given to the scope) keeps the planned placement,
    and ``enable_attention_slicing()`` keeps the plan's safe attention, each with an
    :class:`AutoPrepareWarning`. The documentation's how-to "Run existing scripts and code
    unchanged" gives the details.

    Args:
        func: the function to decorate (the bare ``@auto_prepare`` form).
        **options: keyword options of :func:`~mps_helpers.prepare_pipeline` (``device``,
            ``dtype``, ``attention_slicing``, ...). Their values are checked on entering.

    Raises:
        TypeError: an option is not one of :func:`~mps_helpers.prepare_pipeline`'s (raised
            here, at decoration time), or ``func`` is not callable.
        ValueError: an option's value is invalid (raised on entering, before anything is
            patched).

    .. versionadded:: 0.1
    """
    scope = AutoPrepare(**options)
    if func is None:
        return scope
    if options:
        raise TypeError("auto_prepare() takes either a function or keyword options, not both")
    return scope(func)


class AutoPrepare:
    """The object :func:`auto_prepare` returns: a re-entrant context manager and decorator.

    .. versionadded:: 0.1
    """

    def __init__(self, **options: Any) -> None:
        _check_option_names(options)
        self._options: Mapping[str, Any] = MappingProxyType(dict(options))
        # Tokens of this object's own entries, per thread, so that one object can be entered
        # again (nested, or from several threads) and each exit undoes its own entry.
        self._local = threading.local()

    @property
    def options(self) -> Mapping[str, Any]:
        """Return the options this scope was given (read-only)."""
        return self._options

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"auto_prepare({shown})"

    def __enter__(self) -> AutoPrepare:
        token = _enter(self._options)
        tokens: list[contextvars.Token[tuple[Mapping[str, Any], ...]]]
        tokens = self._local.__dict__.setdefault("tokens", [])
        tokens.append(token)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _leave(self._local.tokens.pop())

    def __call__(self, func: _F) -> _F:
        """Return ``func`` wrapped so that each call runs inside this scope."""
        if not callable(func):
            raise TypeError(f"auto_prepare() decorates a callable, got {func!r}")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # A generator runs after the call returns, outside any scope the call set up.
            raise TypeError(
                f"auto_prepare() cannot decorate the generator function {func.__qualname__}: "
                "use `with auto_prepare(...):` inside it instead"
            )
        options = self._options
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                token = _enter(options)
                try:
                    return _prepare_result(await func(*args, **kwargs))
                finally:
                    _leave(token)

            return run_async  # type: ignore[return-value]  # wraps func, same signature

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            token = _enter(options)
            try:
                return _prepare_result(func(*args, **kwargs))
            finally:
                _leave(token)

        return run  # type: ignore[return-value]  # wraps func, same signature


# ---------------------------------------------------------------------------------------
# Entering and leaving


def _check_option_names(options: Mapping[str, Any]) -> None:
    from mps_helpers._options import OPTION_NAMES

    valid = ["env", *OPTION_NAMES]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"auto_prepare() got unexpected option(s) {', '.join(map(repr, unknown))}: "
            f"valid options are {', '.join(valid)}"
        )


def _check_option_values(options: Mapping[str, Any]) -> None:
    # The plan's own validation: ValueError listing the valid values, nothing planned or
    # changed. ``env`` is not a decision: prepare_pipeline checks it.
    from mps_helpers._options import validate_options

    validate_options(**{name: value for name, value in options.items() if name != "env"})


def _enter(options: Mapping[str, Any]) -> contextvars.Token[tuple[Mapping[str, Any], ...]]:
    stack = _stack.get()
    merged = MappingProxyType({**(stack[-1] if stack else {}), **options})
    _check_option_values(merged)
    _patches.acquire()
    return _stack.set((*stack, merged))


def _leave(token: contextvars.Token[tuple[Mapping[str, Any], ...]]) -> None:
    _stack.reset(token)
    _patches.release()


def _prepare_result(result: object) -> Any:
    from diffusers import DiffusionPipeline

    options = active_options()
    if options is None or not isinstance(result, DiffusionPipeline):
        return result
    _log.info("auto_prepare: preparing the %s the function returned", type(result).__name__)
    return _prepare(result, options)


def _prepare(pipe: Pipeline, options: Mapping[str, Any]) -> Any:
    from mps_helpers._apply import prepare_pipeline

    return prepare_pipeline(pipe, **options)


# ---------------------------------------------------------------------------------------
# Patches


def _targets() -> list[tuple[type, str, Any, Any]]:
    """Return (owner, name, original, replacement) for every patch, changing nothing."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders.single_file import FromSingleFileMixin
    from diffusers.pipelines import auto_pipeline

    owners: list[type] = [DiffusionPipeline, FromSingleFileMixin]
    # The AutoPipelineFor* classes are not DiffusionPipeline subclasses and their from_pipe
    # builds the new pipeline itself.
    owners += [
        cls
        for cls in vars(auto_pipeline).values()
        if isinstance(cls, type) and cls.__module__ == auto_pipeline.__name__
    ]
    # Pipeline classes already imported that override a loader in their own namespace.
    for base in (DiffusionPipeline, FromSingleFileMixin):
        owners += [cls for cls in _subclasses(base) if cls not in owners]

    targets: list[tuple[type, str, Any, Any]] = []
    for owner in owners:
        for name in _LOADERS:
            original = owner.__dict__.get(name)
            if isinstance(original, classmethod):
                targets.append((owner, name, original, _patched_loader(original)))
    methods: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
        "to": _patched_to,
        "enable_attention_slicing": _patched_enable_slicing,
        "disable_attention_slicing": _patched_disable_slicing,
    }
    for name, patch in methods.items():
        original = DiffusionPipeline.__dict__[name]
        targets.append((DiffusionPipeline, name, original, patch(original)))
    return targets


def _subclasses(base: type) -> list[type]:
    found: list[type] = []
    todo = [base]
    while todo:
        subclasses: list[type] = todo.pop().__subclasses__()
        for sub in subclasses:
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _install(installed: list[tuple[type, str, Any, Any]]) -> None:
    targets = _targets()  # computed in full first: a failure here changes nothing
    for owner, name, _original, replacement in targets:
        setattr(owner, name, replacement)
    installed[:] = targets
    _log.debug("auto_prepare: %d methods patched", len(targets))


def _uninstall(installed: list[tuple[type, str, Any, Any]]) -> None:
    for owner, name, original, replacement in reversed(installed):
        if owner.__dict__.get(name) is replacement:
            setattr(owner, name, original)
        else:
            # Someone patched over ours: leave theirs; ours passes through with no scope active.
            _log.warning(
                "auto_prepare: %s.%s was replaced while active; left as it is",
                owner.__qualname__,
                name,
            )
    installed.clear()


def _patched_loader(original: classmethod[Any, ..., Any]) -> classmethod[Any, ..., Any]:
    @functools.wraps(original.__func__)
    def loader(cls: type, *args: Any, **kwargs: Any) -> Any:
        bound = original.__get__(None, cls)
        options = active_options()
        if options is None or _loading.get():
            return bound(*args, **kwargs)
        token = _loading.set(True)
        try:
            pipe = bound(*args, **kwargs)
        finally:
            _loading.reset(token)
        _log.info("auto_prepare: preparing what %s.%s returned", cls.__name__, loader.__name__)
        return _prepare(pipe, options)

    loader.__mps_helpers_original__ = original  # type: ignore[attr-defined]  # a mark on a function
    return classmethod(loader)


def _plan_if_active(pipe: Pipeline) -> Plan | None:
    """Return ``pipe``'s plan when this thread has an active scope, else None."""
    if active_options() is None:
        return None
    from mps_helpers._apply import plan_of

    return plan_of(pipe)


def _patched_to(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def to(self: Any, *args: Any, **kwargs: Any) -> Any:
        plan = _plan_if_active(self)
        request = None if plan is None else _to_request(args, kwargs)
        if plan is None or request is None:
            return original(self, *args, **kwargs)
        device, dtype, extra = request
        ignored = _ignored_parts(plan, active_options() or {}, device, dtype)
        if not ignored:
            return original(self, *args, **kwargs)
        device = None if "device" in ignored else device
        dtype = None if "dtype" in ignored else dtype
        shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        head = f"{type(self).__name__}.to({shown})"
        if device is not None or dtype is not None:
            head += f": its {' and '.join(ignored)}"
        warnings.warn(
            f"{head} ignored: {'; '.join(ignored.values())}. The plan placed the pipeline on "
            f"{plan.device} in {dtype_name(plan.dtype)} (auto_prepare keeps code written for "
            "another machine, or overridden by an option, running as planned)",
            AutoPrepareWarning,
            stacklevel=2,
        )
        if device is None and dtype is None:
            return self
        return original(self, device=device, dtype=dtype, **extra)

    return to


def _ignored_parts(
    plan: Plan,
    options: Mapping[str, Any],
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> dict[str, str]:
    """Return the parts of a ``.to()`` request that the plan overrides, each with why."""
    ignored: dict[str, str] = {}
    if device is not None and device.type != plan.device:
        if not _device_exists(device):
            ignored["device"] = f"this machine has no {device.type} device"
            if dtype is not None:
                ignored["dtype"] = f"{dtype_name(dtype)} was meant for that device"
        elif options.get("device", "auto") != "auto":
            ignored["device"] = f"device={plan.device!r} was given to auto_prepare"
    forced_dtype = options.get("dtype", "auto") != "auto"
    if dtype is not None and dtype != plan.dtype and forced_dtype and "dtype" not in ignored:
        ignored["dtype"] = f"dtype={dtype_name(plan.dtype)!r} was given to auto_prepare"
    return ignored


def _slicing_ignored(pipe: Pipeline, plan: Plan, method: str) -> None:
    kept = "memory-bounded safe attention" if plan.attention_slicing else "unsliced attention"
    why = plan.reasons.get("attention_slicing", "").rstrip(".")
    warnings.warn(
        f"{type(pipe).__name__}.{method}() ignored under auto_prepare: the plan keeps {kept} "
        f"on {plan.device} ({why}); diffusers' sliced attention gives black images on mps. "
        "Choose with attention_slicing=True/False (command line: --attention-slicing on/off)",
        AutoPrepareWarning,
        stacklevel=3,
    )


def _patched_enable_slicing(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def enable_attention_slicing(self: Any, slice_size: str | int | None = "auto") -> Any:
        plan = _plan_if_active(self)
        if plan is None or plan.attention_processor != "safe":
            return original(self, slice_size)
        _slicing_ignored(self, plan, "enable_attention_slicing")
        return None

    return enable_attention_slicing


def _patched_disable_slicing(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def disable_attention_slicing(self: Any) -> Any:
        plan = _plan_if_active(self)
        if plan is None or plan.attention_processor != "safe":
            return original(self)
        _slicing_ignored(self, plan, "disable_attention_slicing")
        return None

    return disable_attention_slicing


def _to_request(
    args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[torch.device | None, torch.dtype | None, dict[str, Any]] | None:
    """Return (device, dtype, other keywords) of a ``DiffusionPipeline.to`` call.

    None when the arguments are not a valid call: diffusers then raises its own error.
    """
    import torch

    extra = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    if len(args) > 2 or (len(args) == 2 and (device is not None or dtype is not None)):
        return None
    if len(args) == 2:
        device, dtype = args
    elif len(args) == 1:
        if isinstance(args[0], torch.dtype):
            if dtype is not None:
                return None
            dtype = args[0]
        elif device is None:
            device = args[0]
        else:
            return None
    if dtype is not None and not isinstance(dtype, torch.dtype):
        return None
    try:
        return (None if device is None else torch.device(device)), dtype, extra
    except (RuntimeError, TypeError):
        return None


def _device_exists(device: torch.device) -> bool:
    """Return whether ``device`` can be used on this machine (unknown kinds: assume it can)."""
    import torch

    if device.type == "cpu":
        return True
    if device.type == "mps":
        return bool(torch.backends.mps.is_available())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        return device.index is None or device.index < torch.cuda.device_count()
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else True
