"""``lit-decay inspect MODULE:CLASS``: print a model's grouping table without training it.

Errors a user can make on the command line (a path or class that does not exist, bad JSON, a bad option) end with
exit code 2 and one line on stderr, never a traceback; so does the user's own code failing on the way (a module that
raises on import, a constructor or ``no_weight_decay()`` that raises, or calls ``sys.exit``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from lit_decay.grouping import explain
from lit_decay.modes import MODES


class _UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line on stderr like ours (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lit-decay: error: {message}\n")


def _load_class(target: str) -> type:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"expected MODULE:CLASS (e.g. examples.models:TinyGPT); got {target!r}")
    if module_name.startswith("."):
        raise _UsageError(
            f"MODULE must be an absolute module path, importable from the current directory (e.g. examples.models); "
            f"got the relative {module_name!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # so `lit-decay inspect mypackage.models:Net` works from a project root
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise _UsageError(f"cannot import module {module_name!r}: {error}") from None
    except (Exception, SystemExit) as error:  # the user's module runs on import and may raise anything
        raise _UsageError(f"cannot import module {module_name!r}: it raised {_describe(error)}") from None
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise _UsageError(f"module {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not isinstance(value, type):
        raise _UsageError(f"{target!r} is a {type(value).__name__}, not a class")
    return value


def _describe(error: BaseException) -> str:
    """``SyntaxError: invalid syntax (models.py, line 3)``, in one line."""
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r})"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lit-decay", description="Adam parameter grouping for PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="print a model's grouping table without training it",
        description="Instantiate MODULE:CLASS and print which parameters lit_decay decays, and why.",
    )
    inspect.add_argument("target", metavar="MODULE:CLASS", help="e.g. examples.models:TinyGPT")
    inspect.add_argument(
        "--init-args", default="{}", metavar="JSON", help="constructor keyword arguments, e.g. '{\"n_layer\": 4}'"
    )
    inspect.add_argument("--weight-decay", type=float, default=0.01, metavar="F", help="coefficient of the decay group")
    inspect.add_argument("--mode", default="decoupled", choices=MODES, help="decay mode (default: decoupled)")
    inspect.add_argument(
        "--lr", type=float, default=None, metavar="F", help="base learning rate: also show each group's lr and τ"
    )
    inspect.add_argument("--exclude-embeddings", action="store_true", help="keep embedding tables out of decay")
    inspect.add_argument(
        "--decay-1d", action="store_true", help="decay other ndim<=1 parameters too (exclude_1d=False)"
    )
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _inspect(args: argparse.Namespace) -> str:
    try:
        init_args = json.loads(args.init_args)
    except json.JSONDecodeError as error:
        raise _UsageError(f"--init-args is not valid JSON ({error}): {args.init_args!r}") from None
    if not isinstance(init_args, dict):
        raise _UsageError(f"--init-args must be a JSON object of keyword arguments; got {args.init_args!r}")
    cls = _load_class(args.target)
    try:
        model = cls(**init_args)
    except (Exception, SystemExit) as error:  # the user's constructor may raise anything; report it, not a traceback
        raise _UsageError(f"cannot build {cls.__name__}(**{init_args!r}): {_describe(error)}") from None
    try:
        report = explain(
            model,
            weight_decay=args.weight_decay,
            mode=args.mode,
            exclude_embeddings=args.exclude_embeddings,
            exclude_1d=not args.decay_1d,
            lr=args.lr,
        )
    except (TypeError, ValueError) as error:
        raise _UsageError(" ".join(str(error).split())) from None
    except (Exception, SystemExit) as error:  # the model's own no_weight_decay() runs here
        raise _UsageError(f"cannot group the parameters of {cls.__name__}: {_describe(error)}") from None
    return json.dumps(report.to_dict(), indent=2) if args.json else str(report)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lit-decay`` command.

    Examples:
        >>> main(["inspect", "torch.nn:Linear", "--init-args", '{"in_features": 2, "out_features": 3}'])
        Linear: 2 trainable tensors (9 elements), 0 frozen (0 elements)
          group     mode       coefficient  lr_scale  tensors  elements
          decay     decoupled  0.01                         1         6
          no_decay  none       0                            1         3
        <BLANKLINE>
        name    shape   numel  group     reason
        weight  (3, 2)      6  decay     ndim=2 weight
        bias    (3,)        3  no_decay  bias
        0
    """
    args = _parser().parse_args(argv)
    try:
        print(_inspect(args))
    except _UsageError as error:
        print(f"lit-decay: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `lit-decay inspect ... | head` closed the pipe: stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
