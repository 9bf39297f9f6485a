"""tunelab: finetune a small LLM on your ~1,000 examples, and prove it got better.

import tunelab
run = tunelab.train(model="EleutherAI/pythia-70m", data="qa.jsonl")
run.generate("What is the capital of Mexico?")
"""

from tunelab.api import Run, load, pretrain, train
from tunelab.config import RunConfig, load_config
from tunelab.errors import ConfigError, DataError, ModelLoadError, TunelabError

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
