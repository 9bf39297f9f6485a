"""`Generator.generate_detailed`, `compare` on two tiny models (deltas and bootstrap intervals checked by
hand), few-shot contenders, the report, and `tunelab eval` end to end on a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tunelab.data import templates
from tunelab.errors import DataError, TunelabError
from tunelab.evaluate.compare import _deltas, compare, paired_bootstrap
from tunelab.evaluate.predict import EvalSettings, examples_from_rows, parse_contender
from tunelab.generate import Generation, Generator

QA = templates.resolve("qa", "qa")
COUNTRIES = [("France", "Paris"), ("Peru", "Lima"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo")]  # fmt: skip
ROWS = [
    {"question": f"What is the capital of {c}?", "answer": f"The capital of {c} is {k}.", "relation": "capital" if i < 3 else "other"}
    for i, (c, k) in enumerate(COUNTRIES)
]  # fmt: skip
RIGHT = [r["answer"] for r in ROWS]
# Model A: right on 0 and 1, then one planted failure each.
A_ANSWERS = RIGHT[:2] + ["", "Lima Lima Lima Lima", "The capital of Chile is Lima.", "What is the capital of Egypt? I do not know."]  # fmt: skip
# Model B: right on 0-4; example 5 runs out of tokens mid-sentence.
B_ANSWERS = RIGHT[:5] + ["The capital of Egypt is"]


def force_tokens(model, ids: list[int], eos: int):
    """Make a real model emit `ids` then EOS, whatever the prompt (hook on the output head)."""
    calls = {"n": 0}

    def hook(module, inputs, out):
        step = calls["n"]
        calls["n"] += 1
        target = ids[step] if step < len(ids) else eos
        out = out.clone()
        out[..., -1, :] = -1e9
        out[..., -1, target] = 0.0
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


def test_generate_detailed_reports_why_generation_ended(llama_dir):
    gen = Generator.load(str(llama_dir), device="cpu")
    tok = gen.tokenizer
    text = "The capital of France is Paris."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    handle = force_tokens(gen.model, ids, tok.eos_token_id)
    try:
        done = gen.generate_detailed(["What is the capital of France?"], max_new_tokens=40)
        assert done == [Generation(text, "stop", done[0].prompt_tokens, len(ids))]
        assert done[0].prompt_tokens == len(tok("What is the capital of France?")["input_ids"])
    finally:
        handle.remove()
    handle = force_tokens(gen.model, ids, tok.eos_token_id)
    try:
        cut = gen.generate_detailed(["q"], max_new_tokens=3)[0]
        assert (cut.finish_reason, cut.completion_tokens) == ("length", 3)
        assert cut.text == tok.decode(ids[:3])
    finally:
        handle.remove()
    handle = force_tokens(gen.model, ids, tok.eos_token_id)
    try:
        stopped = gen.generate_detailed(["q"], max_new_tokens=40, stop_strings=[" is"])[0]
        assert (stopped.text, stopped.finish_reason) == ("The capital of France", "stop")
    finally:
        handle.remove()
    handle = force_tokens(gen.model, ids, tok.eos_token_id)
    try:
        assert gen.generate(["q"], max_new_tokens=40) == [text]  # the plain API still returns strings
    finally:
        handle.remove()


@dataclass
class Scripted(Generator):
    """A real model and tokenizer (so held-out loss is real) whose answers are scripted by question."""

    answers: dict[str, str] = field(default_factory=dict)

    def generate_detailed(self, prompts, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None, batch_size=32, raw=False, stop_strings=None):  # fmt: skip
        out = []
        for p in prompts:
            text = next(a for q, a in self.answers.items() if q in p)
            reason = "length" if text.endswith(" is") else "stop"  # B's unfinished sentence
            out.append(Generation(text, reason, len(p), len(text.split())))
        return out


def scripted(model_dir: Path, answers: list[str], template) -> Scripted:
    g = Generator.load(str(model_dir), device="cpu")
    return Scripted(g.model, g.tokenizer, template, {r["question"]: a for r, a in zip(ROWS, answers)})


@pytest.fixture(scope="module")
def result(tiny_models):
    a = scripted(tiny_models["llama"], A_ANSWERS, None)  # a base model: no template of its own
    b = scripted(tiny_models["qwen2"], B_ANSWERS, QA)
    return compare([a, b], ROWS, EvalSettings(device="cpu"), group_by="relation", labels=["base", "tuned"])


def test_compare_metrics_and_deltas_by_hand(result):
    assert result.labels == ["base", "tuned"]
    assert [m.template for m in result.models] == ["qa", "qa"]  # the base is asked in the run's template
    assert result.mean("base", "exact_match_norm") == pytest.approx(2 / 6)
    assert result.mean("tuned", "exact_match_norm") == pytest.approx(5 / 6)
    d = next(d for d in result.deltas if d.metric == "exact_match_norm")
    assert (d.model, d.baseline, d.delta) == ("tuned", "base", pytest.approx(0.5))
    assert (d.wins, d.ties, d.losses) == (3, 3, 0)
    # Per-example differences are [0, 0, 1, 1, 1, 0]: a resample's mean is Binomial(6, 1/2) / 6, whose
    # 2.5% and 97.5% quantiles are 1/6 and 5/6 (P(k=0) = P(k=6) = 1/64 < 2.5% < P(k<=1) = 7/64).
    assert (d.low, d.high) == (pytest.approx(1 / 6), pytest.approx(5 / 6))
    again = paired_bootstrap(result.model("base").scores("exact_match_norm"), result.model("tuned").scores("exact_match_norm"), 1000, 0)  # fmt: skip
    assert again == (d.delta, d.low, d.high)  # seeded: the same interval every time
    assert all(x.low <= x.delta <= x.high for x in result.deltas)
    assert result.corpus_bleu["tuned"] > result.corpus_bleu["base"]


def test_compare_loss_is_the_training_loops_eval_loss(result, tiny_models):
    from tunelab.data.dataset import encode_records
    from tunelab.generate import Generator
    from tunelab.training.loop import evaluate

    examples = examples_from_rows(ROWS)
    for label, kind in (("base", "llama"), ("tuned", "qwen2")):
        g = Generator.load(str(tiny_models[kind]), device="cpu")
        encoded = encode_records([e.record for e in examples], QA, g.tokenizer, 512)
        expected = evaluate(g.model, encoded, 8192, torch.device("cpu"))
        m = result.model(label)
        assert m.loss == pytest.approx(expected, rel=1e-5)
        assert m.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.model("base").loss != result.model("tuned").loss


def test_compare_errors_groups_and_disagreements(result):
    base, tuned = result.errors["base"], result.errors["tuned"]
    assert {k: v for k, v in base.counts.items() if v} == {
        "empty": 1,
        "repetitive": 1,
        "copies_prompt": 1,
        "wrong_format": 1,
    }
    assert {k: v for k, v in tuned.counts.items() if v} == {"did_not_stop": 1, "wrong_format": 1}
    assert base.examples["empty"][0].index == 2
    assert result.groups["capital"]["base"]["exact_match_norm"] == pytest.approx(2 / 3)
    assert result.groups["other"]["tuned"]["exact_match_norm"] == pytest.approx(2 / 3)
    assert result.groups["other"]["base"]["n"] == 3
    assert sorted(result.disagreements[:3]) == [2, 3, 4] and result.disagreements[3:] == [5]


def test_compare_writes_jsonl_summary_and_report(result, tmp_path):
    from tunelab.evaluate.report import write_report

    preds, summary = result.write(tmp_path / "eval")
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 12 and lines[0]["model"] == "base" and lines[1]["model"] == "tuned"
    assert lines[6]["prediction"] == "Lima Lima Lima Lima" and lines[6]["errors"] == [
        "repetitive",
        "wrong_format",
    ]
    assert lines[0]["columns"] == {"relation": "capital"}
    s = json.loads(summary.read_text())
    assert s["models"]["tuned"]["exact_match_norm"] == pytest.approx(5 / 6)
    assert s["models"]["base"]["errors"]["counts"]["empty"] == 1
    md, page = write_report(result, tmp_path)
    text = md.read_text()
    assert "| exact_match_norm | 0.333 | 0.833 (+0.500 [+0.167, +0.833]) |" in text
    assert "**With 6 examples the intervals are rough**" in text  # 6 test rows: said, not left to the reader
    assert "![eval-metrics](plots/eval-metrics.png)" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "<img" in html and 'src="plots' not in html
    assert (tmp_path / "plots" / "eval-errors.png").stat().st_size > 1000


def test_fewshot_contender_prompts_with_training_examples(llama_dir):
    train = [{"question": f"Which continent is {c} in?", "answer": f"{c} is on Earth."} for c, _ in COUNTRIES]
    assert parse_contender(f"fewshot:2:{llama_dir}").shots == 2
    with pytest.raises(TunelabError, match="needs training examples"):
        compare([f"fewshot:2:{llama_dir}"], ROWS[:2])
    with pytest.raises(TunelabError, match="no row has a 'country' column"):  # before any model loads
        compare(["no/such/model"], ROWS, group_by="country")
    res = compare(
        [f"fewshot:2:{llama_dir}"], ROWS[:2], EvalSettings(max_new_tokens=4, device="cpu", with_loss=False), train_rows=train + ROWS[:1]
    )  # fmt: skip
    m = res.models[0]
    assert m.label == "2-shot llama" and m.template == "qa" and m.loss is None
    prompt = m.predictions[1].prompt
    assert prompt.count("### Question:") == 3 and prompt.endswith(
        "What is the capital of Peru?\n\n### Answer:\n"
    )
    assert "capital of France" not in prompt  # a test question is never shown as a shot
    assert m.predictions[0].finish_reason in ("stop", "length") and m.predictions[0].completion_tokens <= 4


def test_rows_in_other_schemas():
    alpaca = examples_from_rows([{"instruction": "Name the capital.", "input": "France", "output": "Paris"}])
    assert (alpaca[0].question, alpaca[0].reference) == ("Name the capital.\n\nFrance", "Paris")
    chat = examples_from_rows(
        [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    )
    assert (chat[0].question, chat[0].reference) == ("Hi?", "Hello.")
    with pytest.raises(DataError, match="raw text"):
        examples_from_rows([{"text": "just prose"}])


def _parser():
    from tunelab.evaluate.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser


def test_eval_cli_on_a_run_directory(tmp_path, tiny_models, qa_file):
    """A run dir (config.yaml naming its base, final/ with the template, metrics.jsonl): `tunelab eval`
    compares it with its base and writes the report with the run's loss curves."""
    from tunelab.config import DataConfig, ModelConfig, RunConfig, save_config

    run = tmp_path / "myrun"
    shutil.copytree(tiny_models["qwen2"], run / "final")
    (run / "final" / "tunelab_template.json").write_text(json.dumps(dataclasses.asdict(QA)))
    cfg = RunConfig(
        model=ModelConfig(name_or_path=str(tiny_models["llama"])), data=DataConfig(path=str(qa_file))
    )
    save_config(cfg, run / "config.yaml")
    records = [
        {"step": 0, "eval_loss": 6.0},
        {"step": 5, "loss": 4.0},
        {"step": 10, "loss": 3.0, "eval_loss": 3.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    args = _parser().parse_args(
        ["eval", str(run), "--data", str(qa_file), "--limit", "4", "--max-new-tokens", "4", "--quiet", "--bootstrap", "200"]
    )  # fmt: skip
    assert args.func(args) == 0
    s = json.loads((run / "eval" / "summary.json").read_text())
    assert list(s["models"]) == ["llama", "myrun"] and s["n_examples"] == 4
    assert s["models"]["llama"]["template"] == "qa" and s["models"]["myrun"]["loss"] > 0
    assert {d["metric"] for d in s["deltas"]} == {
        "exact_match",
        "exact_match_norm",
        "contains",
        "rouge_l",
        "bleu",
    }
    assert (run / "plots" / "loss.png").exists()
    assert "![loss](plots/loss.png)" in (run / "report.md").read_text()
    assert (run / "report.html").read_text().count("data:image/png;base64,") == 3

    with pytest.raises(TunelabError, match="--train-data"):
        args = _parser().parse_args(["compare", f"fewshot:1:{tiny_models['llama']}", "--data", str(qa_file)])
        args.func(args)


def test_the_eval_loss_of_conversations_scores_every_assistant_turn_as_training_does(tiny_models):
    from tunelab.data.dataset import encode_records
    from tunelab.training.loop import evaluate

    def turns(*texts):
        roles = ["system"] + ["user", "assistant"] * len(texts)
        return {"messages": [{"role": r, "content": t} for r, t in zip(roles, ("Be brief.", *texts))]}

    rows = [
        turns("Capital of Peru?", "Lima.", "And of Chile?", "Santiago."),
        turns("Capital of Kenya?", "Nairobi.", "Of Egypt?", "Cairo.", "Of Japan?", "Tokyo."),
    ]
    examples = examples_from_rows(rows)
    res = compare(
        [str(tiny_models["qwen2"])], rows, EvalSettings(template="chat", max_new_tokens=1, device="cpu")
    )
    g = Generator.load(str(tiny_models["qwen2"]), device="cpu")
    chat = templates.resolve("chat", "messages")
    expected = evaluate(
        g.model,
        encode_records([e.record for e in examples], chat, g.tokenizer, 512),
        8192,
        torch.device("cpu"),
    )
    assert res.models[0].loss == pytest.approx(expected, rel=1e-5)
    # The generation prompt is still the conversation up to its last answer.
    assert (
        res.models[0]
        .predictions[0]
        .prompt.rstrip()
        .endswith("And of Chile?<|im_end|>\n<|im_start|>assistant")
    )


def test_fewshot_answers_under_alpaca_stop_at_either_preamble():
    from tunelab.evaluate.predict import shot_stops

    stops = shot_stops(templates.resolve("alpaca", "alpaca"))
    assert [s.split(".")[0] for s in stops] == [
        "Below is an instruction that describes a task, paired with an input that provides further context",
        "Below is an instruction that describes a task",
    ]
    assert shot_stops(QA) == ["### Question:"] and shot_stops(None) == ["\n\n"]


def test_fewshot_chat_answers_are_not_cut_at_a_blank_line():
    """Under the chat template the shots are earlier turns of the conversation, not blocks separated
    by a blank line, yet a few-shot answer was cut at its first blank line: a two-paragraph answer
    lost its second paragraph (and its scores) where the finetuned chat model kept it. The
    end-of-turn token ends a chat answer, as it does without shots."""
    from tunelab.evaluate.predict import shot_stops

    assert shot_stops(templates.resolve("chat", "messages")) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "0"], "max_new_tokens: got 0"),
        (["--max-new-tokens", "-1"], "max_new_tokens: got -1"),
        (["--temperature", "-1"], "expected temperature >= 0"),
        (["--top-p", "0"], "0 < top_p <= 1"),
    ],
)
def test_generate_refuses_decoding_settings_it_cannot_honour(llama_dir, capsys, tmp_path, flags, message):
    from tunelab.cli import main

    assert main(["generate", "no/such-model", "Hello", *flags]) == 2  # refused before it loads
    assert message in capsys.readouterr().err
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["eval", "no/such-model", "--data", str(data), *flags]) == 2
    assert message in capsys.readouterr().err
    gen = Generator.load(str(llama_dir), device="cpu")
    with pytest.raises(TunelabError, match=message.replace("(", r"\(")):
        gen.generate(["Hello"], int(flags[1]) if "tokens" in flags[0] else 4,
                     float(flags[1]) if "temp" in flags[0] else 0.0, float(flags[1]) if "top" in flags[0] else 1.0)  # fmt: skip


def test_eval_reads_other_column_names_from_the_command_line_or_the_run(tmp_path, tiny_models, capsys):
    """Test rows with other column names: mapped with --data.fields as for training, or by the
    data.fields the evaluated run trained with."""
    from tunelab.cli import main
    from tunelab.config import DataConfig, ModelConfig, RunConfig, save_config

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in ROWS[:2]))
    common = ["--max-new-tokens", "2", "--quiet", "--no-loss", "--bootstrap", "200"]
    model = str(tiny_models["llama"])
    assert main(["eval", model, "--data", str(data), "--out", str(tmp_path / "a"), *common]) == 2
    assert "cannot tell the schema" in capsys.readouterr().err
    mapped = ["--data.fields.question=q", "--data.fields={answer: a}"]
    assert main(["eval", model, "--data", str(data), "--out", str(tmp_path / "b"), *mapped, *common]) == 0
    summary = json.loads((tmp_path / "b" / "eval" / "summary.json").read_text())
    assert summary["n_examples"] == 2
    printed = capsys.readouterr().out
    assert "metrics on 2 examples" in printed and "delta vs" not in printed  # one model: no delta vs itself
    assert main(["compare", model, "--data", str(data), "--train.lr=1", "--out", str(tmp_path / "c")]) == 2
    assert "take only the test rows' column names" in capsys.readouterr().err

    run = tmp_path / "run"  # a run that trained with the mapping
    shutil.copytree(tiny_models["qwen2"], run / "final")
    (run / "final" / "tunelab_template.json").write_text(json.dumps(dataclasses.asdict(QA)))
    data_cfg = DataConfig(path=str(data), fields={"question": "q", "answer": "a"})
    save_config(RunConfig(model=ModelConfig(name_or_path=model), data=data_cfg), run / "config.yaml")
    assert main(["eval", str(run), "--data", str(data), *common]) == 0
    assert json.loads((run / "eval" / "summary.json").read_text())["n_examples"] == 2


def test_eval_refuses_column_names_that_map_nothing_as_training_does(tmp_path, tiny_models, capsys):
    """--data.fields for eval skipped training's check: a role the rows' schema has not (qa has no
    `input`) or no schema has was dropped without a word. A mapping the run lends that does not fit
    the test file says it came from the run, and --data.fields={} reads the rows by their own names."""
    from tunelab.cli import main
    from tunelab.config import DataConfig, ModelConfig, RunConfig, save_config

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    common = [
        "--data",
        str(data),
        "--max-new-tokens",
        "2",
        "--quiet",
        "--no-loss",
        "--out",
        str(tmp_path / "o"),
    ]
    model = str(tiny_models["llama"])
    assert main(["eval", model, "--data.fields.input=relation", *common]) == 2
    assert "data.fields maps 'input', which the qa schema has no role for" in capsys.readouterr().err
    assert main(["eval", model, "--data.fields.questoin=question", *common]) == 2
    err = capsys.readouterr().err
    assert "data.fields maps 'questoin', which no schema has a role for" in err and "'question'?" in err
    assert main(["eval", model, "--data.fields.answer=anser", *common]) == 2
    assert "data.fields.answer names column 'anser', which no row has" in capsys.readouterr().err

    run = tmp_path / "run"  # trained on q/a columns; the test file has question/answer
    shutil.copytree(tiny_models["qwen2"], run / "final")
    data_cfg = DataConfig(path=str(data), fields={"question": "q", "answer": "a"})
    save_config(RunConfig(model=ModelConfig(name_or_path=model), data=data_cfg), run / "config.yaml")
    assert main(["eval", str(run), "--no-base", *common]) == 2
    err = capsys.readouterr().err
    assert "the run's own data.fields, question=q, answer=a, lent to the test rows" in err
    assert "--data.fields={}" in err
    assert main(["eval", str(run), "--no-base", "--data.fields={}", *common]) == 0


def test_eval_of_a_runs_final_or_best_folder_reads_the_runs_settings(tmp_path, tiny_models, capsys):
    """`eval RUN/final` (or RUN/best) dropped the run's settings: its column mapping, max_length and,
    for a full finetune, the base model it is compared with. They are read as for `eval RUN`; best/'s
    report goes beside final's (RUN/eval-best), not over it. A checkpoint folder says what it is."""
    from tunelab.cli import main
    from tunelab.config import DataConfig, ModelConfig, RunConfig, save_config

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"q": r["question"], "a": r["answer"]}) + "\n" for r in ROWS[:2]))
    run = tmp_path / "run"  # a full finetune of llama (its final/ and best/ hold whole models)
    for folder in ("final", "best"):
        shutil.copytree(tiny_models["qwen2"], run / folder)
        (run / folder / "tunelab_template.json").write_text(json.dumps(dataclasses.asdict(QA)))
    data_cfg = DataConfig(path=str(data), fields={"question": "q", "answer": "a"}, max_length=40)
    cfg = RunConfig(model=ModelConfig(name_or_path=str(tiny_models["llama"])), data=data_cfg)
    save_config(cfg, run / "config.yaml")
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    common = ["--data", str(data), "--max-new-tokens", "2", "--quiet"]
    for given, out, label in [(run / "final", run, "run"), (run / "best", run / "eval-best", "run/best")]:
        assert main(["eval", str(given), *common]) == 0, capsys.readouterr().err
        summary = json.loads((out / "eval" / "summary.json").read_text())
        assert list(summary["models"]) == ["llama", label] and summary["n_examples"] == 2
        assert summary["settings"]["max_length"] == 40
    step = str(run / "checkpoints" / "step-000002")
    assert main(["eval", step, "--no-base", "--data.fields={question: q, answer: a}", *common]) == 2
    err = capsys.readouterr().err
    assert "is a training checkpoint (state to resume from), not a model" in err and "run/best" in err


@pytest.mark.parametrize("side", ["right", "left"])
def test_eval_cuts_long_rows_as_the_run_did_so_its_loss_is_trainings(llama_dir, tmp_path, side):
    """Rows longer than the run's data.max_length: eval's held-out loss is training's final eval loss
    only if it truncates them as training did (max_length and side), not at the model's context."""
    import tunelab
    from tunelab.cli import main

    words = " ".join(f"w{i}" for i in range(60))
    rows = [{"question": f"Q{i} {words[: 10 * i]}?", "answer": f"A{i} {words}."} for i in range(8)]
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[6:]))
    run = tunelab.train(
        model=str(llama_dir), data=str(train), out=str(tmp_path / "run"), quiet=True, max_steps=2, batch_size=4,
        lr=1e-3, **{"data.eval_path": str(held), "data.max_length": 48, "data.truncation_side": side,
                    "data.check": "off"},
    )  # fmt: skip
    trained = [r["eval_loss"] for r in run.metrics() if "eval_loss" in r][-1]
    args = ["eval", str(run.path), "--data", str(held), "--no-base", "--max-new-tokens", "1", "--quiet"]
    assert main([*args, "--bootstrap", "200"]) == 0
    summary = json.loads((run.path / "eval" / "summary.json").read_text())
    assert summary["models"]["run"]["loss"] == pytest.approx(trained, rel=1e-5)


@pytest.mark.parametrize(
    "flag",
    ["--bootstrap=0", "--bootstrap=199", "--batch-size=0", "--limit=-2", "--show=-1", "--judge-retries=-1"],
)
def test_eval_refuses_counts_below_their_least(flag, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "some-run", "--data", "t.jsonl", flag])
    assert f"argument {flag.split('=')[0]}: expected an integer >= " in capsys.readouterr().err


def test_a_bootstrap_of_a_handful_of_resamples_is_refused(capsys):
    """--bootstrap 1 gave a "95 %" interval from one resample; the least is 200 (5 resamples in each
    tail), on the command line and in the library, before any model loads."""
    from tunelab.evaluate import cli
    from tunelab.evaluate.compare import MIN_BOOTSTRAP

    assert cli.MIN_BOOTSTRAP == MIN_BOOTSTRAP == 200
    args = _parser().parse_args(["eval", "some-run", "--data", "t.jsonl", "--bootstrap=200"])
    assert args.bootstrap == 200
    with pytest.raises(TunelabError, match="give at least 200"):
        compare(["no-such-model-is-loaded"], ROWS, EvalSettings(device="cpu"), bootstrap=1)


def test_generate_refuses_a_prompt_past_the_models_context(llama_dir):
    """serve answers 400 context_length_exceeded; generate and eval said nothing and answered anyway.
    The prompt is named by its place in the whole list (it was counted within its batch)."""
    gen = Generator.load(str(llama_dir), device="cpu")
    context = gen.context_length
    long_prompt = " ".join(["word"] * context)
    with pytest.raises(TunelabError, match=f"past this model's context of {context:,} tokens"):
        gen.generate(["Hello", long_prompt], max_new_tokens=2)
    with pytest.raises(TunelabError, match="prompt 5 is"):
        gen.generate(["Hello"] * 4 + [long_prompt], max_new_tokens=2, batch_size=2)
    assert len(gen.generate(["Hello"], max_new_tokens=2)) == 1


def test_a_metric_failing_on_some_rows_leaves_them_unscored_and_says_so(tiny_models, tmp_path, capsys):
    """A --metric that raises on one row cost every model's generations (the whole compare stopped
    after generating); now that row has no score for that metric, counted on stderr per model. One
    that cannot run at all stops before any model generates."""
    (tmp_path / "picky.py").write_text(
        "def picky(p, r):\n    if 'Lima' in r:\n        raise KeyError('oops')\n    return float(p == r)\n"
        "def broken(p, r):\n    return p.nope\n"
    )
    a = scripted(tiny_models["llama"], A_ANSWERS, None)
    b = scripted(tiny_models["qwen2"], B_ANSWERS, QA)
    calls = []
    b_generate = b.generate_detailed
    b.generate_detailed = lambda *args, **kw: calls.append(1) or b_generate(*args, **kw)
    settings = EvalSettings(device="cpu", metrics=[f"{tmp_path / 'picky.py'}:picky"])
    out = compare([a, b], ROWS, settings, labels=["base", "tuned"])
    rome = [i for i, r in enumerate(ROWS) if "Lima" in r["answer"]]
    assert rome and all(math.isnan(out.model("tuned").scores("picky")[i]) for i in rome)
    scored = [i for i in range(len(ROWS)) if i not in rome]
    assert not any(math.isnan(out.model("tuned").scores("picky")[i]) for i in scored)
    err = capsys.readouterr().err
    assert f"metric 'picky' failed on {len(rome)} of {len(ROWS)} rows for tuned" in err and "KeyError" in err
    assert "for base" in err and calls == [1]
    with pytest.raises(TunelabError, match="metric 'broken' fails on the first test row's reference"):
        compare([a, b], ROWS, EvalSettings(device="cpu", metrics=[f"{tmp_path / 'picky.py'}:broken"]))
    assert calls == [1]  # stopped before generating


def test_compare_checks_every_model_and_few_shot_pool_before_generating(tiny_models, tmp_path):
    """A misspelt third model was found only after the first two had generated."""
    from tunelab.errors import ModelLoadError

    a = scripted(tiny_models["llama"], A_ANSWERS, None)
    calls = []
    a_generate = a.generate_detailed
    a.generate_detailed = lambda *args, **kw: calls.append(1) or a_generate(*args, **kw)
    with pytest.raises(ModelLoadError, match="no such model folder"):
        compare(
            [a, str(tiny_models["qwen2"]), str(tmp_path / "nonexistent")], ROWS, EvalSettings(device="cpu")
        )
    with pytest.raises(TunelabError, match="few-shot needs 3 training examples"):
        compare(
            [a, f"fewshot:3:{tiny_models['qwen2']}"], ROWS, EvalSettings(device="cpu"), train_rows=ROWS[:2]
        )
    long_row = {"question": " ".join(["word"] * a.context_length), "answer": "x"}
    with pytest.raises(TunelabError, match="prompt 7 is"):  # the 7th row, found before row 1 generates
        compare([a], [*ROWS, long_row], EvalSettings(device="cpu", batch_size=2))
    assert calls == []


def test_a_prompt_too_long_for_a_later_contender_stops_compare_before_any_generates(
    tiny_models, tmp_path, monkeypatch
):
    """Prompt lengths were checked per model once it had loaded: a prompt too long for the second
    model (a shorter context, or a few-shot prompt) stopped the run after the first had generated,
    and nothing was written. Every contender's prompts are now measured, with its own tokenizer,
    template and context read without its weights, before any model generates."""
    short = tmp_path / "short"  # the same model with a 48-token context
    shutil.copytree(tiny_models["llama"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    calls = []
    original = Generator.generate_detailed
    monkeypatch.setattr(
        Generator, "generate_detailed", lambda *a, **kw: calls.append(1) or original(*a, **kw)
    )
    rows = [*ROWS[:2], {"question": " ".join(["word"] * 60), "answer": "x"}]
    settings = EvalSettings(device="cpu", max_new_tokens=4, with_loss=False)
    llama = str(tiny_models["llama"])
    with pytest.raises(TunelabError, match=r"short: prompt 3 is .*\(found before any model generated\)"):
        compare([llama, str(short)], rows, settings)
    pool = [{"question": f"Q{i} " + " ".join(["word"] * 30), "answer": "A"} for i in range(20)]
    with pytest.raises(TunelabError, match="20-shot llama: prompt 1 is .*context of 512") as e:
        compare([llama, f"fewshot:20:{llama}"], ROWS[:2], settings, train_rows=pool)
    assert "fewer shots" in e.value.hint
    assert calls == []
    assert len(compare([llama, f"fewshot:2:{llama}"], ROWS[:2], settings, train_rows=pool).models) == 2


def test_a_later_model_failing_keeps_the_generations_of_those_done(tiny_models, tmp_path, capsys):
    """What the checks before generating cannot see (weights that fail to load, memory running out)
    stopped a comparison with nothing written: each model's generations and scores are now written
    as it finishes (eval/partial-predictions.jsonl, said on stderr), and removed once all are done."""
    from tunelab.cli import main

    broken = tmp_path / "broken"  # its config and tokenizer read fine; its weights are gone
    shutil.copytree(tiny_models["llama"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    out = tmp_path / "out"
    llama = str(tiny_models["llama"])
    common = ["--data", str(data), "--max-new-tokens", "2", "--quiet", "--no-loss", "--out", str(out)]
    assert main(["compare", llama, str(tiny_models["qwen2"]), str(broken), *common]) == 2
    partial = out / "eval" / "partial-predictions.jsonl"
    rows = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [(r["index"], r["model"]) for r in rows] == [(i, m) for i in range(3) for m in ("llama", "qwen2")]
    assert all("prediction" in r and "exact_match" in r for r in rows)
    err = capsys.readouterr().err
    assert f"models done before it stopped (llama, qwen2) are in {partial}" in err
    assert not (out / "eval" / "summary.json").exists()
    assert main(["compare", llama, str(tiny_models["qwen2"]), *common]) == 0
    assert (out / "eval" / "summary.json").exists() and not partial.exists()


def test_eval_finds_a_runs_local_base_from_another_directory(llama_dir, tmp_path, monkeypatch):
    """A run trained with a relative model path kept it relative in config.yaml: `eval RUN` from
    another directory looked for the base there."""
    import tunelab
    from tunelab.evaluate.cli import base_of

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(llama_dir.parent)
    for method in ("full", "lora"):
        run = tunelab.train(
            model=llama_dir.name, data=str(data), out=str(tmp_path / method), quiet=True, max_steps=1,
            batch_size=2, **{"train.method": method, "data.check": "off"},
        )  # fmt: skip
        elsewhere = tmp_path / f"elsewhere-{method}"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        assert Path(base_of(str(run.path))) == llama_dir.resolve()
        monkeypatch.chdir(llama_dir.parent)


def test_the_metric_table_says_when_means_and_deltas_cover_different_rows(result):
    """Scores missing on different rows for each model: the means were over different rows from the
    delta's, with nothing said (base 3.000, run 3.000, delta +1.000)."""
    from tunelab.evaluate.tables import metric_table

    base, tuned = result.model("base"), result.model("tuned")
    saved, saved_deltas = [dict(p.scores) for m in (base, tuned) for p in m.predictions], result.deltas
    try:
        for i, (a, b) in enumerate(
            [(5, math.nan), (5, math.nan), (1, 2), (1, 2), (math.nan, 4), (math.nan, 4)]
        ):
            base.predictions[i].scores["judge"], tuned.predictions[i].scores["judge"] = a, b
        result.deltas = _deltas(result.models, [*result.metrics, "judge"], 200, 0)
        result.metrics.append("judge")
        (row,) = [r for r in metric_table(result)[1] if r[0] == "judge"]
        assert row[1] == "3.000 on 4/6" and row[2].startswith(
            "3.000 on 4/6 (+1.000 [+1.000, +1.000], 2 paired)"
        )
        (row,) = [r for r in metric_table(result)[1] if r[0] == "exact_match_norm"]
        assert "on " not in row[1] and "paired" not in row[2]  # every row scored: as before
    finally:
        result.metrics.remove("judge")
        for p, s in zip([p for m in (base, tuned) for p in m.predictions], saved):
            p.scores = s
        result.deltas = saved_deltas


def test_eval_can_leave_out_bad_test_rows_when_asked(llama_dir, tmp_path, capsys):
    """eval's hint for a bad test row was `--data.on_bad_row=skip`, which eval then refused."""
    from tunelab.cli import main
    from tunelab.evaluate.predict import read_examples

    lines = [json.dumps(r) for r in ROWS[:3]]
    lines.insert(1, '{"question": "broken", ')  # line 2: not JSON
    lines.append(json.dumps({"question": "Empty?", "answer": ""}))  # line 5: nothing to score against
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join(lines) + "\n")
    args = ["eval", str(llama_dir), "--data", str(test), "--no-base", "--max-new-tokens", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "--data.on_bad_row=skip" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--data.on_bad_row=skip", "--bootstrap", "200"]) == 0
    err = capsys.readouterr().err
    assert "left out 2 bad rows" in err and "test.jsonl:2" in err and "test.jsonl:5" in err
    summary = json.loads((tmp_path / "b" / "eval" / "summary.json").read_text())
    assert summary["n_examples"] == 3
    kept = read_examples(str(test), limit=2, on_bad_row="skip")
    assert [ex.record.line for ex in kept] == [1, 3]  # the file's own lines, the limit over usable rows


def test_generate_refuses_arguments_it_would_ignore(capsys, tmp_path):
    """A prompt beside --file was dropped, and --output without --file did nothing, without a word."""
    from tunelab.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "Hi?"}) + "\n")
    assert main(["generate", "no/such-model", "Hello", "--file", str(data)]) == 2
    assert "both a prompt and --file were given" in capsys.readouterr().err
    assert main(["generate", "no/such-model", "Hello", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "--output is where --file's predictions go" in capsys.readouterr().err


def test_a_bench_json_of_other_models_stays_out_of_the_report(tmp_path, capsys):
    """eval/bench.json from an earlier comparison went into every later report in that folder."""
    from tunelab.evaluate.cli import _bench_of

    path = tmp_path / "bench.json"
    assert _bench_of(path, ["base", "run"]) is None
    path.write_text(json.dumps({"run": {"t": {"acc": 0.5}}, "other": {"t": {"acc": 0.9}}}))
    assert _bench_of(path, ["base", "run"]) == {"run": {"t": {"acc": 0.5}}}
    assert "results of other left out of the report" in capsys.readouterr().err
    assert _bench_of(path, ["x"]) is None


def test_group_names_for_rows_without_the_column_or_with_an_empty_value():
    from tunelab.evaluate.compare import _group_name

    assert _group_name({"k": "a"}, "k") == "a" and _group_name({"k": 3}, "k") == "3"
    assert _group_name({}, "k") == "(no k)" and _group_name({"k": None}, "k") == "(no k)"
    assert _group_name({"k": "  "}, "k") == "(empty)"


def test_a_bad_test_row_past_the_limit_does_not_stop_eval(tmp_path):
    """--limit 1 still failed on a bad row at line 3."""
    from tunelab.evaluate.predict import read_examples

    lines = [json.dumps(r) for r in ROWS[:2]] + [
        '{"question": "broken',
        json.dumps({"question": "Q?", "answer": ""}),
    ]
    test = tmp_path / "t.jsonl"
    test.write_text("\n".join(lines) + "\n")
    assert [ex.record.line for ex in read_examples(str(test), limit=2)] == [1, 2]
    with pytest.raises(DataError) as e:
        read_examples(str(test), limit=3)
    assert (
        e.value.line == 3 and "not valid JSON" in e.value.reason and "--data.on_bad_row=skip" in e.value.hint
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n".join([lines[0], lines[1], lines[3]]) + "\n")
    assert len(read_examples(str(empty), limit=2)) == 2
    with pytest.raises(DataError, match="empty completion") as e:
        read_examples(str(empty))
    assert e.value.line == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "RUN", "--base", "B", "--no-base"], "--base and --no-base"),
        (["eval", "RUN", "--judge-model", "m"], "--judge-model without --judge"),
        (
            ["compare", "A", "B", "--judge-mode", "pairwise", "--judge-cache", "c"],
            "--judge-mode, --judge-cache",
        ),
        (["compare", "A", "B", "--train-data", "t.jsonl"], "--train-data feeds fewshot:K:MODEL contenders"),
    ],
)
def test_eval_and_compare_refuse_options_they_would_ignore(args, message, capsys):
    """--base beside --no-base, the judge's options without --judge, and compare's --train-data
    with no fewshot:K:MODEL contender were accepted and did nothing, without a word."""
    from tunelab.cli import main

    assert main([*args, "--data", "no/such/test.jsonl"]) == 2
    assert message in capsys.readouterr().err
