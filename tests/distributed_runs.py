"""Run several `tunelab` commands back to back in one torchrun launch (for tests/test_distributed.py).

Each launch pays for starting the processes and importing torch and transformers (about 30 s on a
2-core machine), so the tests share one. Every command goes through `tunelab.cli.main`, which is
what `python -m tunelab` calls. Usage: torchrun --nproc-per-node 2 ... tests/distributed_runs.py RUNS.json
(RUNS.json: a list of argument lists, e.g. [["train", "--model", ...], ...]).
"""

import json
import sys
from pathlib import Path

from tunelab.cli import main

if __name__ == "__main__":
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        code = main(argv)
        if code:
            sys.exit(code)
