"""Bounded attention: every SDPA call of a prepared call stays under the plan's bound.

Unit tests of :func:`bounded_sdpa` over SDPA's argument space, then tiny Flux, SD3, Wan and
SD pipelines prepared with a small bound and run under a CPU emulation of mps' element
limit (an SDPA that raises, or silently corrupts, past N score elements).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from _emulation import LIMIT_ERROR, sdpa_element_limit
from _tiny_transformers import tiny_flux, tiny_wan
from machines import MACHINES

from mps_helpers import plan_for
from mps_helpers._apply import apply_plan
from mps_helpers._bounded import bounded_attention, bounded_sdpa, score_elements
from mps_helpers._call_scope import call_scope
from mps_helpers.testing import tiny_pipeline

if TYPE_CHECKING:
    from collections.abc import Callable

SDPA = F.scaled_dot_product_attention
CPU = MACHINES["linux-cpu"]


def spy() -> tuple[list[int], Callable[..., torch.Tensor]]:
    sizes: list[int] = []

    def counted(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes.append(score_elements(query, key))
        return SDPA(query, key, value, *args, **kwargs)

    return sizes, counted


def tensors(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


B, H, L, S, E = 2, 4, 33, 17, 8
Q, K, V = tensors((B, H, L, E), (B, H, S, E), (B, H, S, E))
KG, VG = tensors((B, 2, S, E), (B, 2, S, E), seed=1)
MASKS: dict[str, torch.Tensor] = {
    "additive (L, S)": tensors((L, S), seed=2)[0],
    "additive per batch (B, 1, 1, S)": tensors((B, 1, 1, S), seed=3)[0],
    "boolean (B, H, L, S)": tensors((B, H, L, S), seed=4)[0] > -0.5,
    "boolean per head (1, H, 1, S)": tensors((1, H, 1, S), seed=5)[0] > -0.5,
}


def check(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bound: int, **kwargs: Any
) -> list[int]:
    """Assert bounded_sdpa equals SDPA within 1e-5 and no block exceeds ``bound``."""
    sizes, counted = spy()
    mask = kwargs.pop("attn_mask", None)
    expected = SDPA(query, key, value, attn_mask=mask, **kwargs)
    got = bounded_sdpa(query, key, value, mask, chunk_elements=bound, sdpa=counted, **kwargs)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert max(sizes) <= max(bound, key.shape[-2])
    return sizes


@pytest.mark.parametrize("bound", [S, 200, 2000, 10**6])
def test_bounded_sdpa_equals_sdpa_with_blocks_under_the_bound(bound: int) -> None:
    sizes = check(Q, K, V, bound)
    total = score_elements(Q, K)
    assert sum(sizes) == total  # every score element once, no more
    assert (len(sizes) == 1) == (total <= bound)


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_keep_their_meaning_per_block(name: str) -> None:
    assert len(check(Q, K, V, 200, attn_mask=MASKS[name])) > 1


def test_scale_is_passed_to_every_block() -> None:
    check(Q, K, V, 200, scale=0.3)


@pytest.mark.parametrize("query_len", [S, L])
def test_is_causal_becomes_each_blocks_part_of_the_causal_mask(query_len: int) -> None:
    query = Q[:, :, :query_len]
    assert len(check(query, K, V, 100, is_causal=True)) > 1


@pytest.mark.parametrize("bound", [200, 3 * S * 2, 10**6])
def test_grouped_query_attention(bound: int) -> None:
    # 4 query heads over 2 key/value heads; blocks of 1 head split a group (repeat path),
    # blocks of whole groups keep enable_gqa.
    check(Q, KG, VG, bound, enable_gqa=True)


def test_three_and_five_dimensional_inputs() -> None:
    check(Q[0], K[0], V[0], 200)
    check(Q[0], K[0], V[0], 200, attn_mask=MASKS["additive (L, S)"])
    q5, k5, v5 = tensors((2, B, H, L, E), (2, B, H, S, E), (2, B, H, S, E), seed=6)
    check(q5, k5, v5, 200, attn_mask=MASKS["additive per batch (B, 1, 1, S)"])


def test_output_keeps_the_querys_layout() -> None:
    # diffusers' dispatcher hands SDPA permuted (B, L, H, E) buffers and permutes back.
    query = Q.transpose(1, 2).contiguous().transpose(1, 2)
    out = bounded_sdpa(query, K, V, chunk_elements=200)
    assert out.transpose(1, 2).is_contiguous()
    assert bounded_sdpa(Q, K, V, chunk_elements=200).is_contiguous()


def test_a_row_longer_than_the_bound_is_one_block() -> None:
    sizes = check(Q, K, V, 5)
    assert set(sizes) == {S}


def test_upcast_computes_in_float32_and_returns_the_querys_dtype() -> None:
    half = [t.bfloat16() for t in (Q, K, V)]
    got = bounded_sdpa(*half, chunk_elements=10**6, upcast=True)
    assert got.dtype == torch.bfloat16
    expected = SDPA(*(t.float() for t in half)).bfloat16()
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------
# The context manager


def test_bounded_attention_replaces_sdpa_only_inside() -> None:
    assert F.scaled_dot_product_attention is SDPA
    with bounded_attention(200):
        assert F.scaled_dot_product_attention is not SDPA
        out = F.scaled_dot_product_attention(Q, K, V)
    assert F.scaled_dot_product_attention is SDPA
    assert torch.allclose(out, SDPA(Q, K, V), atol=1e-6)


def test_calls_within_the_bound_reach_the_native_kernel_unchanged() -> None:
    seen: list[tuple[Any, ...]] = []

    def native(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((args, kwargs))
        return SDPA(*args, **kwargs)

    with sdpa_element_limit(10**9), pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", native)
        with bounded_attention(10**6):
            F.scaled_dot_product_attention(Q, K, V, None, 0.0, is_causal=False)
    ((args, kwargs),) = seen
    assert args[:3] == (Q, K, V)
    assert args[3:] == (None, 0.0)
    assert kwargs == {"is_causal": False}


def test_keyword_calls_as_the_dispatcher_makes_them() -> None:
    with sdpa_element_limit(200) as sizes, bounded_attention(200):
        out = F.scaled_dot_product_attention(
            query=Q, key=K, value=V, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None
        )
    assert torch.allclose(out, SDPA(Q, K, V), atol=1e-5)
    assert max(sizes) <= 200


def test_nested_bounds_innermost_wins_and_all_unwind() -> None:
    with sdpa_element_limit(10**9) as sizes, bounded_attention(2000):
        with bounded_attention(200):
            F.scaled_dot_product_attention(Q, K, V)
        inner = max(sizes)
        sizes.clear()
        F.scaled_dot_product_attention(Q, K, V)
        outer = max(sizes)
    assert inner <= 200 < outer <= 2000
    assert F.scaled_dot_product_attention is SDPA


def test_the_bound_belongs_to_the_thread_that_set_it() -> None:
    seen: dict[str, int] = {}

    def other() -> None:
        before = len(sizes)
        F.scaled_dot_product_attention(Q, K, V)
        seen["other"] = len(sizes) - before

    with sdpa_element_limit(10**9) as sizes, bounded_attention(200):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert seen["other"] == 1  # the other thread's call is one native call


def test_device_filter_leaves_other_devices_alone() -> None:
    with sdpa_element_limit(10**9) as sizes, bounded_attention(200, device="mps"):
        F.scaled_dot_product_attention(Q, K, V)
    assert sizes == [score_elements(Q, K)]


def test_upcast_from_applies_to_long_half_precision_calls_only() -> None:
    half = [t.bfloat16() for t in (Q, K, V)]
    with bounded_attention(10**6, upcast_from=S):
        long = F.scaled_dot_product_attention(*half)
    with bounded_attention(10**6, upcast_from=S + 1):
        short = F.scaled_dot_product_attention(*half)
    assert torch.equal(long, SDPA(*(t.float() for t in half)).bfloat16())
    assert torch.equal(short, SDPA(*half))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2**20"])
def test_bad_bounds_raise_before_anything_changes(bad: Any) -> None:
    with pytest.raises(ValueError, match="chunk_elements must be a positive integer"):
        bounded_attention(bad).__enter__()
    assert F.scaled_dot_product_attention is SDPA


def test_cpu_and_cuda_plans_need_no_call_scope() -> None:
    assert call_scope(plan_for(env=CPU)) is None
    assert call_scope(plan_for(env=MACHINES["linux-cuda"])) is None


# ---------------------------------------------------------------------------------------
# Real tiny pipelines under the element-limit emulation

#: Bound and emulated limit for the tiny pipelines: above their longest key row (Flux: 512
#: text + 256 image tokens), far below their largest attention (Flux: 2 x 768 x 768; Wan at
#: 128 px x 17 frames: 2 heads x 320 video tokens squared).
BOUND = 2**14

CASES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "flux": (tiny_flux, {"height": 32, "width": 32}),
    "sd3": (lambda: tiny_pipeline("sd3"), {}),
    "wan": (tiny_wan, {"height": 128, "width": 128, "num_frames": 17}),
    "sd": (lambda: tiny_pipeline("sd"), {}),
}


def run(pipe: Any, size: dict[str, Any]) -> Any:
    output = pipe(
        "a red fox",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **size,
    )
    return output.frames if hasattr(output, "frames") else output.images


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Any, dict[str, Any], Any]:
    build, size = CASES[request.param]
    pipe = build()
    return request.param, pipe, size, run(pipe, size)


def test_the_emulation_breaks_the_unprepared_pipeline(case: Any) -> None:
    _name, pipe, size, reference = case
    with sdpa_element_limit(BOUND) as sizes, pytest.raises(RuntimeError, match=LIMIT_ERROR):
        run(pipe, size)
    assert max(sizes) > BOUND
    with sdpa_element_limit(BOUND, corrupt=True):
        corrupted = run(pipe, size)
    assert abs(corrupted - reference).max() > 1e-3


def bounded(pipe: Any) -> Any:
    plan = plan_for(pipe, env=CPU, device="cpu", nan_guard=False, oom_retry=False)
    return apply_plan(pipe, plan.replace(attention_bound=BOUND))


@pytest.mark.parametrize("corrupt", [False, True])
def test_prepared_pipeline_runs_bounded_and_equal(case: Any, corrupt: bool) -> None:
    _name, pipe, size, reference = case
    prepared = bounded(pipe)
    with sdpa_element_limit(BOUND, corrupt=corrupt) as sizes:
        out = run(prepared, size)
    assert max(sizes) <= BOUND  # the counting spy: no block above the bound
    assert (abs(out - reference).max()) <= 1e-5
    assert F.scaled_dot_product_attention is SDPA  # restored after the call


def test_a_plan_without_a_bound_adds_nothing_to_the_call(case: Any) -> None:
    _name, pipe, size, reference = case
    plan = plan_for(pipe, env=CPU, device="cpu", nan_guard=False, oom_retry=False)
    assert plan.attention_bound is None
    assert not plan.float64_rescue
    prepared = apply_plan(pipe, plan)
    with sdpa_element_limit(10**12) as sizes:
        out = run(prepared, size)
    with sdpa_element_limit(10**12) as plain_sizes:
        run(pipe, size)
    assert sizes == plain_sizes  # the same native calls, none split
    assert abs(out - reference).max() <= 1e-6
