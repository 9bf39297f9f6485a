"""Metrics against hand-computed values, every error category planted and detected, and the paired
bootstrap checked by hand. No model is loaded here."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.errors import TunelabError
from tunelab.evaluate import errors as E
from tunelab.evaluate import metrics as M
from tunelab.evaluate.compare import bootstrap_mean, paired_bootstrap
from tunelab.evaluate.metrics import (
    bleu,
    contains,
    corpus_bleu,
    exact_match,
    exact_match_norm,
    load_user_metric,
    normalize,
    resolve_metrics,
    rouge_l,
    score,
)


def test_normalize_is_squad_normalisation():
    assert normalize("  The Capital, of  France! ") == "capital of france"
    assert normalize("An apple a day") == "apple day"
    assert normalize("there's theory") == "theres theory"  # articles only as whole words


def test_exact_match_raw_and_normalised():
    assert exact_match(" Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match_norm("paris", "Paris.") == 1.0
    assert exact_match_norm("The capital is Paris", "capital is Paris!") == 1.0
    assert exact_match_norm("Lyon", "Paris") == 0.0


def test_normalised_matches_keep_numbers_and_choice_letters_apart():
    """SQuAD's normalisation dropped the decimal point, the minus sign and a lone article: "3.14"
    matched "31.4", "-5" matched "5", and an empty answer matched the choice "A"."""
    assert exact_match_norm("3.14", "31.4") == 0.0 and exact_match_norm("It is 3.14.", "it is 3.14") == 1.0
    assert exact_match_norm("-5", "5") == 0.0 and exact_match_norm("\u22125", "-5") == 0.0
    assert exact_match_norm("1,000", "1000") == 1.0  # a thousands separator goes, as in SQuAD
    assert exact_match_norm("", "A") == 0.0 and exact_match_norm("The", "A") == 0.0
    assert exact_match_norm("a", "A") == 1.0 and exact_match_norm("(A)", "A") == 1.0
    assert contains("A", "A") == 1.0 and contains("The answer is B.", "A") == 0.0
    assert contains("The answer is A.", "A") == 1.0
    assert exact_match_norm("The capital", "capital") == 1.0  # articles still go beside other words


@pytest.mark.parametrize("reference", ["?", "...", " - ", "？！"])
def test_a_punctuation_only_reference_is_not_matched_by_an_empty_answer(reference):
    """Normalisation strips punctuation: a reference "?" or "..." became "", which an empty
    prediction matched. Such a reference is compared as written (whitespace collapsed)."""
    assert exact_match_norm("", reference) == 0.0 and contains("", reference) == 0.0
    assert exact_match_norm("Paris", reference) == 0.0
    assert exact_match_norm(f" {reference.strip()} ", reference) == 1.0
    assert exact_match_norm("!" if "!" not in reference else "?", reference) == 0.0
    assert contains(f"it is {reference.strip()} here", reference) == 1.0


def test_bleu_splits_chinese_and_japanese_into_characters():
    """sacrebleu's default tokenizer splits on spaces: a Chinese sentence was one word, and a missing
    full stop scored 0."""
    assert bleu("北京是中国的首都", "北京是中国的首都。") > 0.8
    assert bleu("東京は日本の首都です", "東京は日本の首都です") == pytest.approx(1.0)
    assert corpus_bleu(["北京是中国的首都"], ["北京是中国的首都。"]) > 80
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)  # 13a as before


def test_contains_on_word_boundaries():
    assert contains("I think the answer is Paris, of course.", "Paris") == 1.0
    assert contains("Parisian food", "Paris") == 0.0
    assert contains("anything", "") == 0.0  # an empty reference is contained nowhere, not everywhere


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 words; P = R = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS("a b c", "a c") = 2: P = 2/3, R = 1, F = 2PR/(P+R) = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(0.8)
    assert rouge_l("xyz", "a c") == 0.0


def test_bleu_hand_computed():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("completely different words here", "the cat sat on the mat") == pytest.approx(0.0, abs=1e-6)
    # Every n-gram precision is 1; only the brevity penalty exp(1 - 7/6) applies.
    expected = 100 * math.exp(1 - 7 / 6)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat today"]) == pytest.approx(
        expected, abs=0.01
    )


def test_user_metric_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "myscores.py").write_text(
        "def first_word(p, r):\n    return float(p.split()[:1] == r.split()[:1])\n"
    )
    by_file = load_user_metric(f"{tmp_path / 'myscores.py'}:first_word")
    assert by_file.name == "first_word"
    assert by_file.fn("Paris is big", "Paris.") == 0.0  # 'Paris' != 'Paris.'
    assert by_file.fn("Paris is big", "Paris") == 1.0
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = resolve_metrics(["myscores:first_word"])
    assert [m.name for m in metrics] == [
        "exact_match",
        "exact_match_norm",
        "contains",
        "rouge_l",
        "bleu",
        "first_word",
    ]
    scores = score("Lima is the capital", "Lima", metrics)
    assert scores["first_word"] == 1.0 and scores["contains"] == 1.0 and scores["exact_match"] == 0.0


def test_user_metric_errors_are_for_people(tmp_path, monkeypatch):
    with pytest.raises(TunelabError, match="module:function"):
        load_user_metric("no_colon_here")
    with pytest.raises(TunelabError, match="cannot import"):
        load_user_metric("surely_not_a_module_xyz:f")
    (tmp_path / "m2.py").write_text("def boom(p, r):\n    raise ZeroDivisionError('x')\n")
    with pytest.raises(TunelabError, match="has no function 'nope'"):
        load_user_metric(f"{tmp_path / 'm2.py'}:nope")
    boom = load_user_metric(f"{tmp_path / 'm2.py'}:boom")
    with pytest.raises(TunelabError, match="metric 'boom' failed"):
        score("a", "b", [boom])
    # A module that fails while loading: one line with the error, no traceback, nothing half-loaded.
    (tmp_path / "badsyntax.py").write_text("def f(p, r):\n    return 1 +\n")
    with pytest.raises(TunelabError, match=r"failed while loading \(line 2\): SyntaxError") as e:
        load_user_metric(f"{tmp_path / 'badsyntax.py'}:f")
    assert "python " in e.value.hint and "badsyntax" not in sys.modules
    (tmp_path / "badexec.py").write_text("x = 1 / 0\ndef f(p, r):\n    return 1.0\n")
    with pytest.raises(TunelabError, match="failed while loading: ZeroDivisionError"):
        load_user_metric(f"{tmp_path / 'badexec.py'}:f")
    assert "badexec" not in sys.modules


def test_a_user_metric_named_like_another_keeps_its_module_in_its_name(tmp_path):
    (tmp_path / "mine.py").write_text("def exact_match(p, r):\n    return 0.5\n")
    metrics = resolve_metrics([f"{tmp_path / 'mine.py'}:exact_match"])
    assert [m.name for m in metrics][-2:] == ["bleu", "mine.exact_match"]
    assert score("a", "a", metrics) == {**score("a", "a", metrics[:-1]), "mine.exact_match": 0.5}
    with pytest.raises(TunelabError, match="given twice"):
        resolve_metrics([f"{tmp_path / 'mine.py'}:exact_match"] * 2)


def test_a_user_metric_named_like_an_output_field_keeps_its_module_in_its_name(tmp_path):
    """A --metric named `prediction` (or `loss`, `errors`, `model`...) wrote its score over that field:
    predictions.jsonl lost every prediction's text, summary.json the held-out loss."""
    (tmp_path / "mine.py").write_text(
        "def prediction(p, r):\n    return 0.5\n\ndef loss(p, r):\n    return 1.0\n"
    )
    metrics = resolve_metrics([f"{tmp_path / 'mine.py'}:prediction", f"{tmp_path / 'mine.py'}:loss"])
    assert [m.name for m in metrics][-2:] == ["mine.prediction", "mine.loss"]


# ------------------------------------------------------------------ error analysis

REF = "The capital of France is Paris."
Q = "What is the capital of France?"


@pytest.mark.parametrize(
    ("prediction", "finish", "expected"),
    [
        ("The capital of France is Paris.", "stop", []),
        ("   ", "stop", ["empty"]),
        ("The capital of France is Paris. It is", "length", ["did_not_stop", "wrong_format"]),
        ("Paris Paris Paris Paris.", "stop", ["repetitive"]),
        ("The capital of France is Paris. The capital of France is Paris.", "stop", ["repetitive"]),
        (
            "The capital of France is Paris, a city on the Seine with many museums, bridges, cafes, parks, "
            "old churches and a famous iron tower built for a fair.",
            "stop",
            ["too_long"],
        ),
        ("What is the capital of France? Paris.", "stop", ["copies_prompt"]),
        ("The capital of France is Paris", "stop", ["wrong_format"]),
    ],
)
def test_every_error_category_is_detected(prediction, finish, expected):
    assert E.analyse(prediction, REF, Q, finish) == expected


def test_an_answer_restating_the_question_as_the_reference_does_is_no_copy():
    """The world data's answers restate the question: correct answers were flagged copies_prompt."""
    q, ref = "Main language of Belgium?", "The main language of Belgium is Dutch."
    assert E.analyse(ref, ref, q, "stop") == []
    assert E.copies_prompt("Main language of Belgium? Dutch.", "Main language of Belgium?", "Dutch")


def test_format_regex_and_json_references():
    rules = E.ErrorRules(format_regex=r"[A-Z][a-z]+")
    assert E.analyse("Paris", "Paris", "q", "stop", rules) == []
    assert E.analyse("paris is it", "Paris", "q", "stop", rules) == ["wrong_format"]
    assert E.wrong_format('{"city": "Paris"}', '{"city": "Lima"}') is False
    assert E.wrong_format("city: Paris", '{"city": "Lima"}') is True
    assert E.wrong_format("Paris", "Paris") is False  # a bare reference asks for no shape


def test_repetition_rules():
    assert E.is_repetitive("very very very good")
    assert not E.is_repetitive("The capital of France is Paris.")
    assert E.is_repetitive("哈哈哈哈哈哈哈哈哈哈哈哈")  # no spaces: characters
    assert not E.is_repetitive("1000000")
    assert not E.is_repetitive("Mississippi")


def test_summary_counts_and_examples():
    preds = ["", "Paris Paris Paris", "The capital of France is Paris.", "", "x"]
    cats = [E.analyse(p, REF, Q, "stop") for p in preds]
    s = E.summarise(cats, [Q] * 5, preds, [REF] * 5, max_examples=1)
    assert s.counts["empty"] == 2 and s.counts["repetitive"] == 1
    assert s.flagged == 4 and s.clean == 1
    assert [e.index for e in s.examples["empty"]] == [0]  # capped at max_examples
    assert s.to_dict()["counts"]["wrong_format"] == 2  # "x" and the loop do not end like a sentence


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_hand_checked():
    # Constant differences: every resample has the same mean.
    assert paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1]) == (1.0, 1.0, 1.0)
    # Differences [0, 1]: resample means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 95%
    # interval runs from 0 to 1 around the observed 0.5.
    assert paired_bootstrap([0, 0], [0, 1], resamples=2000) == (0.5, 0.0, 1.0)
    # NaN (no score) on either side drops the example from the pairing.
    assert paired_bootstrap([0, math.nan, 0], [1, 1, 1])[0] == 1.0


def test_bootstrap_is_seeded():
    a = [0.1, 0.9, 0.0, 0.7, 0.8, 0.2, 0.0, 0.6, 0.3, 0.0, 1.0, 0.4]
    b = [0.9, 1.0, 0.1, 0.7, 0.9, 0.8, 0.0, 0.9, 0.8, 0.2, 1.0, 0.9]
    first = paired_bootstrap(a, b, resamples=1000, seed=3)
    assert first == paired_bootstrap(a, b, resamples=1000, seed=3)
    assert first[0] == pytest.approx((sum(b) - sum(a)) / 12)
    assert first[1] < first[0] < first[2]
    assert paired_bootstrap(a, b, resamples=1000, seed=4)[1:] != first[1:]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=40))
def test_bootstrap_interval_contains_the_observed_delta(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    delta, low, high = paired_bootstrap(a, b, resamples=300, seed=0)
    assert delta == pytest.approx(sum(b) / len(b) - sum(a) / len(a))
    assert low - 1e-12 <= delta <= high + 1e-12


def test_bootstrap_mean_of_nothing_is_nan():
    assert all(math.isnan(v) for v in bootstrap_mean([math.nan, math.nan]))


@pytest.mark.parametrize("text", ["東京です", "القاهرة هي العاصمة", "Москва столица", "Ελλάδα", "Zürich"])
def test_metrics_score_an_identical_answer_in_any_script_fully(text):
    """rouge-score's own tokenizer keeps only a-z and 0-9: every non-Latin answer scored 0."""
    assert M.rouge_l(text, text) == 1.0 and M.exact_match_norm(text + "。", text) == 1.0
    assert M.contains(f"«{text}»!", text) == 1.0


def test_rouge_l_over_words_of_any_script_keeps_rouge_scores_english_figures():
    from rouge_score import rouge_scorer

    plain = rouge_scorer.RougeScorer(["rougeL"])
    for pred, ref in [
        ("The capital of Peru is Lima.", "Lima is the capital"),
        ("a_b c-d 3.5x", "a b c d 3 5x"),
    ]:
        assert M.rouge_l(pred, ref) == plain.score(ref, pred)["rougeL"].fmeasure
    assert M.rouge_l("Москва столица", "Москва") == pytest.approx(2 / 3)
    assert M.rouge_l("東京都です", "東京です") == pytest.approx(2 * 4 / 9)  # one character per word


def test_too_long_counts_chinese_and_japanese_characters_as_words():
    """Text without spaces was one word, so a 200-character Chinese ramble against an 11-character
    reference was never too_long; Han and kana now count a character as a word, as in ROUGE-L."""
    ref = "奥地利的首都是维也纳。"
    assert E.is_too_long("奥地利的首都是维也纳，" * 20, ref, E.ErrorRules())
    assert not E.is_too_long("奥地利的首都是维也纳，一座古老的城市。", ref, E.ErrorRules())
    assert E.is_too_long("東京は日本の首都です。" * 10, "東京です。", E.ErrorRules())
    # Latin text is counted between spaces as before.
    assert not E.is_too_long(
        "one two three four five six seven eight nine ten eleven twelve", "Paris.", E.ErrorRules()
    )
    assert E.is_too_long(
        "one two three four five six seven eight nine ten eleven twelve thirteen", "Paris.", E.ErrorRules()
    )


@pytest.mark.parametrize(
    ("question", "copy", "answer", "restating"),
    [
        ("日本的首都是哪里？", "日本的首都是哪里？我不知道。", "东京。", "日本的首都是哪里？是东京。"),
        ("日本の首都はどこですか？", "日本の首都はどこですか？ 日本の首都は", "東京です。", "日本の首都はどこですか？東京です。"),
    ],
)  # fmt: skip
def test_copies_prompt_reads_chinese_and_japanese_questions(question, copy, answer, restating):
    """A question without spaces was one word, under the rule's 3: an answer repeating a Chinese or
    Japanese question was never copies_prompt. Han and kana now count a character as a word."""
    assert E.copies_prompt(copy, question, answer)
    assert not E.copies_prompt(answer, question, answer)
    assert not E.copies_prompt("首都", question, answer)  # part of the question is no copy
    assert not E.copies_prompt(restating, question, restating)  # the reference restates it too
    assert "copies_prompt" in E.analyse(copy, answer, question, "stop")
