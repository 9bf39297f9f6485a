"""`tunelab export`: the merged model prompts like the run (its chat template renders tunelab's prompt
exactly), stops like the run, and loads with plain transformers; `--adapter` copies the PEFT adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import addition_rows, write_jsonl
from tunelab import cli, runner
from tunelab.config import load_config
from tunelab.data.schema import Record
from tunelab.data.templates import ALPACA_PROMPT, Template, render, resolve
from tunelab.data.tokenize import special_prefix
from tunelab.export import chat_template
from tunelab.generate import Generator

QUESTION = 'What is 7 plus 5? It\'s "tricky" \\ {x} é'
TEMPLATES = {
    "qa": resolve("qa", "qa"),
    "alpaca": resolve("alpaca", "alpaca"),
    "raw": resolve("raw", "prompt_completion"),
    # Quotes, backslashes, braces, Jinja's own delimiters, CR/LF, tab and non-ASCII must all survive.
    "custom": Template(
        "custom", "Frage «{question}» \\ 'a' \"b\" }}}} {{% x\r\nAntwort:\t", "{answer}", "qa"
    ),
}


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer_dir, tmp_path_factory):
    """The fixture tokenizer, but adding a BOS before text like Llama's does."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = ("<|im_start|>", tok.convert_tokens_to_ids("<|im_start|>"))
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[bos]
    )
    out = tmp_path_factory.mktemp("bos-tok")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def token_ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("with_bos", [False, True])
def test_chat_template_renders_tunelabs_prompt_exactly(name, with_bos, tokenizer, bos_tokenizer):
    template = TEMPLATES[name]
    tok = bos_tokenizer if with_bos else tokenizer
    tok = type(tok).from_pretrained(tok.name_or_path)  # a fresh copy: the template is set on it
    assert special_prefix(tok) == ([tok.convert_tokens_to_ids("<|im_start|>")] if with_bos else [])
    tok.chat_template = chat_template(template, tok)

    messages = [{"role": "user", "content": QUESTION}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = Generator(None, tok, template).render(QUESTION)  # what `tunelab generate` feeds the model
    assert rendered == tok.decode(special_prefix(tok)) + prompt
    ids = token_ids(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert ids == special_prefix(tok) + tok(prompt, add_special_tokens=False)["input_ids"]

    # A full turn renders as the training example did: prompt, completion, EOS.
    answer = "7 plus 5 is 12."
    turn = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    values = {"question": QUESTION, "answer": answer, "instruction": QUESTION, "output": answer}
    values |= {"prompt": QUESTION, "completion": answer}
    segments = render(Record("t", 1, values), template)
    assert turn == tok.decode(special_prefix(tok)) + "".join(s.text for s in segments) + tok.eos_token

    # A conversation renders from its last question on, as `tunelab serve` and `chat` send it; the
    # answer header is the generation prompt (rendered every turn and always appended, it was not).
    history = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And 2 + 2?"}]
    last = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert last == tok.decode(special_prefix(tok)) + Generator(None, tok, template).render("And 2 + 2?")
    bare = tok.apply_chat_template(history, add_generation_prompt=False, tokenize=False)
    assert last.startswith(bare) and "And 2 + 2?" in bare and QUESTION not in last
    if name == "qa":
        assert last[len(bare) :] == "\n\n### Answer:\n"


def test_alpaca_export_uses_the_no_input_prompt(tokenizer):
    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = chat_template(TEMPLATES["alpaca"], tok)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Sort 3 1 2"}], add_generation_prompt=True, tokenize=False
    )
    assert "### Instruction:\nSort 3 1 2\n\n### Response:\n" in text and "### Input:" not in text
    assert TEMPLATES["alpaca"].prompt_format == ALPACA_PROMPT


def test_chat_runs_keep_the_tokenizers_chat_template(tokenizer):
    assert chat_template(Template("chat", schema="messages"), tokenizer) == tokenizer.chat_template


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    data = write_jsonl(root / "qa.jsonl", addition_rows())
    out = {}
    for method in ("full", "lora"):
        settings = {
            "model.name_or_path": str(llama_dir),
            "data.path": str(data),
            "out": str(root / method),
            "train.method": method,
            "train.max_steps": 6,
            "train.batch_size": 8,
            "train.lr": 1e-2,
        }
        out[method] = runner.run(load_config(values=settings), quiet=True).run_dir
    return out


def test_merge_writes_a_standalone_model_that_prompts_and_stops_like_the_run(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run, out = runs["full"], tmp_path / "merged"
    assert cli.main(["export", str(run), "--merge", str(out)]) == 0
    # A full finetune's weights go out unchanged, as safetensors.
    saved, exported = load_file(run / "final" / "model.safetensors"), load_file(out / "model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)

    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos and gen.pad_token_id == tok.pad_token_id
    assert json.loads((out / "tunelab_template.json").read_text())["name"] == "qa"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert prompt == "### Question:\nWhat is 2 plus 3?\n\n### Answer:\n"

    # Plain transformers with the exported chat template generates what `tunelab generate RUN` does.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    expected = Generator.load(str(run), device="cpu").generate(["What is 2 plus 3?"], max_new_tokens=10)
    assert expected[0] and tok.decode(new[:cut], skip_special_tokens=True) == expected[0]


def test_adapter_export_and_bf16_merge_of_a_lora_run(runs, tmp_path, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab import progress

    monkeypatch.setattr(progress, "SAY_S", 0.0)  # every step says what it did, however short
    run = runs["lora"]
    out = tmp_path / "adapter"
    assert cli.main(["export", str(run), "--adapter", str(out), "--merge", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err.splitlines()  # the merge's steps, with their time, on stderr
    assert err[0].startswith(f"export: loading {run}: ") and " parameters in " in err[0]
    assert err[1].startswith("export: merging the LoRA adapter into the weights in ")
    assert err[2].startswith(f"export: writing {tmp_path / 'bf16'} in ")
    assert "export:" not in captured.out
    assert (out / "adapter_model.safetensors").read_bytes() == (
        run / "final" / "adapter_model.safetensors"
    ).read_bytes()
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out)
    assert any(n.endswith("lora_B.default.weight") for n, _ in model.named_parameters())

    merged = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values()) and not any("lora" in k for k in merged)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_errors_are_for_people(runs, tmp_path, capsys):
    assert cli.main(["export", str(runs["full"]), "--adapter", str(tmp_path / "a")]) == 2
    assert "holds a full model, not a LoRA adapter" in capsys.readouterr().err
    assert cli.main(["export", str(runs["full"])]) == 2
    assert "give --merge OUT and/or --adapter OUT" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert cli.main(["export", str(runs["lora"]), "--adapter", str(busy)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    shutil.rmtree(busy)


def test_export_never_deletes_what_it_exports(runs, tmp_path, capsys):
    """`export RUN --merge RUN/final --overwrite` deleted the run's final/ before reading it; an
    output that is a file crashed with a traceback; a missing source after --overwrite had already
    deleted the output."""
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for out in (run / "final", run, run / "final" / "sub", run.parent):
        for flag in ("--merge", "--adapter"):
            assert cli.main(["export", str(run), flag, str(out), "--overwrite"]) == 2
            assert "overlaps what is being exported" in capsys.readouterr().err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    assert cli.main(["export", str(tmp_path / "typo"), "--merge", str(kept), "--overwrite"]) == 2
    assert "no such model folder" in capsys.readouterr().err and (kept / "mine.txt").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["export", str(run), "--merge", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    same = str(tmp_path / "same")
    assert cli.main(["export", str(run), "--merge", same, "--adapter", same]) == 2
    assert "same or nested folders" in capsys.readouterr().err and not Path(same).exists()
    assert (
        cli.main(["export", str(run), "--merge", str(kept), "--overwrite"]) == 0
    )  # a real overwrite still works
    assert not (kept / "mine.txt").exists() and (kept / "config.json").exists()


def test_export_refuses_a_dtype_with_nothing_merged(tmp_path, capsys):
    """--dtype sets the merged weights' dtype; with --adapter alone (copied as trained) it was
    accepted and did nothing."""
    out = tmp_path / "a"
    assert cli.main(["export", "no/such-run", "--adapter", str(out), "--dtype", "bfloat16"]) == 2
    assert "--dtype is the merged model's dtype" in capsys.readouterr().err and not out.exists()
