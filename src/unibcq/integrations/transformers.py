"""transformers integration: `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` after `import unibcq`.

A unibcq checkpoint's config.json carries `quantization_config` with `quant_method:
"unibcq"` and the per-layer layout. Registering a config class and an `HfQuantizer` for that
method (transformers' out-of-tree registration API) lets transformers build the model, swap
the listed linear layers for unibcq's packed modules before the weights are read, and load
the packed tensors as ordinary buffers, then check them as `unibcq.load()` does. The result
is the same model `unibcq.load()` builds, so anything that takes a transformers model
(pipelines, lm-evaluation-harness's `HFLM(pretrained=model)`) works with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "unibcq"


class UnibcqHfConfig(QuantizationConfigMixin):
    """The checkpoint's `quantization_config`, kept whole so saving writes it back unchanged.

    Except its `manifest` entry: transformers' `save_pretrained` writes no manifest, so a
    re-saved checkpoint must not claim one (unibcq's own `save` writes a fresh one).
    """

    def __init__(self, layers: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        for key, value in kwargs.items():
            # A stored key never replaces the class's own attributes (to_dict, __class__, ...).
            if key not in ("quant_method", "manifest") and not key.startswith("_") and not hasattr(type(self), key):
                setattr(self, key, value)


class UnibcqHfQuantizer(HfQuantizer):
    """Loads pre-quantized unibcq checkpoints; quantizing happens with unibcq itself."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        from unibcq.checkpoint import install_packed_layers

        files = kwargs.get("checkpoint_files") or []
        self.checkpoint_folder = Path(files[0]).parent if files else None  # the folder loaded, subfolder included
        dtype = kwargs.get("dtype") or getattr(model.config, "dtype", None)
        install_packed_layers(model, self.quantization_config.layers,
                              dtype if isinstance(dtype, torch.dtype) else torch.float32)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        """The checks `unibcq.load` makes once the tensors are in: a local checkpoint's files
        against its manifest (when its config declares one; a `save_pretrained` copy has none;
        a Hub snapshot holds only the files transformers fetched, so it is not checked), then the
        loaded values (NaN/inf scales, group indices past the scales)."""
        from unibcq.checkpoint import QUANT_KEY, check_stored_values, read_config, verify_manifest

        folder = getattr(self, "checkpoint_folder", None)
        given = str(getattr(model.config, "_name_or_path", "") or "")
        if folder is not None and given and Path(given).expanduser().is_dir() and (folder / "config.json").is_file():
            verify_manifest(folder, read_config(folder)[QUANT_KEY])
        check_stored_values(folder or Path(given), model, model.state_dict())
        model.eval()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register with transformers once (importing unibcq calls this)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(UnibcqHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(UnibcqHfQuantizer)
