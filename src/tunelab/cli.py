"""One CLI, thin: parse, call the library, print. `--section.key=value` overrides any config key."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from tunelab.config import packaged_config
from tunelab.errors import TunelabError

__all__ = ["main", "packaged_config"]

DEFAULT_SFT_CONFIG = "world-qa.yaml"  # what `tunelab train` with nothing else runs (the shipped default)


# Top-level config keys given as --key=value (the others have flags of their own: --out, --from).
_TOP_KEYS = ("name",)


def _check_overrides(extra: list[str]) -> list[str]:
    bad = [
        a
        for a in extra
        if not (a.startswith("--") and ("." in a.split("=", 1)[0] or a.split("=", 1)[0][2:] in _TOP_KEYS))
    ]
    if bad:
        raise TunelabError(
            f"unknown arguments: {' '.join(bad)}", "config keys are given as --section.key=value"
        )
    return list(extra)


# `--section.key=value` (a config key: a dot in the name). Taken out of argv before argparse sees
# it: argparse reads an argument that starts with "--" but holds a space ("--data.fields={q: a}")
# as a positional, i.e. as the config file.
_OVERRIDE = re.compile(r"--(name=|[A-Za-z_][\w-]*(\.[\w-]+)+(=|$))")
# Commands that take config keys (eval and compare: the test rows' data.fields only); the others
# have their own flags only.
_TAKES_OVERRIDES = {"train", "pretrain", "data", "eval", "compare"}


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv -> (the rest, for argparse; the `--section.key=value` settings, in order)."""
    rest: list[str] = []
    overrides: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return rest + argv[i:], overrides
        if not _OVERRIDE.match(arg):
            rest.append(arg)
            continue
        following = argv[i + 1] if i + 1 < len(argv) else None
        if "=" not in arg and following is not None and not following.startswith("-"):
            raise TunelabError(
                f"'{arg} {following}': a config key takes its value after '='",
                f"write it as {arg}={following}",
            )
        overrides.append(arg)
    return rest, overrides


def _train_config(args: argparse.Namespace, extra: list[str], task: str):
    from tunelab.config import check_task, load_config

    if args.config and not Path(args.config).exists() and packaged_config(Path(args.config).name).exists():
        args.config = str(packaged_config(Path(args.config).name))  # a shipped recipe, by its name
    check_task(args.config, task)  # a recipe written for the other task (not --from's: its run's own)
    values: dict[str, object] = {"task": task}
    if args.model:
        values["model.name_or_path"] = args.model
    if args.data:
        values["data.path"] = args.data
    if args.out:
        values["out"] = args.out
    if getattr(args, "report_to", None):
        values["train.report_to"] = args.report_to
    path = args.config
    if getattr(args, "from_run", None):
        # A new run that starts from RUN's final weights; unless told otherwise, with RUN's own recipe.
        values["model.name_or_path"] = args.from_run
        values["parent"] = str(args.from_run)
        values["model.init"] = None
        values["model.tokenizer"] = None
        values.setdefault("out", "")
        if path is None:
            path = Path(args.from_run) / "config.yaml"
            if not path.exists():
                raise TunelabError(
                    f"--from {args.from_run}: not a tunelab run directory (no config.yaml)",
                    "give the run directory `tunelab train` printed (runs/NAME-TIMESTAMP), or a model folder "
                    "with --model to start from its weights",
                )
            if load_config(path).task != task:  # e.g. finetuning a pretrained base: not its raw-text template
                values |= {
                    "data.template": "auto",
                    "data.prompt_format": None,
                    "data.completion_format": None,
                }
    # No data given (neither --data nor --data.path=): the shipped world demo's recipe.
    data_given = args.data or any(a.split("=", 1)[0] == "--data.path" for a in extra)
    if path is None and task == "sft" and not data_given:
        path = packaged_config(DEFAULT_SFT_CONFIG)
    return load_config(path, _check_overrides(extra), values)


def cmd_train(args: argparse.Namespace, extra: list[str], task: str) -> int:
    from tunelab.runner import config_for_resume, run

    if args.resume:
        given = [a for a in (args.config, args.model, args.data, args.out, args.from_run) if a] + extra
        if given:  # silently ignoring them would train something other than what was asked
            raise TunelabError(
                f"--resume continues {args.resume} exactly as it was configured; got also: {' '.join(given)}",
                f"edit {args.resume}/config.yaml to change it, or start a new run with --from {args.resume}",
            )
        cfg = config_for_resume(args.resume)
        result = run(cfg, quiet=args.quiet, resume=args.resume)
    else:
        cfg = _train_config(args, extra, task)
        result = run(cfg, quiet=args.quiet, overwrite=args.overwrite)
    if _rank() not in (None, 0):
        return 0  # rank 0 reports for the run
    print(
        f"done: {result.steps} steps, final train loss {result.final_loss:.4f}"
        + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        + (f" (best {result.best_eval_loss:.4f} at step {result.best_step})" if result.best_step else "")
        + (f"; {result.mean_tokens_per_s:,.0f} tokens/s" if result.mean_tokens_per_s else "")
        + (f", peak memory {result.peak_mem_gib:.1f} GiB" if result.peak_mem_gib is not None else "")
    )
    print(f"run directory: {result.run_dir}  (model in {result.run_dir / 'final'})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab import progress
    from tunelab.generate import Generator, check_decoding, note_unused_sampling, prompt_of, read_prompts

    check_decoding(args.max_new_tokens, args.temperature, args.top_p)  # before the model loads
    note_unused_sampling(args.temperature, args.top_p, args.seed)
    if args.file and args.prompt is not None:
        raise TunelabError(
            "both a prompt and --file were given", 'give one: tunelab generate RUN "question", or --file F'
        )
    if args.output and not args.file:
        raise TunelabError(
            "--output is where --file's predictions go", "give --file F too, or leave --output out"
        )
    gen = Generator.load(args.model, device=args.device)
    prompts = read_prompts(args.file) if args.file else [args.prompt]
    if not prompts or prompts == [None]:
        raise TunelabError(
            "nothing to generate from", 'give a prompt: tunelab generate RUN "question", or --file F'
        )
    answers: list[str] = []
    batch = 32
    gen.prompt_ids(prompts, args.max_new_tokens, args.raw)  # every prompt fits, before any generates
    with progress.shown(bool(args.file)), progress.track("generate", len(prompts), "prompts") as advance:
        for start in range(0, len(prompts), batch):  # a batch at a time, for the progress
            part = prompts[start : start + batch]
            seed = args.seed if start == 0 else None  # seeded once: later batches continue the stream
            answers += gen.generate(
                part, args.max_new_tokens, args.temperature, args.top_p, seed, batch, raw=args.raw
            )
            advance(len(part))
    if args.file:
        out = Path(args.output or Path(args.file).with_suffix(".predictions.jsonl"))
        with out.open("w", encoding="utf-8") as f:
            for p, a in zip(prompts, answers):
                row = {k: v for k, v in p.items() if k != "messages"} if isinstance(p, dict) else {}
                row = {**row, "prompt": prompt_of(p), "completion": a}  # the row's fields kept (ids, input)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(answers)} completions to {out}")
    else:
        print(answers[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab", description="Finetune a small LLM and prove it got better."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (
        ("train", "finetune a model (defaults to the shipped world demo data)"),
        ("pretrain", "next-token prediction on raw text, new or continued"),
    ):
        p = sub.add_parser(
            name, help=help_text, epilog="any config key: --section.key=value, e.g. --train.lr=1e-4"
        )
        p.add_argument("config", nargs="?", help="YAML config (see configs/)")
        p.add_argument("--model", help="hub id, local folder, run directory, or 'world'")
        p.add_argument("--data", help="training data file or datasets folder")
        p.add_argument("--out", help="run directory (default runs/<name>-<timestamp>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
        p.add_argument("--resume", metavar="RUN", help="continue RUN from its newest complete checkpoint")
        p.add_argument(
            "--from", dest="from_run", metavar="RUN", help="start a new run from RUN's final weights"
        )
        p.add_argument(
            "--report-to", dest="report_to", help="tensorboard, mlflow and/or wandb (comma-separated)"
        )
        p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")

    g = sub.add_parser("generate", help="answer a prompt (or a file of prompts) with the run's template")
    g.add_argument("model", help="run directory, HF folder or hub id")
    g.add_argument("prompt", nargs="?", help="the question / instruction")
    g.add_argument(
        "--file",
        help="JSONL rows rendered as training renders them (a prompt/question/instruction/input field "
        "and whatever else the template names, e.g. Alpaca's input; or messages), or a text file, "
        "one prompt per line; the output keeps each row's fields",
    )
    g.add_argument("--output", help="where batch predictions go (JSONL)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--raw", action="store_true", help="send the text as-is, without the template")

    # Other commands live beside the code they drive; each module has `register(sub)`, which adds its
    # parser with `set_defaults(func=handler)`; a handler takes the parsed args and returns an exit code.
    import importlib

    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


# Modules that add subcommands (one line each).
EXTRA_COMMANDS: list[str] = [
    "tunelab.world.demo",
    "tunelab.data.check_cli",
    "tunelab.export",
    "tunelab.serve.cli",
    "tunelab.evaluate.cli",
]


def _rank() -> int | None:
    """This process's rank when a launcher (torchrun, accelerate launch) started several, else None."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rank = _rank()
    where = "" if rank is None else f" (rank {rank})"
    try:
        rest, overrides = _split_overrides(sys.argv[1:] if argv is None else list(argv))
        args, extra = parser.parse_known_args(rest)
        if args.command in ("train", "pretrain"):
            return cmd_train(args, overrides + extra, "sft" if args.command == "train" else "pretrain")
        if extra or (overrides and args.command not in _TAKES_OVERRIDES):
            parser.error(f"unrecognized arguments: {' '.join(overrides + extra)}")
        args.overrides = overrides
        if args.command == "generate":
            return cmd_generate(args)
        return int(args.func(args) or 0)
    except TunelabError as e:
        print(f"error{where}: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        if rank is not None:
            from tunelab.training.distributed import exit_failed

            exit_failed(e, 2)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    except Exception as e:
        if rank is None:
            raise
        # Several processes: name the rank and exit now, so the launcher stops the others at once
        # (they would otherwise wait for this rank in their next collective).
        from tunelab.training.distributed import report_failure

        report_failure(e, rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
