"""Saved pipeline directories whose weight files hold headers and no tensors.

``save_headers(pipe, path)`` writes what ``save_pretrained`` would (``model_index.json``,
each component's config, tokenizers and scheduler), except that each model's safetensors
file holds only its JSON header (every tensor's name, dtype, shape and offsets) followed by
a few garbage bytes where gigabytes of tensor data would be. Anything that reads a weight
from such a directory fails; anything that reads only headers works. The pipeline may live
on the meta device, so a directory of SDXL's or Flux's real shapes costs a few kilobytes.
"""

from __future__ import annotations

import json
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int64": "I64"}
GARBAGE = b"not tensor data"


def write_header_file(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Write a safetensors header for ``tensors`` (name -> (dtype name, shape)) and no data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8}
    for name, (dtype, shape) in sorted(tensors.items()):
        code = _CODES[dtype]
        count = 1
        for n in shape:
            count *= n
        end = offset + count * sizes[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    path.write_bytes(struct.pack("<Q", len(data)) + data + GARBAGE)


def save_headers(pipe: Any, path: Path) -> Path:
    """Save ``pipe`` to ``path`` with header-only weight files; return ``path``."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": type(pipe).__name__, "_diffusers_version": "0.42.1"}
    for name, component in pipe.components.items():
        if component is None:
            index[name] = [None, None]
            continue
        library = type(component).__module__.split(".")[0]
        index[name] = [library, type(component).__name__]
        folder = path / name
        folder.mkdir(exist_ok=True)
        if isinstance(component, torch.nn.Module):
            config = component.config
            if hasattr(config, "to_json_string"):  # transformers
                (folder / "config.json").write_text(config.to_json_string(), encoding="utf-8")
                weights = "model.safetensors"
            else:
                component.save_config(folder)
                weights = "diffusion_pytorch_model.safetensors"
            # tied weights are saved once, as save_pretrained does
            tensors, seen = {}, set()
            for key, value in component.state_dict().items():
                storage = value.untyped_storage()._cdata
                if storage in seen:
                    continue
                seen.add(storage)
                tensors[key] = (str(value.dtype).removeprefix("torch."), tuple(value.shape))
            write_header_file(folder / weights, tensors)
        elif hasattr(component, "save_pretrained"):
            component.save_pretrained(folder)
        elif hasattr(component, "save_config"):
            component.save_config(folder)
    (path / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return path
