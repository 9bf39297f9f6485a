from pathlib import Path

import pytest
import torch

from tunelab.config import RunConfig, load_config, parse_override
from tunelab.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "src" / "tunelab" / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-5 and cfg.data.eval_ratio == 0.1 and cfg.model.name_or_path == "world"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name and cfg.task in ("sft", "pretrain")
    assert cfg.train.lr > 0


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"world-base.yaml", "world-qa.yaml", "pythia-70m-full.yaml", "qwen2.5-0.5b-lora.yaml"} <= names


def test_overrides_are_typed():
    cfg = load_config(
        overrides=[
            "--train.lr=1e-4",
            "--train.epochs=2",
            "--data.template=alpaca",
            "--train.report_to=tensorboard",
        ]
    )
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert (
        cfg.train.epochs == 2.0 and cfg.data.template == "alpaca" and cfg.train.report_to == ["tensorboard"]
    )
    assert parse_override("--data.fields={question: q, answer: a}") == (
        ["data", "fields"],
        {"question": "q", "answer": "a"},
    )


def test_yaml_floats_in_exponent_form(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n")
    assert load_config(f).train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.lrr=1", "unknown key 'train.lrr'"),
        ("--data.template=qaa", "accepted values"),
        ("--train.batch_size=abc", "train.batch_size: got 'abc'"),
        ("--train.lr=-1", "train.lr"),
        ("--data.eval_ratio=1.5", "data.eval_ratio"),
        ("--train.gradient_checkpointing=maybe", "expected true or false"),
        ("--model.dtype=float16", "model.dtype float16 with train.method full"),
        ("--train.adam_betas=[0.9,", "train.adam_betas: cannot read '[0.9,'"),
        ("--train.adam_betas=[0.9, 1.5]", "expected two numbers in [0, 1)"),
        ("--train.grad_clip=-1", "train.grad_clip: got -1.0, expected a positive norm"),
        ("--train.max_steps=0", "train.max_steps: got 0, expected >= 1"),
        ("--train.max_steps=-5", "train.max_steps: got -5"),
        ("--train.log_every=0", "train.log_every: got 0, expected >= 1"),
        ("--train.eval_every=-1", "train.eval_every: got -1"),
        ("--train.save_every=-2", "train.save_every: got -2"),
        ("--train.keep_last=-1", "train.keep_last: got -1"),
        ("--train.micro_batch_tokens=0", "train.micro_batch_tokens: got 0"),
        ("--train.weight_decay=-0.1", "train.weight_decay: got -0.1"),
        ("--lora.r=0", "lora.r and lora.alpha: got 0 and 32"),
        ("--lora.dropout=1", "lora.dropout: got 1.0"),
        ("--train.method=lora|--model.init={model_type: llama}", "model.init builds new random weights"),
        # pretraining: a chunk bigger than a micro-batch overran the budget (the OOM advice did nothing)
        (
            "--task=pretrain|--data.chunk_length=64|--train.micro_batch_tokens=32",
            "smaller than data.chunk_length (64)",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override.split("|"))
    assert message in str(e.value)


def test_an_apple_gpu_asked_for_where_there_is_none_is_said():
    from tunelab.errors import ModelLoadError
    from tunelab.models import pick_device

    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    with pytest.raises(ModelLoadError, match="no Apple GPU"):
        pick_device("mps")


def test_did_you_mean():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["--data.template=qaa"])
    assert e.value.hint == "did you mean 'qa'?"


def test_custom_template_needs_formats():
    with pytest.raises(ConfigError, match="prompt_format"):
        load_config(overrides=["--data.template=custom"])


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def _documented_default(body: str, key: str) -> object:
    import yaml

    cell = body.split(f"| `{key}` | `", 1)[1].split("` |", 1)[0]
    value = yaml.safe_load(cell)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-5 as a string
        except ValueError:
            pass
    return value


def test_every_key_is_documented():
    """docs/configs.md stays true: every dataclass field has a row in its section's table, with the
    default the code has."""
    import dataclasses

    text = (Path(__file__).parents[1] / "docs" / "configs.md").read_text()
    cfg = RunConfig()
    sections = {"model": cfg.model, "data": cfg.data, "train": cfg.train, "lora": cfg.lora}
    tables = {name: text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0] for name in sections}
    tables[""] = text.split("## top level\n", 1)[1].split("\n## ", 1)[0]
    fields = [(n, f, getattr(s, f.name)) for n, s in sections.items() for f in dataclasses.fields(s)]
    fields += [("", f, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in sections]
    for name, f, default in fields:
        where = f"{name}.{f.name}" if name else f.name
        assert f"| `{f.name}` |" in tables[name], f"{where} is not in docs/configs.md"
        assert _documented_default(tables[name], f.name) == default, f"{where}: docs/configs.md's default"


def test_union_and_yaml_booleans_keep_their_words():
    cfg = load_config(
        overrides=["--lora.target_modules=all-linear", "--data.check=off", "--train.method=lora"]
    )
    assert cfg.lora.target_modules == "all-linear" and cfg.data.check == "off"
    lora = ["--train.method=lora"]
    assert load_config(overrides=["--lora.target_modules=[q_proj, v_proj]", *lora]).lora.target_modules == [
        "q_proj",
        "v_proj",
    ]


def test_a_missing_config_points_at_the_shipped_recipes(tmp_path, monkeypatch):
    """`configs/world-base.yaml` is found from the repository's root only; elsewhere (an installed
    package) the message gives the shipped copy's path, or lists what tunelab ships."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config file not found: configs/world-base.yaml") as e:
        load_config("configs/world-base.yaml")
    shipped = Path(e.value.hint.split("give its path, ")[1])
    assert shipped.is_file() and load_config(shipped).name == "world-base"
    with pytest.raises(ConfigError) as e:
        load_config("configs/no-such-recipe.yaml")
    assert "tunelab ships" in e.value.hint and "world-qa.yaml" in e.value.hint, e.value.hint


def _config_from_command_line(monkeypatch, argv):
    """The RunConfig `tunelab ARGV` would train with (the run itself stood in)."""
    from tunelab import cli, runner

    seen = []

    def stand_in(cfg, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop before any model loads

    monkeypatch.setattr(runner, "run", stand_in)
    assert cli.main(argv) == 130
    return seen[0]


def test_command_line_settings_with_spaces_reach_the_config(monkeypatch):
    """argparse reads "--x.y=a b" (a space in it) as a positional, i.e. as the config file: the
    documented forms must still reach the config. A template format keeps its text (it is not YAML)
    and its \\n, as the shell passes it, is a newline."""
    cfg = _config_from_command_line(
        monkeypatch,
        [
            "train", "--data", "qa.jsonl", "--data.fields={question: q, answer: a}",
            "--data.template=custom", r"--data.prompt_format=Q: {question}\nA: ",
            "--data.completion_format={answer}", "--train.adam_betas=[0.9, 0.95]",
        ],
    )  # fmt: skip
    assert cfg.data.fields == {"question": "q", "answer": "a"}
    assert cfg.data.prompt_format == "Q: {question}\nA: " and cfg.data.completion_format == "{answer}"
    assert list(cfg.train.adam_betas) == [0.9, 0.95] and cfg.data.path == "qa.jsonl"


def test_data_path_as_a_key_is_the_same_run_as_the_data_flag(monkeypatch):
    """`--data.path=F` trained the world demo's recipe (LoRA, lr 2e-3, 6 epochs) on F, where
    `--data F` trains the defaults; and `--name=N`, a top-level key, was refused."""
    by_flag = _config_from_command_line(monkeypatch, ["train", "--data", "qa.jsonl"])
    by_key = _config_from_command_line(monkeypatch, ["train", "--data.path=qa.jsonl", "--name=mine"])
    assert by_key.train == by_flag.train and by_key.data == by_flag.data and by_key.lora == by_flag.lora
    assert by_key.name == "mine" and by_flag.train.method == "full"
    demo = _config_from_command_line(monkeypatch, ["train"])  # no data at all: the shipped demo's recipe
    assert demo.train.method == "lora" and demo.train != by_flag.train


def test_a_config_key_with_its_value_after_a_space_says_how_to_write_it(capsys):
    from tunelab import cli

    assert cli.main(["train", "--train.lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "'--train.lr 1e-3'" in err and "write it as --train.lr=1e-3" in err


def test_commands_without_config_keys_refuse_them(capsys):
    from tunelab import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", "some-run", "hello", "--train.lr=1e-3"])
    assert "unrecognized arguments: --train.lr=1e-3" in capsys.readouterr().err


def test_a_recipe_for_the_other_task_is_refused(tmp_path, capsys):
    """`tunelab train` over a pretraining recipe would cut its documents as SFT examples (and the
    reverse): refused, before anything loads, from the CLI and from Python."""
    import tunelab
    from tunelab import cli

    assert cli.main(["train", str(CONFIGS[0].parent / "world-base.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is a pretrain config (task: pretrain), and this runs sft" in err and "tunelab pretrain" in err
    assert cli.main(["pretrain", str(CONFIGS[0].parent / "world-qa.yaml")]) == 2
    assert "`tunelab train`" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is a pretrain config"):
        tunelab.train(config=CONFIGS[0].parent / "world-base.yaml")


def test_train_takes_a_shipped_recipe_by_its_name_from_anywhere(monkeypatch, tmp_path):
    """As `tunelab data check world-qa.yaml` does."""
    monkeypatch.chdir(tmp_path)
    for name in ("world-qa.yaml", "configs/world-qa.yaml"):
        assert _config_from_command_line(monkeypatch, ["train", name]).name == "world-qa"


def test_lora_keys_given_for_a_full_finetune_are_said(tmp_path, capsys):
    """A lora key set on the command line (or from Python) with method full changes nothing: said
    (not refused: one set of arguments may be swept over methods). The same key from a recipe
    switched to full stays quiet (the file was written for an adapter), and with an adapter method
    it counts."""
    load_config(overrides=["--lora.r=8", "--lora.alpha=16", "--train.method=full"])
    err = capsys.readouterr().err
    assert "note: lora.r, lora.alpha ignored: train.method is full" in err and "--train.method=lora" in err
    load_config(values={"lora.dropout": 0.1})  # method full is the default
    assert "lora.dropout ignored" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  method: lora\nlora:\n  r: 4\n")
    assert load_config(recipe, ["--train.method=full"]).lora.r == 4
    assert load_config(recipe, ["--lora.r=8"]).lora.r == 8
    load_config(overrides=["--lora.r=8", "--train.method=dora"])
    assert capsys.readouterr().err == ""


def test_a_data_key_of_the_other_task_is_refused(tmp_path):
    """`tunelab pretrain --data.max_length=64` (or truncation_side, template, train_on_prompt, the
    formats) and `tunelab train --data.chunk_length=64` ran and did nothing: pretraining cuts
    documents into chunk_length chunks and trains every token, finetuning never chunks."""
    with pytest.raises(ConfigError, match="data.max_length: a finetuning setting, and this pretrains") as e:
        load_config(overrides=["--data.max_length=64"], values={"task": "pretrain"})
    assert "data.chunk_length" in e.value.hint
    with pytest.raises(ConfigError, match="data.truncation_side, data.template: a finetuning setting"):
        load_config(values={"task": "pretrain", "data.truncation_side": "left", "data.template": "qa"})
    with pytest.raises(
        ConfigError, match="data.chunk_length: a pretraining setting, and this finetunes"
    ) as e:
        load_config(overrides=["--data.chunk_length=64"], values={"task": "sft"})
    assert "data.max_length" in e.value.hint
    # Harmless: a value that changes nothing (what `--from` across tasks sets), or a file's own keys.
    load_config(values={"task": "pretrain", "data.template": "auto", "data.prompt_format": None})
    load_config(overrides=["--data.template=none"], values={"task": "pretrain"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  max_length: 128\n")
    assert load_config(recipe, values={"task": "pretrain"}).data.max_length == 128


def test_keep_last_without_save_every_is_said(capsys):
    """train.keep_last given without train.save_every kept nothing (no checkpoint is written),
    silently."""
    load_config(overrides=["--train.keep_last=5"])
    err = capsys.readouterr().err
    assert "note: train.keep_last 5 ignored: train.save_every is None, so no checkpoint is written" in err
    load_config(values={"train.keep_last": 1, "train.save_every": 0})
    assert "train.keep_last 1 ignored" in capsys.readouterr().err
    load_config(overrides=["--train.keep_last=5", "--train.save_every=10"])
    load_config(overrides=["--train.save_every=10"])
    assert capsys.readouterr().err == ""
