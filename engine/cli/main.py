"""The `tas` command: parses the arguments and hands over to one module per command.

    tas                          open the panel
    tas --version                the installed version
    tas run STAGE... [--config F] [--run RUN] [--detach]
    tas status [RUN] [--all]
    tas logs RUN [STAGE] [-f] [--events]
    tas cancel RUN [--grace S]
    tas compare RUN RUN...
    tas note RUN [TEXT] [--name N] / tas rm RUN... [--archive] [--yes]
    tas gpu [--watch] [--interval S]
    tas chat [--target kd|ce|assistant|base] [--model NAME]
    tas export RUN [--target kd|ce|assistant] [--out DIR] [--push]
    tas plan [STAGE...] [--gpus 8x80GB]

Light: argparse + the run store; never imports the ML stack, so every command answers at once.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import cancel, chat, compare, eval_code, export, gpu, logs, manage, plan, run, status
from engine.cli.common import fail
from engine.config.errors import ConfigError
from engine.core.secrets import load_dotenv_secrets
from engine.pipeline.stages import UnknownStage
from engine.runner import launcher
from engine.store.lineage import ReuseRefused
from engine.store.runs import DEFAULT_CONFIG, RunIsLive, RunNotFound

COMMANDS = (run, status, logs, cancel, compare, manage, gpu, plan, chat, eval_code, export)


def package_version() -> str:
    """The installed tas-panel version; from pyproject.toml beside the code when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tas-panel")
    except PackageNotFoundError:
        pass
    try:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


class VersionAction(argparse.Action):
    """`--version`: the version is looked up only when asked for (every other command starts without it)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"tas {package_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tas", description="TAS Panel: Teacher → Assistant → Student distillation. No command opens the panel."
    )
    parser.add_argument("--config", default=None, help=f"config file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--version", action=VersionAction, help="print the version of TAS Panel and exit")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=f"config file (default: {DEFAULT_CONFIG})")
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def open_panel(config_path: str) -> int:
    from tui.app import main as panel_main  # Textual only when the panel is wanted

    return panel_main(config_path=config_path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = DEFAULT_CONFIG
    load_dotenv_secrets()  # the keys the workers read from .env, so that output can mask them too
    if args.command is None:
        return open_panel(args.config)
    try:
        return args.func(args)
    except (ConfigError, RunNotFound, UnknownStage, launcher.CannotStart, ReuseRefused, RunIsLive) as exc:
        return fail(str(exc))  # the user's input is wrong: say so, no traceback


if __name__ == "__main__":
    sys.exit(main())
