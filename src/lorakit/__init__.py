"""lorakit: fine-tune causal LMs with the LoRA family of methods.

import lorakit as lk
model, tok = lk.load_model("smollm2-135m")
model = lk.apply(model, lk.AdapterConfig(method="lora", r=16, alpha=32))
lk.save_adapter(model, "out/adapter")      # a PEFT adapter folder
"""

from .config import AdapterConfig
from .errors import LorakitError
from .export import export
from .gguf_export import export_gguf_model
from .inject import apply, count_parameters, disabled, merge, trainable_parameters, unload, unmerge
from .models import load_model
from .peft_format import load_adapter, save_adapter, save_merged
from .version import __version__

__all__ = [
    "AdapterConfig",
    "LorakitError",
    "apply",
    "count_parameters",
    "disabled",
    "export",
    "export_gguf_model",
    "load_adapter",
    "load_model",
    "merge",
    "save_adapter",
    "save_merged",
    "trainable_parameters",
    "unload",
    "unmerge",
    "__version__",
]
