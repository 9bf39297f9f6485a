"""Scores of one prediction against one reference, each a float in [0, 1] (higher is better).

Every metric is per example so the paired bootstrap in `compare` treats them all alike; a summary is
the mean over examples. Corpus BLEU (sacrebleu's usual number, 0-100) is reported beside them.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
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
# Fields beside the scores in predictions.jsonl and summary.json (and the judge's score): a user
# metric of one of these names would write over it, so it keeps its module in its name.
RESERVED_NAMES = frozenset(
    "index model question reference prediction finish_reason prompt_tokens completion_tokens errors "
    "columns spec template loss perplexity corpus_bleu seconds judge".split()
)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
# Words for ROUGE: runs of letters and digits in any script; each Han, kana character on its own
# (those scripts write no spaces between words). On ASCII text the same words as rouge-score's own
# tokenizer, which keeps only [a-z0-9] and scored every non-Latin answer 0.
_WORDS = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"
)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Punctuation that is part of a number, kept by `normalize`: a decimal point between digits ("3.14" is
# not "314"), a minus sign before a digit at the start of a word ("-5" is not "5"). A comma between
# digits goes, as in SQuAD ("1,000" is "1000").
_NUMBER_MARKS = re.compile(r"(?<=\d)\.(?=\d)|(?<![\w.,])[-\u2212](?=\d)")


def _is_punctuation(ch: str) -> bool:
    return ch in _PUNCTUATION or unicodedata.category(ch).startswith("P")  # 。、！ too


class _UnicodeWords:
    """rouge-score's tokenizer interface over `_WORDS`."""

    def tokenize(self, text: str) -> list[str]:
        return _WORDS.findall(text.lower())


def normalize(text: str, articles: bool = True) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation (of any script; not the decimal
    point or sign of a number) and articles (`articles`), collapse whitespace."""
    text = text.lower()
    keep = {m.start() for m in _NUMBER_MARKS.finditer(text)}
    text = "".join(ch for i, ch in enumerate(text) if i in keep or not _is_punctuation(ch))
    return " ".join((_ARTICLES.sub(" ", text) if articles else text).split())


def _normalized(prediction: str, reference: str) -> tuple[str, str]:
    """Both normalised; where the reference is nothing but an article ("A", "The": a choice's
    letter), the articles stay, and where it is nothing but punctuation ("?", "..."), both are
    compared as written (whitespace collapsed): normalised to nothing, an empty prediction matched it."""
    ref = normalize(reference)
    if ref or not reference.strip():
        return normalize(prediction), ref
    ref = normalize(reference, articles=False)
    if ref:
        return normalize(prediction, articles=False), ref
    return " ".join(prediction.split()), " ".join(reference.split())


def exact_match(prediction: str, reference: str) -> float:
    """Same text once the surrounding whitespace is stripped."""
    return float(prediction.strip() == reference.strip())


def exact_match_norm(prediction: str, reference: str) -> float:
    pred, ref = _normalized(prediction, reference)
    return float(pred == ref)


def contains(prediction: str, reference: str) -> float:
    """The normalised reference appears in the normalised prediction, on word boundaries."""
    pred, ref = _normalized(prediction, reference)
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


def _bleu_tokenizer(texts: list[str]) -> str:
    """sacrebleu's tokenizer: its default (13a, words between spaces) unless some text is Chinese or
    Japanese, written without spaces (13a made a whole sentence one word: BLEU 0 for a missing
    full stop); there `zh`, which splits off each Han and kana character."""
    return "zh" if any(_CJK.search(t) for t in texts) else "13a"


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU from sacrebleu (exponential smoothing, its default for single sentences) / 100."""
    _need("sacrebleu")
    import sacrebleu

    tokenize = _bleu_tokenizer([prediction, reference])
    return float(sacrebleu.sentence_bleu(prediction, [reference], tokenize=tokenize).score) / 100.0


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU on its usual 0-100 scale: n-gram counts pooled over all examples."""
    _need("sacrebleu")
    import sacrebleu

    tokenize = _bleu_tokenizer(predictions + references)
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)


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
    user: bool = False  # a --metric: a failure on one row leaves that row unscored (`score`)


def load_user_metric(path: str) -> Metric:
    """`package.module:function` or `path/to/file.py:function`; called as fn(prediction, reference)."""
    module_name, sep, func_name = path.rpartition(":")
    if not sep or not module_name or not func_name:
        raise TunelabError(
            f"metric '{path}' is not of the form module:function", "e.g. --metric mypkg.scoring:f1"
        )
    added = None  # the name under which a half-loaded module must not stay in sys.modules
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            spec = importlib.util.spec_from_file_location(file.stem, file)
            if spec is None or spec.loader is None or not file.exists():
                raise ImportError(f"no such file {file}")
            module = importlib.util.module_from_spec(spec)
            if file.stem not in sys.modules:
                sys.modules[added := file.stem] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        sys.modules.pop(added or "", None)
        raise TunelabError(
            f"cannot import '{module_name}' for metric '{path}': {e}",
            "the module must be importable from here (on PYTHONPATH) or be a .py file path",
        ) from None
    except Exception as e:  # noqa: BLE001 - a syntax error or a failing line in the user's module
        sys.modules.pop(added or "", None)
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise TunelabError(
            f"metric module '{module_name}' failed while loading{where}: {type(e).__name__}: {e}",
            f"fix '{module_name}' and run again; `python {module_name}` shows the whole traceback"
            if module_name.endswith(".py")
            else f"fix '{module_name}' and run again; `python -c 'import {module_name}'` shows the traceback",
        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise TunelabError(
            f"'{module_name}' has no function '{func_name}'",
            f"define {func_name}(prediction, reference) -> float",
        )
    return Metric(func_name, fn, user=True)


def resolve_metrics(user: list[str] | None = None) -> list[Metric]:
    """The built-in metrics, then the user's (each `module:function`)."""
    found = [Metric(name, fn) for name, fn in _BUILTIN.items()]
    for path in user or []:
        m = load_user_metric(path)
        if m.name in RESERVED_NAMES or any(m.name == f.name for f in found):  # or two modules' same one
            module = path.rpartition(":")[0]
            m = Metric(f"{Path(module).stem if module.endswith('.py') else module}.{m.name}", m.fn, user=True)
            if any(m.name == f.name for f in found):
                raise TunelabError(f"metric '{path}' is given twice", "give each --metric once")
        found.append(m)
    return found


def score(
    prediction: str, reference: str, metrics: list[Metric], failures: dict[str, list[str]] | None = None
) -> dict[str, float]:
    """Each metric's score. A user's metric that raises on this row: with `failures`, the row gets no
    score (NaN, left out of means and intervals) and the error is added to `failures[name]`, so one
    bad row does not throw away every model's generations; without, a TunelabError naming it."""
    out = {}
    for m in metrics:
        try:
            value = float(m.fn(prediction, reference))
        except TunelabError:
            raise
        except Exception as e:  # a user's metric failing on one row names the row's metric, not a traceback
            if failures is None or not m.user:
                raise TunelabError(
                    f"metric '{m.name}' failed on prediction {prediction[:60]!r}: {type(e).__name__}: {e}",
                    "metrics are called as fn(prediction: str, reference: str) -> float",
                ) from e
            failures.setdefault(m.name, []).append(f"{type(e).__name__}: {e}")
            value = math.nan
        out[m.name] = value
    return out


def check_user_metrics(metrics: list[Metric], reference: str) -> None:
    """Each user metric called once, on a test row's reference against itself, before any model
    loads: a metric that cannot run at all fails here, not after every model has generated."""
    for m in metrics:
        if not m.user:
            continue
        try:
            float(m.fn(reference, reference))
        except Exception as e:  # noqa: BLE001 - the user's code: say what failed, in one line
            raise TunelabError(
                f"metric '{m.name}' fails on the first test row's reference scored against itself: "
                f"{type(e).__name__}: {e}",
                "metrics are called as fn(prediction: str, reference: str) -> float; fix it before generating",
            ) from None
