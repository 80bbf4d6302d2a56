"""Applying the video decisions to a 3-D VAE: tiling by pixels and by frames.

diffusers' video VAEs tile by pixels with ``enable_tiling()``; those that can also decode a
clip a few frames at a time say so with a ``use_framewise_decoding`` attribute (LTX-Video,
HunyuanVideo). Wan's VAE decodes one latent frame at a time by construction, so it has no
such switch.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["FRAMEWISE_ATTR", "set_framewise_decoding"]

logger = logging.getLogger(__name__)

#: The VAE attribute that turns frame-wise (temporal) tiling on.
FRAMEWISE_ATTR = "use_framewise_decoding"


def set_framewise_decoding(vae: Any, wanted: bool) -> bool:
    """Turn frame-wise decoding on or off where ``vae`` has the switch; return whether it has."""
    if vae is None or not hasattr(vae, FRAMEWISE_ATTR):
        return False
    if bool(getattr(vae, FRAMEWISE_ATTR)) != wanted:
        setattr(vae, FRAMEWISE_ATTR, wanted)
        logger.info("%s: frame-wise decoding %s", type(vae).__name__, "on" if wanted else "off")
    return True
