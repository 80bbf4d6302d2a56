"""SafeSlicedAttnProcessor: chunk planning, equality with diffusers' default, the mps NaN bug."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
)

from mps_helpers import _attention  # noqa: E402
from mps_helpers._attention import (  # noqa: E402
    DEFAULT_CHUNK_ELEMENTS,
    MAX_CHUNK_ELEMENTS,
    MIN_CHUNK_ROWS,
    SafeSlicedAttnProcessor,
    _chunk_shape,
    chunk_rows,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ATOL = 1e-5


def assert_close(actual: Any, expected: Any) -> None:
    """Assert float32 outputs agree to ATOL (absolute), as the issue asks."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- chunk planning

# (batch*heads, query_len, key_len, chunk_elements) -> (heads_per_chunk, rows_per_chunk)
CHUNK_ROWS_CASES = [
    # SD 1.5, batch 2 x 8 heads, 512 px: 4096 tokens; one head is 2**24 elements.
    ((16, 4096, 4096, 2**28), (16, 4096)),  # all of it (2**28 exactly)
    ((16, 4096, 4096, 2**26), (16, 1024)),  # all heads, 1024 rows
    ((16, 4096, 4096, 2**24), (4, 1024)),  # 1024 rows, then as many heads as fit
    ((16, 4096, 4096, 2**22), (1, 1024)),
    ((16, 4096, 4096, 2**20), (1, 256)),  # fewer rows only when one head's 1024 don't fit
    # cross-attention against 77 text tokens fits whole
    ((16, 4096, 77, 2**26), (16, 4096)),
    # 768 px: 9216 tokens. 7 heads of 1024 rows fit: balanced to 6 heads, 1152 rows
    ((16, 9216, 9216, 2**26), (6, 1152)),
    ((16, 9216, 9216, 2**22), (1, 439)),  # 455 rows fit: 21 chunks of 439
    # 1024 px: 16384 tokens
    ((16, 16384, 16384, 2**26), (4, 1024)),
    # short sequences keep all their rows: 3 heads of 10 x 10 fit, 10 heads -> 4 x (3 or 1)
    ((10, 10, 10, 300), (3, 10)),
    ((8, 10, 10, 700), (4, 10)),  # 7 fit, 8 heads -> 2 balanced chunks of 4
    # one row per chunk when the bound is exactly one row
    ((2, 5, 7, 7), (1, 1)),
    ((1, 1, 1, 1), (1, 1)),
]


@pytest.mark.parametrize(("args", "expected"), CHUNK_ROWS_CASES)
def test_chunk_rows_table(args: tuple[int, int, int, int], expected: tuple[int, int]) -> None:
    assert chunk_rows(*args) == expected


def test_chunk_rows_bounds_every_block() -> None:
    grid = itertools.product(
        [1, 2, 3, 8, 16, 40],
        [1, 77, 1000, 4096, 9216, 16384, 65536],
        [77, 1024, 4096, 16384, 65536],
        [65536, 2**20, 2**24, DEFAULT_CHUNK_ELEMENTS, MAX_CHUNK_ELEMENTS],
    )
    for batch_heads, query_len, key_len, chunk_elements in grid:
        case = (batch_heads, query_len, key_len, chunk_elements)
        heads, rows = chunk_rows(*case)
        assert 1 <= heads <= batch_heads, case
        assert 1 <= rows <= query_len, case
        assert heads * rows * key_len <= chunk_elements <= MAX_CHUNK_ELEMENTS < 2**31, case
        # rows are cut below MIN_CHUNK_ROWS only once a chunk is down to one head
        assert heads == 1 or rows >= min(query_len, MIN_CHUNK_ROWS), case
        # Not wastefully many chunks: at most twice the minimum, plus one per head (rounding).
        chunks = math.ceil(batch_heads / heads) * math.ceil(query_len / rows)
        minimum = math.ceil(batch_heads * query_len * key_len / chunk_elements)
        assert chunks <= 2 * minimum + batch_heads, case


def test_chunk_rows_huge_image_stays_under_int_max() -> None:
    # 2048 px SD: 256x256 latents, 65536 tokens; batch 4 x 8 heads = 4.4e10 scores in all.
    heads, rows = chunk_rows(32, 65536, 65536, MAX_CHUNK_ELEMENTS)
    assert heads * rows * 65536 <= 2**29


@pytest.mark.parametrize(
    "args",
    [
        (0, 1, 1, 1),
        (1, 0, 1, 1),
        (1, 1, 0, 1),
        (1, 1, 1, 0),
        (1, 1, 1, True),
        (1, 1.5, 1, 1),
        (1, 1, 100, 99),  # less than one query row
    ],
)
def test_chunk_rows_rejects(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match=r"chunk_elements|must be a positive integer"):
        chunk_rows(*args)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # SD 1.5 with guidance (batch 2 x 8 heads): the shapes docs/explanation/attention.md
        # measured
        ((2, 8, 4096, 4096, 2**26), (2, 8, 1024)),  # 512 px: 4 chunks
        ((2, 8, 4096, 4096, 2**24), (1, 4, 1024)),
        ((2, 8, 9216, 9216, 2**24), (1, 1, 1536)),  # 768 px
        ((2, 8, 9216, 9216, 2**26), (1, 4, 1536)),
        ((2, 8, 9216, 9216, 2**27), (1, 8, 1536)),
        ((2, 8, 9216, 9216, 2**28), (2, 8, 1536)),
        ((2, 8, 16384, 16384, 2**26), (1, 4, 1024)),  # 1024 px
        # whole batch items when more heads than one item's fit
        ((3, 4, 24, 24, 6911), (2, 4, 24)),
    ],
)
def test_chunk_shape_table(
    args: tuple[int, int, int, int, int], expected: tuple[int, int, int]
) -> None:
    assert _chunk_shape(*args) == expected


def test_chunk_shape_stays_inside_batch_items() -> None:
    grid = itertools.product(
        [1, 2, 3, 4], [1, 5, 8], [1, 64, 4096, 9216], [77, 4096, 9216], [9216, 2**20, 2**26]
    )
    for batch, heads, query_len, key_len, chunk_elements in grid:
        case = (batch, heads, query_len, key_len, chunk_elements)
        b, h, r = _chunk_shape(*case)
        assert 1 <= b <= batch, case
        assert 1 <= h <= heads, case
        assert 1 <= r <= query_len, case
        assert b == 1 or h == heads, case  # never part of one batch item and part of the next
        assert b * h * r * key_len <= chunk_elements, case
        assert b * h == 1 or r >= min(query_len, MIN_CHUNK_ROWS), case


@pytest.mark.parametrize("bad", [0, -1, MAX_CHUNK_ELEMENTS + 1, 2**31, 1.0, True, "auto"])
def test_processor_rejects_bad_chunk_elements(bad: Any) -> None:
    with pytest.raises(ValueError, match="chunk_elements must be None or an integer"):
        SafeSlicedAttnProcessor(bad)


def test_processor_default_and_repr() -> None:
    assert SafeSlicedAttnProcessor().chunk_elements == DEFAULT_CHUNK_ELEMENTS
    assert repr(SafeSlicedAttnProcessor(4096)) == "SafeSlicedAttnProcessor(chunk_elements=4096)"


def test_import_loads_no_torch() -> None:
    code = "import sys, mps_helpers._attention; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------------- one Attention module

# Bounds that exercise each path on these small modules: the fast path (None), groups of
# whole heads (4096), rows split within a head (512), one row per block or less (24).
CHUNKS = [None, 4096, 512, 24]


def _compare(
    attn: Any,
    call: Callable[[], Any],
    chunk_elements: int | None,
    reference: Any = None,
) -> None:
    """Assert ``call()`` with our processor equals it with ``reference`` (default processor)."""
    torch.manual_seed(0)
    attn.set_processor(reference if reference is not None else AttnProcessor2_0())
    expected = call()
    attn.set_processor(SafeSlicedAttnProcessor(chunk_elements))
    actual = call()
    assert actual.shape == expected.shape
    assert_close(actual, expected)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)


@pytest.mark.parametrize("chunk_elements", CHUNKS)
def test_self_attention(chunk_elements: int | None) -> None:
    attn = Attention(32, heads=4, dim_head=8).eval()
    x = torch.randn(3, 24, 32)
    with torch.no_grad():
        _compare(attn, lambda: attn(x), chunk_elements)


@pytest.mark.parametrize(
    ("chunk_elements", "calls"),
    [
        (None, 1),  # fast path: all 3 x 4 heads x 24 rows x 24 keys = 6912 elements
        (6912, 1),
        (6911, 2),  # 3 x 4 heads don't fit: whole batch items, 2 chunks of (2 or 1) x 4 heads
        (4096, 3),  # 7 heads fit: one batch item (4 heads) per chunk
        (512, 12 * 2),  # 21 rows of one head fit: 2 chunks of 12 rows per head
        (24, 12 * 24),  # one row per chunk
        (1, 12 * 24),  # less than a row: still one row per chunk
    ],
)
def test_chunk_count(
    monkeypatch: pytest.MonkeyPatch, chunk_elements: int | None, calls: int
) -> None:
    # One SDPA call per chunk: the chunked path really runs, with the planned shape.
    attn = Attention(32, heads=4, dim_head=8).eval()
    x = torch.randn(3, 24, 32)
    with torch.no_grad():
        expected = attn(x)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        seen: list[tuple[int, ...]] = []

        def counting_sdpa(query: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(tuple(query.shape))
            return sdpa(query, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
        attn.set_processor(SafeSlicedAttnProcessor(chunk_elements))
        assert_close(attn(x), expected)
    assert len(seen) == calls
    bound = max(chunk_elements or DEFAULT_CHUNK_ELEMENTS, 24)
    assert all(b * h * rows * 24 <= bound for b, h, rows, _ in seen)


@pytest.mark.parametrize("chunk_elements", CHUNKS)
@pytest.mark.parametrize("mask_kind", ["bias-per-key", "bias-per-query", "bool"])
def test_cross_attention_with_mask(chunk_elements: int | None, mask_kind: str) -> None:
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8).eval()
    x = torch.randn(3, 24, 32)
    context = torch.randn(3, 10, 16)
    keep = torch.ones(3, 1 if mask_kind != "bias-per-query" else 24, 10, dtype=torch.bool)
    keep[0, :, 7:] = False
    keep[2, :, :3] = False
    mask: Any = keep if mask_kind == "bool" else (~keep).float() * -10000.0
    with torch.no_grad():
        _compare(
            attn,
            lambda: attn(x, encoder_hidden_states=context, attention_mask=mask),
            chunk_elements,
        )


@pytest.mark.parametrize("chunk_elements", CHUNKS)
def test_group_norm_residual_4d_input(chunk_elements: int | None) -> None:
    # The VAE's mid-block attention: 4-D input, group norm, residual, output rescale.
    attn = Attention(
        32,
        heads=2,
        dim_head=16,
        norm_num_groups=8,
        residual_connection=True,
        rescale_output_factor=2.0,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).eval()
    x = torch.randn(2, 32, 5, 6)
    with torch.no_grad():
        _compare(attn, lambda: attn(x), chunk_elements)


@pytest.mark.parametrize("chunk_elements", CHUNKS)
def test_spatial_norm(chunk_elements: int | None) -> None:
    attn = Attention(32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True).eval()
    x = torch.randn(2, 32, 4, 6)
    zq = torch.randn(2, 4, 2, 3)
    with torch.no_grad():
        _compare(attn, lambda: attn(x, temb=zq), chunk_elements)


@pytest.mark.parametrize("chunk_elements", CHUNKS)
@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_cross_norm_and_qk_norm(chunk_elements: int | None, norm: str) -> None:
    attn = Attention(
        32,
        cross_attention_dim=16,
        heads=4,
        dim_head=8,
        cross_attention_norm=norm,
        cross_attention_norm_num_groups=4,
        qk_norm="layer_norm",
    ).eval()
    x = torch.randn(2, 20, 32)
    context = torch.randn(2, 9, 16)
    with torch.no_grad():
        _compare(attn, lambda: attn(x, encoder_hidden_states=context), chunk_elements)


@pytest.mark.parametrize("chunk_elements", CHUNKS)
def test_unscaled_attention_matches_its_default(chunk_elements: int | None) -> None:
    # scale_qk=False makes attn.scale 1.0 and diffusers falls back to the classic processor.
    attn = Attention(32, heads=4, dim_head=8, scale_qk=False).eval()
    assert type(attn.processor) is AttnProcessor
    x = torch.randn(2, 12, 32) * 0.3
    with torch.no_grad():
        _compare(attn, lambda: attn(x), chunk_elements, reference=AttnProcessor())


@pytest.mark.parametrize("chunk_elements", [None, 64])
@pytest.mark.parametrize("scale_qk", [True, False])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("torch_has", ["sdpa-without-scale", "no-sdpa"])
def test_older_torch_paths(
    monkeypatch: pytest.MonkeyPatch,
    chunk_elements: int | None,
    scale_qk: bool,
    mask: bool,
    torch_has: str,
) -> None:
    # torch 2.0 has SDPA without ``scale=``; torch 1.13 has no SDPA: both fall back correctly.
    attn = Attention(32, cross_attention_dim=16, heads=4, dim_head=8, scale_qk=scale_qk).eval()
    x = torch.randn(2, 12, 32) * 0.3
    context = torch.randn(2, 5, 16)
    bias = torch.zeros(2, 1, 5)
    bias[1, :, 3:] = -10000.0
    kwargs = {"encoder_hidden_states": context, "attention_mask": bias if mask else None}
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        expected = attn(x, **kwargs)
        monkeypatch.setattr(_attention, "_sdpa_accepts_scale", lambda: False)
        if torch_has == "no-sdpa":
            monkeypatch.delattr(torch.nn.functional, "scaled_dot_product_attention")
        attn.set_processor(SafeSlicedAttnProcessor(chunk_elements))
        assert_close(attn(x, **kwargs), expected)


def test_deprecated_scale_argument_warns_like_diffusers() -> None:
    attn = Attention(32, heads=4, dim_head=8).eval()
    x = torch.randn(1, 4, 32)
    for processor in (AttnProcessor2_0(), SafeSlicedAttnProcessor()):
        with pytest.warns(FutureWarning, match="`scale` argument is deprecated"):
            processor(attn, x, scale=1.0)


# --------------------------------------------------------------------------- the mps bug, emulated


@contextmanager
def mps_baddbmm_bug(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``torch.baddbmm`` behave as on mps: with ``beta=0`` its input is not ignored.

    diffusers passes ``torch.empty(...)`` as that input; uninitialised memory can hold
    anything, NaN included, so the emulation assumes the worst: the input is NaN, and
    ``0 * NaN`` is NaN (pytorch #187521, #194442).
    """
    real_baddbmm = torch.baddbmm

    def baddbmm(input: Any, batch1: Any, batch2: Any, *, beta: float = 1, alpha: float = 1) -> Any:
        if beta == 0:
            garbage = torch.full_like(input, float("nan"))
            return garbage * 0 + alpha * torch.bmm(batch1, batch2)
        return real_baddbmm(input, batch1, batch2, beta=beta, alpha=alpha)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "baddbmm", baddbmm)
        yield


@contextmanager
def nan_filled_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every ``torch.empty`` return NaN-filled floats (uninitialised memory at its worst)."""
    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> Any:
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", empty)
        yield


def tiny_unet() -> Any:
    """Return a small SD-shaped UNet2DConditionModel: 8 heads at 16x16 latents, 77 text tokens."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet_inputs() -> dict[str, Any]:
    torch.manual_seed(1)
    return {
        "sample": torch.randn(2, 4, 16, 16),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(2, 77, 32),
    }


def test_emulated_mps_bug_breaks_diffusers_slicing_not_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unet = tiny_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        expected = unet(**inputs).sample  # default: AttnProcessor2_0
        with mps_baddbmm_bug(monkeypatch):
            unet.set_attention_slice("max")
            assert any(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())
            sliced = unet(**inputs).sample
            # 256 tokens x 256 keys per head: chunks of 4096 elements split every head in 16.
            unet.set_attn_processor(SafeSlicedAttnProcessor(4096))
            ours = unet(**inputs).sample
    assert torch.isnan(sliced).any()
    assert torch.isfinite(ours).all()
    assert_close(ours, expected)


def test_emulation_is_faithful_without_the_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same sliced processor is correct when baddbmm ignores its input, as on CPU and CUDA:
    # the NaN above comes from the emulated bug, not from the set-up.
    unet = tiny_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        expected = unet(**inputs).sample
        unet.set_attention_slice("max")
        with nan_filled_empty(monkeypatch):
            sliced = unet(**inputs).sample
    assert_close(sliced, expected)


def test_never_reads_uninitialised_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our chunked path allocates its output with torch.empty: every element must be written.
    unet = tiny_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        expected = unet(**inputs).sample
        unet.set_attn_processor(SafeSlicedAttnProcessor(4096))
        with nan_filled_empty(monkeypatch), mps_baddbmm_bug(monkeypatch):
            ours = unet(**inputs).sample
    assert_close(ours, expected)


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("chunk_elements", [None, 4096])
def test_tiny_unet_with_text_mask(chunk_elements: int | None) -> None:
    unet = tiny_unet()
    inputs = unet_inputs()
    # padding tokens masked out of cross-attention, as pipelines with attention masks do
    text_mask = torch.ones(2, 77)
    text_mask[0, 20:] = 0
    text_mask[1, 50:] = 0
    with torch.no_grad():
        expected = unet(**inputs, encoder_attention_mask=text_mask).sample
        unet.set_attn_processor(SafeSlicedAttnProcessor(chunk_elements))
        actual = unet(**inputs, encoder_attention_mask=text_mask).sample
    assert_close(actual, expected)


def test_processor_is_accepted_by_diffusers_model_api() -> None:
    unet = tiny_unet()
    processor = SafeSlicedAttnProcessor()
    unet.set_attn_processor(processor)
    assert all(p is processor for p in unet.attn_processors.values())
    # diffusers only recognises its own classes here (documented in the class docstring).
    with pytest.raises(ValueError, match="set_default_attn_processor"):
        unet.set_default_attn_processor()
    unet.set_attention_slice(None)  # what pipe.disable_attention_slicing() does
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def _sd_images(pipe: Any) -> Any:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red cube on a table",
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=generator,
        output_type="np",
    ).images


def test_tiny_sd_pipeline_matches_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    expected = _sd_images(pipe)
    pipe.enable_attention_slicing(1)
    with mps_baddbmm_bug(monkeypatch):
        sliced = _sd_images(pipe)
        # 256 tokens at its attention level: 2**14 elements split each head into 4 row blocks.
        pipe.unet.set_attn_processor(SafeSlicedAttnProcessor(2**14))
        ours = _sd_images(pipe)
    assert sliced.shape == expected.shape
    assert not torch.isfinite(torch.from_numpy(sliced)).all()
    assert_close(torch.from_numpy(ours), torch.from_numpy(expected))


SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


@pytest.mark.slow
def test_sd15_sized_unet_matches_default() -> None:
    # 32x32 latents (256 px) to keep the suite short; the 64x64 (512 px) forward is in
    # tests/benchmarks/attention_memory.py --compare 64. A bound of 2**18 splits every
    # self-attention of the 1024-token level into 4 row chunks per head.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    sample = torch.randn(2, 4, 32, 32)
    text = torch.randn(2, 77, 768)
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        unet.set_attn_processor(SafeSlicedAttnProcessor(2**18))
        actual = unet(sample, 500, encoder_hidden_states=text).sample
    assert torch.isfinite(actual).all()
    assert_close(actual, expected)
