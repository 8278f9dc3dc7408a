"""`delia VERB CONFIG.yaml [--set key=value ...]`: one verb per stage, and `run` for the chain."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import DeliaError


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line (and status 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"delia: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="delia", description="DELIA: diversity-enhanced instruction tuning.")
    p.add_argument("--version", action="version", version=f"delia {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, arm: bool = False):
        v = sub.add_parser(name, help=help)
        v.add_argument("config", help="YAML config (see configs/)")
        v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
        if arm:
            v.add_argument("--arm", required=True, help="an arm: untouched, common, delia, common_equal_steps, a baseline (see `arms` in the config)")
        return v

    verb("run", "run the whole chain and print the report")
    verb("config", "print the resolved config, every default filled in, as YAML that `delia run` accepts back")
    verb("task", "build the task's training and evaluation rows")
    verb("diversify", "paraphrase the task's instruction wordings (word-level diversity)")
    verb("sample", "self-sample diverse rows with the target model")
    verb("mix", "mix task rows with diverse rows")
    verb("general", "hold out general queries and answer them with the untouched model (for drift and leakage)")
    verb("train", "LoRA fine-tune one arm", arm=True)
    verb("evaluate", "evaluate one arm", arm=True)
    verb("analyze", "token-to-meaning distances of the new token per block, and the divergent token, with plots")
    verb("report", "write report.md and report.json")
    verb("sweep", "task loss on seen and held-out wordings for each diverse ratio in sweep.ratios (1 epoch each)")
    verb("tune-ratio", "find a good diverse ratio by successive halving on the held-out-wording loss")
    v = verb("diagnose", "the buffering diagnostic: task-gradient direction and size with and without diverse rows")
    v.add_argument("--arm", default="untouched", help="weights to measure at (default: the untouched model)")
    verb("export", "merge an arm's adapter into a plain model folder (for vLLM, TGI, llama.cpp)", arm=True)
    d = sub.add_parser("data", help="build a data set: en-is (English-Icelandic pairs and a dictionary from Debian packages)")
    d.add_argument("dataset", choices=["en-is"])
    d.add_argument("--out", default="data/en-is", help="output folder (default: data/en-is)")
    d.add_argument("--deb-dir", default=None, help="where the .deb files are or go (default: OUT/debs)")
    d.add_argument("--dev", type=int, default=200)
    d.add_argument("--test", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("experiment", help="many runs (baselines, ablations, seeds) and one report; resumes")
    e.add_argument("experiment", help="experiment YAML (see experiments/)")
    e.add_argument("--report-only", action="store_true",
                   help="run nothing: report the runs that have finished so far (and name the others)")
    v = verb("serve", "an OpenAI-compatible chat server over the model (and an adapter)")
    v.add_argument("--adapter", help="adapter folder, e.g. runs/demo/train/delia/adapter")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--name", default="", help="model name the server answers to (default: model.name)")
    v.add_argument("--faults", type=float, default=0.0, help="share of requests to fail on purpose (testing)")
    v.add_argument("--api-key-env", default="", help="require the key held by this environment variable")
    v.add_argument("--max-tokens", type=int, default=1024, help="the most new tokens a request may ask for (default 1024)")
    for command in sub.choices.values():
        command.add_argument("--wait", action="store_true",
                             help="a stage another process is running is waited for (default: refused in one line)")
        loud = command.add_mutually_exclusive_group()
        loud.add_argument("--quiet", action="store_true",
                          help="no progress bars, per-step training logs or library messages: delia's own lines only")
        loud.add_argument("--verbose", action="store_true",
                          help="also the libraries' warnings and info messages that delia hides by default")
    return p


LIBRARY_NOTICES = (r"`is_gradient_checkpointing` is deprecated",  # peft and the Trainer ask under the old name
                   r"Setting `save_embedding_layers` to `True`",  # peft, on the Trainer's checkpoints (not the adapter)
                   r"'pin_memory' argument is set as true but no accelerator")
"""Warnings about the libraries' own calls: nothing a delia user can act on (shown with --verbose)."""


def loudness(quiet: bool, verbose: bool) -> None:
    """How much the libraries say: `--quiet` silences progress bars and their logs, the default hides
    the notices in LIBRARY_NOTICES, `--verbose` shows everything, info messages included."""
    import warnings

    if not verbose:
        for message in LIBRARY_NOTICES:
            warnings.filterwarnings("ignore", message=message)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it: every bar, delia's and the libraries'
        os.environ["DELIA_QUIET"] = "1"   # the Trainer's per-step logs (delia.train.sft)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
    elif verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")


def one_line(message: str) -> str:
    """An error message as one printable line: line breaks and control characters (which a user's
    --set value or a file name may hold) are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _run(cfg, args) -> None:
    path = _pipeline().run_all(cfg)
    print(f"\n{path.read_text()}\nreport: {path}")


def _report(cfg, args) -> None:
    print(_pipeline().stage_report(cfg).read_text())


def _check_address(host: str, port: int) -> None:
    """A bad --host or --port is one line before the model loads."""
    import socket

    if not 0 <= port <= 65535:
        raise DeliaError(f"--port {port}: must be from 0 to 65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except (OSError, UnicodeError) as e:
        raise DeliaError(f"--host {host} --port {port}: cannot listen there: {getattr(e, 'strerror', None) or e}") from None


def _serve(cfg, args) -> None:
    from pathlib import Path

    from .model.adapter import TOKENS_FILE
    from .model.loading import load_model, model_source
    from .serve import serve

    _check_address(args.host, args.port)
    if args.max_tokens < 1:
        raise DeliaError(f"--max-tokens {args.max_tokens}: must be >= 1")
    if not 0 <= args.faults <= 1:  # also refuses nan
        raise DeliaError(f"--faults {args.faults}: a share of requests, from 0 to 1")
    if args.adapter and not all((Path(args.adapter) / name).is_file() for name in ("adapter_config.json", TOKENS_FILE)):
        raise DeliaError(f"--adapter {args.adapter}: not a trained arm's adapter folder (it holds adapter_config.json "
                         f"and {TOKENS_FILE}; e.g. runs/demo/train/delia/adapter)")
    key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    if args.api_key_env and not key:
        raise DeliaError(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    model, tokenizer = load_model(model_source(cfg.model), cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.device)
    if args.adapter:
        from .model.adapter import load_adapter

        model, tokenizer = load_adapter(model, tokenizer, args.adapter)
    serve(model, tokenizer, args.name or cfg.model.name, args.host, args.port, args.faults, key, args.max_tokens)


def _pipeline():
    from . import pipeline  # imported when a verb runs: `delia --help` needs no torch

    return pipeline


def _sweep(cfg, args) -> None:
    from .studies import stage_sweep

    print(f"delia: plot {stage_sweep(cfg)}")


def _tune_ratio(cfg, args) -> None:
    from .studies import stage_tune_ratio

    stage_tune_ratio(cfg)


def _diagnose(cfg, args) -> None:
    from .studies import stage_diagnose

    stage_diagnose(cfg, args.arm)


def _export(cfg, args) -> None:
    print(f"delia: exported to {_pipeline().stage_export(cfg, args.arm)}")


def _config(cfg, args) -> None:
    import yaml

    from .config import config_dict

    print(yaml.safe_dump(config_dict(cfg), sort_keys=False, allow_unicode=True), end="")


VERBS = {
    "run": _run,
    "config": _config,
    "task": lambda cfg, args: _pipeline().stage_task(cfg),
    "diversify": lambda cfg, args: _pipeline().stage_diversify(cfg),
    "sample": lambda cfg, args: _pipeline().stage_sample(cfg),
    "mix": lambda cfg, args: _pipeline().stage_mix(cfg),
    "general": lambda cfg, args: _pipeline().stage_general(cfg),
    "train": lambda cfg, args: _pipeline().stage_train(cfg, args.arm),
    "evaluate": lambda cfg, args: _pipeline().stage_evaluate(cfg, args.arm),
    "analyze": lambda cfg, args: _pipeline().stage_analyze(cfg),
    "report": _report,
    "sweep": _sweep,
    "tune-ratio": _tune_ratio,
    "diagnose": _diagnose,
    "export": _export,
    "serve": _serve,
}
"""What each verb that takes a config does (`data` and `experiment` take other arguments)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loudness(args.quiet, args.verbose)
    try:
        from . import runfolder
        from .config import load_config
        from .runfolder import world

        runfolder.WAIT = args.wait

        if args.verb == "data":
            from pathlib import Path

            from .data import en_is

            out = en_is.build(Path(args.out), deb_dir=Path(args.deb_dir) if args.deb_dir else None,
                              dev=args.dev, test=args.test, seed=args.seed)
            print(f"delia: en-is: {out['pairs']} pairs ({', '.join(f'{k} {v}' for k, v in out['sizes'].items())}), "
                  f"{out['dictionary_headwords']} dictionary headwords in {args.out}")
            return 0
        if args.verb == "experiment":
            from .experiment import run_experiment

            path = run_experiment(args.experiment, report_only=args.report_only)
            print(f"\n{path.read_text()}\nreport: {path}")
            return 0
        cfg = load_config(args.config, args.set)
        if world()[1] > 1 and args.verb != "train":
            raise DeliaError(f"`delia {args.verb}` runs as one process; only `delia train` runs under "
                             "accelerate launch (run the other stages without it)")
        VERBS[args.verb](cfg, args)
    except DeliaError as e:
        print(f"delia: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("delia: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
