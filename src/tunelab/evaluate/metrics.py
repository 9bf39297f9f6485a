"""Scores of one prediction against one reference, each a float in [0, 1] (higher is better).

Every metric is per example so the paired bootstrap in `compare` treats them all alike; a summary is
the mean over examples. Corpus BLEU (sacrebleu's usual number, 0-100) is reported beside them.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import string
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

BUILTIN_METRICS = ("exact_match", "exact_match_norm", "contains", "rouge_l", "bleu")
INSTALL_HINT = "pip install 'tunelab[eval]'"

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
# Words for ROUGE: runs of letters and digits in any script; each Han, kana character on its own
# (those scripts write no spaces between words). On ASCII text the same words as rouge-score's own
# tokenizer, which keeps only [a-z0-9] and scored every non-Latin answer 0.
_WORDS = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"
)


def _is_punctuation(ch: str) -> bool:
    return ch in _PUNCTUATION or unicodedata.category(ch).startswith("P")  # 。、！ too


class _UnicodeWords:
    """rouge-score's tokenizer interface over `_WORDS`."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation (of any script) and articles,
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """Same text once the surrounding whitespace is stripped."""
    return float(prediction.strip() == reference.strip())


def exact_match_norm(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """The normalised reference appears in the normalised prediction, on word boundaries."""
    ref, pred = normalize(reference), normalize(prediction)
    return float(bool(ref) and f" {ref} " in f" {pred} ")


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TunelabError(f"this metric needs the '{module}' package, which is not installed", INSTALL_HINT)


_rouge_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words), as Google's `rouge-score` computes it, over
    words of any script (its own tokenizer keeps only a-z and 0-9)."""
    global _rouge_scorer
    if _rouge_scorer is None:
        _need("rouge_score")
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
    return float(_rouge_scorer.score(reference, prediction)["rougeL"].fmeasure)


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU from sacrebleu (exponential smoothing, its default for single sentences) / 100."""
    _need("sacrebleu")
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score) / 100.0


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU on its usual 0-100 scale: n-gram counts pooled over all examples."""
    _need("sacrebleu")
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


_BUILTIN: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "exact_match_norm": exact_match_norm,
    "contains": contains,
    "rouge_l": rouge_l,
    "bleu": bleu,
}


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[str, str], float]


def load_user_metric(path: str) -> Metric:
    """`package.module:function` or `path/to/file.py:function`; called as fn(prediction, reference)."""
    module_name, sep, func_name = path.rpartition(":")
    if not sep or not module_name or not func_name:
        raise TunelabError(
            f"metric '{path}' is not of the form module:function", "e.g. --metric mypkg.scoring:f1"
        )
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            spec = importlib.util.spec_from_file_location(file.stem, file)
            if spec is None or spec.loader is None or not file.exists():
                raise ImportError(f"no such file {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(file.stem, module)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise TunelabError(
            f"cannot import '{module_name}' for metric '{path}': {e}",
            "the module must be importable from here (on PYTHONPATH) or be a .py file path",
        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise TunelabError(
            f"'{module_name}' has no function '{func_name}'",
            f"define {func_name}(prediction, reference) -> float",
        )
    return Metric(func_name, fn)


def resolve_metrics(user: list[str] | None = None) -> list[Metric]:
    """The built-in metrics, then the user's (each `module:function`)."""
    found = [Metric(name, fn) for name, fn in _BUILTIN.items()]
    for path in user or []:
        m = load_user_metric(path)
        if any(m.name == f.name for f in found):
            m = Metric(f"{m.name}_{len(found)}", m.fn)
        found.append(m)
    return found


def score(prediction: str, reference: str, metrics: list[Metric]) -> dict[str, float]:
    out = {}
    for m in metrics:
        try:
            value = float(m.fn(prediction, reference))
        except TunelabError:
            raise
        except Exception as e:  # a user's metric failing on one row names the row's metric, not a traceback
            raise TunelabError(
                f"metric '{m.name}' failed on prediction {prediction[:60]!r}: {type(e).__name__}: {e}",
                "metrics are called as fn(prediction: str, reference: str) -> float",
            ) from e
        out[m.name] = value
    return out
