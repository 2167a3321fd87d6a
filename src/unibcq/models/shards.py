"""The shard index of a safetensors model folder: tensor name -> the shard file holding it.

Checkpoints, source models read block by block and model sizing all read
`model.safetensors.index.json`; this one reader validates it the same way for all: a JSON
object whose `weight_map` maps every tensor to a plain file name ending in `.safetensors`
(no folder part, so an index cannot point outside its folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from unibcq.errors import UnibcqError, one_line

WEIGHTS_INDEX = "model.safetensors.index.json"


def read_weight_map(index: Path, error: type[UnibcqError] = UnibcqError) -> dict[str, str]:
    """Tensor name -> shard file name, from the index file `index`; anything malformed raises
    `error` (a checkpoint's reader passes CheckpointError)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON, not UTF-8, absurd nesting
        raise error(f"{index} is not a valid safetensors index ({one_line(exc, 200)})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index} has no weight_map naming the shard of each tensor")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            shown = repr(file) if len(repr(file)) <= 48 else repr(file)[:45] + "..."
            raise error(f"{index} lists {shown} for {name[:80]}, not a shard file name")
    return weight_map
