"""unibcq: binary-coding quantization of Hugging Face causal LMs.

Python API (the CLI is a thin layer over it):
    model, tok = unibcq.load_model("smollm2-135m"), unibcq.load_tokenizer("smollm2-135m")
    config = unibcq.QuantConfig("bcq-alternating", bits=3, group_size=128)
    records = unibcq.quantize(model, config)
    unibcq.save(model, "out/w3", config, source_model="smollm2-135m", tokenizer=tok)
    qmodel = unibcq.load("out/w3")
    # or, after `import unibcq`: AutoModelForCausalLM.from_pretrained("out/w3")
"""

__version__ = "0.1.0"

from unibcq.checkpoint import checkpoint_info, load_checkpoint as load, save_checkpoint as save  # noqa: E402
from unibcq.config import QuantConfig  # noqa: E402
from unibcq.errors import CheckpointError, UnibcqError  # noqa: E402
from unibcq.integrations.transformers import register as _register_with_transformers  # noqa: E402
from unibcq.methods import quantize_model as quantize  # noqa: E402
from unibcq.models import load_model, load_tokenizer  # noqa: E402
from unibcq.nn import BCQLinear, GroupedBinaryLinear, PackedLinear  # noqa: E402

_register_with_transformers()

__all__ = [
    "BCQLinear",
    "CheckpointError",
    "GroupedBinaryLinear",
    "PackedLinear",
    "QuantConfig",
    "UnibcqError",
    "checkpoint_info",
    "load",
    "load_model",
    "load_tokenizer",
    "quantize",
    "save",
]
