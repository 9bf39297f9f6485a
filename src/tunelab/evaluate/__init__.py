"""Did finetuning make the model better, and how does it fail?

`compare` runs several models (or a few-shot prompted one) over the same test rows: held-out loss,
exact match / contains / ROUGE-L / BLEU / your own metric, error analysis, deltas with paired-bootstrap
intervals, optional LLM-as-judge. `write_report` turns the result into report.md + report.html;
`run_benchmarks` runs lm-evaluation-harness tasks. See docs/evaluation.md.
"""

from tunelab.evaluate.compare import CompareResult, Delta, bootstrap_mean, compare, paired_bootstrap
from tunelab.evaluate.errors import CATEGORIES, ErrorRules, analyse
from tunelab.evaluate.harness import run_benchmarks
from tunelab.evaluate.judge import JudgeConfig
from tunelab.evaluate.metrics import normalize, score
from tunelab.evaluate.predict import EvalSettings, Example, ModelResult, read_examples
from tunelab.evaluate.report import write_report

__all__ = [
    "CATEGORIES",
    "CompareResult",
    "Delta",
    "ErrorRules",
    "EvalSettings",
    "Example",
    "JudgeConfig",
    "ModelResult",
    "analyse",
    "bootstrap_mean",
    "compare",
    "normalize",
    "paired_bootstrap",
    "read_examples",
    "run_benchmarks",
    "score",
    "write_report",
]
