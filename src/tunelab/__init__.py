"""tunelab: finetune a small LLM on your ~1,000 examples, and prove it got better.

import tunelab
run = tunelab.train(model="EleutherAI/pythia-70m", data="qa.jsonl")
run.generate("What is the capital of Mexico?")
"""

import logging

# transformers imports peft, which imports bitsandbytes when installed; on a CPU bitsandbytes then
# warns that an optional inference-kernel package is missing. Nothing a tunelab user can act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from tunelab.api import Run, load, pretrain, train  # noqa: E402
from tunelab.config import RunConfig, load_config  # noqa: E402
from tunelab.errors import ConfigError, DataError, ModelLoadError, TunelabError  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "Run",
    "RunConfig",
    "TunelabError",
    "load",
    "load_config",
    "pretrain",
    "train",
]
