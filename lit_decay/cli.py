"""``lit-decay inspect MODULE:NAME``: print a model's grouping table without training it.

NAME is a class or a function returning a module (how Hugging Face models are built from a config), called with the
keyword arguments of ``--init-args``. The defaults are ``configure_adam``'s.

Errors a user can make on the command line (a path or name that does not exist, bad JSON, a bad option, a
constructor that needs arguments) end with exit code 2 and one line on stderr, never a traceback; so does the user's
own code failing on the way (a module that raises on import, a constructor or ``no_weight_decay()`` that raises, or
calls ``sys.exit``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from torch import nn

from lit_decay.grouping import explain
from lit_decay.modes import MODES


class _UsageError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line on stderr like ours (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lit-decay: error: {message}\n")


# configure_adam's learning rate, for --layer-decay without --lr (a layer's lr is a fraction of a base lr).
_DEFAULT_LR = 1e-3


def _load_builder(target: str) -> Any:
    """The class or function ``MODULE:NAME`` names."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"expected MODULE:NAME, a class or a function (e.g. examples.models:TinyGPT); got {target!r}")
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
    if isinstance(value, type(sys)) or not callable(value):
        raise _UsageError(f"{target!r} is a {type(value).__name__}, not a class or a function returning a module")
    return value


def _check_arguments(builder: Any, name: str, init_args: dict[str, Any]) -> None:
    """Refuse, before calling it, a constructor that needs arguments --init-args does not give, saying how to."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # some builtins have none: calling them says what is wrong
        return
    try:
        signature.bind(**init_args)
    except TypeError:
        missing = [
            parameter.name
            for parameter in signature.parameters.values()
            if parameter.default is inspect.Parameter.empty
            and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            and parameter.name not in init_args
        ]
        if not missing:
            return  # an unknown or positional-only argument: calling it says which
        given = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in init_args.items()]
        example = "{" + ", ".join(given + [f'"{key}": ...' for key in missing]) + "}"
        raise _UsageError(
            f"{name} needs argument(s) {', '.join(missing)}: give them with --init-args JSON, e.g. --init-args "
            f"'{example}'; for one JSON cannot write (a config object), inspect a function that builds the model"
        ) from None


def _describe(error: BaseException) -> str:
    """``SyntaxError: invalid syntax (models.py, line 3)``, in one line."""
    if isinstance(error, SystemExit):
        return f"SystemExit({error.code!r})"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lit-decay", description="Adam parameter grouping for PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_command = commands.add_parser(
        "inspect",
        help="print a model's grouping table without training it",
        description="Build MODULE:NAME (a class, or a function returning a module) and print which parameters "
        "lit_decay decays, and why. The defaults are configure_adam's.",
    )
    inspect_command.add_argument(
        "target", metavar="MODULE:NAME", help="a class or a function returning a module, e.g. examples.models:TinyGPT"
    )
    inspect_command.add_argument(
        "--init-args",
        default="{}",
        metavar="JSON",
        help="keyword arguments of the class or function, e.g. '{\"n_layer\": 4}'",
    )
    inspect_command.add_argument(
        "--weight-decay", type=float, default=0.01, metavar="F", help="coefficient of the decay group (default: 0.01)"
    )
    inspect_command.add_argument("--mode", default="decoupled", choices=MODES, help="decay mode (default: decoupled)")
    inspect_command.add_argument(
        "--lr", type=float, default=None, metavar="F", help="base learning rate: also show each group's lr and τ"
    )
    inspect_command.add_argument(
        "--layer-decay",
        type=float,
        default=None,
        metavar="F",
        help=f"layer-wise lr decay in (0, 1], as timm's layer_decay (base lr: --lr, else {_DEFAULT_LR:g})",
    )
    inspect_command.add_argument("--exclude-embeddings", action="store_true", help="keep embedding tables out of decay")
    inspect_command.add_argument(
        "--decay-1d", action="store_true", help="decay other ndim<=1 parameters too (exclude_1d=False)"
    )
    inspect_command.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _inspect(args: argparse.Namespace) -> str:
    try:
        init_args = json.loads(args.init_args)
    except json.JSONDecodeError as error:
        raise _UsageError(f"--init-args is not valid JSON ({error}): {args.init_args!r}") from None
    if not isinstance(init_args, dict):
        raise _UsageError(f"--init-args must be a JSON object of keyword arguments; got {args.init_args!r}")
    builder = _load_builder(args.target)
    name = getattr(builder, "__name__", args.target)
    _check_arguments(builder, name, init_args)
    try:
        model = builder(**init_args)
    except (Exception, SystemExit) as error:  # the user's constructor may raise anything; report it, not a traceback
        raise _UsageError(f"cannot build {name}(**{init_args!r}): {_describe(error)}") from None
    if not isinstance(model, nn.Module):
        raise _UsageError(f"{name}(**{init_args!r}) returned a {type(model).__name__}, not a torch.nn.Module")
    lr = _DEFAULT_LR if args.lr is None and args.layer_decay is not None else args.lr
    try:
        report = explain(
            model,
            weight_decay=args.weight_decay,
            mode=args.mode,
            exclude_embeddings=args.exclude_embeddings,
            exclude_1d=not args.decay_1d,
            lr=lr,
            layer_decay=args.layer_decay,
        )
    except (TypeError, ValueError) as error:
        raise _UsageError(" ".join(str(error).split())) from None
    except (Exception, SystemExit) as error:  # the model's own no_weight_decay() runs here
        raise _UsageError(f"cannot group the parameters of {type(model).__name__}: {_describe(error)}") from None
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
