"""The tiny Flux and Wan pipelines of the transformer and video tests.

Thin names for :func:`mps_helpers.testing.tiny_pipeline` ("flux", "wan"): one set of
builders serves the public helpers and these tests.
"""

from __future__ import annotations

from typing import Any

from mps_helpers import testing

__all__ = ["tiny_flux", "tiny_wan"]


def tiny_flux(seed: int = 0) -> Any:
    """Return the offline tiny FluxPipeline of :func:`mps_helpers.testing.tiny_pipeline`."""
    return testing.tiny_pipeline("flux", seed=seed)


def tiny_wan(seed: int = 0) -> Any:
    """Return the offline tiny WanPipeline of :func:`mps_helpers.testing.tiny_pipeline`."""
    return testing.tiny_pipeline("wan", seed=seed)
