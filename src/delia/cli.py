"""`delia VERB CONFIG.yaml [--set key=value ...]`: one verb per stage, and `run` for the chain."""

from __future__ import annotations

import argparse
import os
import sys

from . import DeliaError, __version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delia", description="DELIA: diversity-enhanced instruction tuning.")
    p.add_argument("--version", action="version", version=f"delia {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str, arm: bool = False):
        v = sub.add_parser(name, help=help)
        v.add_argument("config", help="YAML config (see configs/)")
        v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.learning_rate=1e-3 (repeatable)")
        if arm:
            v.add_argument("--arm", required=True, help="untouched, common, delia or common_equal_steps")
        return v

    verb("run", "run the whole chain and print the report")
    verb("task", "build the task's training and evaluation rows")
    verb("sample", "self-sample diverse rows with the target model")
    verb("mix", "mix task rows with diverse rows")
    verb("train", "LoRA fine-tune one arm", arm=True)
    verb("evaluate", "evaluate one arm", arm=True)
    verb("report", "write report.md and report.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from . import pipeline
        from .config import load_config

        cfg = load_config(args.config, args.set)
        if args.verb == "run":
            path = pipeline.run_all(cfg)
            print(f"\n{path.read_text()}\nreport: {path}")
        elif args.verb == "report":
            path = pipeline.stage_report(cfg)
            print(path.read_text())
        elif args.verb in ("train", "evaluate"):
            getattr(pipeline, f"stage_{args.verb}")(cfg, args.arm)
        else:
            getattr(pipeline, f"stage_{args.verb}")(cfg)
    except DeliaError as e:
        print(f"delia: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("delia: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
