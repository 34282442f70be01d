"""Shared pieces of the CLI: option decorators, error handling, console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from clipprior._device import DEVICE_NAMES, DTYPE_NAMES
from clipprior.config import DEFAULT_MODEL, list_presets
from clipprior.errors import ClipPriorError

__all__ = [
    "CONTEXT_SETTINGS",
    "Command",
    "Group",
    "command",
    "console",
    "dataset_option",
    "debug_option",
    "device_option",
    "dtype_option",
    "err_console",
    "fold_option",
    "group",
    "handle_errors",
    "keep_examples",
    "model_option",
    "preset_option",
]

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


# ------------------------------------------------------------------------------------ commands, help


def keep_examples(text: str) -> str:
    r"""Turn the ``\b`` lines of a raw docstring into Click's no-rewrap marker (the ``\x08`` character).

    Command docstrings are raw strings (pydocstyle D301) holding a backslash and a ``b`` before
    each example block; without the real marker Click rewraps the examples into one paragraph.

    Example:
        >>> keep_examples("Examples:\n\\b\n  clipprior demo\n") == "Examples:\n\b\n  clipprior demo\n"
        True
    """
    return text.replace("\\b\n", "\b\n")


class Command(click.Command):
    """A clipprior command: ``-h``/``--help`` and example blocks kept unwrapped (:func:`keep_examples`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = keep_examples(self.help)


class Group(click.Group):
    """A clipprior command group: like :class:`Command`; its subcommands are :class:`Command` too."""

    command_class = Command

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**CONTEXT_SETTINGS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = keep_examples(self.help)


Group.group_class = Group


def command(name: str | None = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Command]:
    """``click.command`` with :class:`Command` (the one way commands are declared)."""
    return click.command(name, cls=Command, **kwargs)


def group(name: str | None = None, **kwargs: Any) -> Callable[[Callable[..., Any]], Group]:
    """``click.group`` with :class:`Group`."""
    return click.group(name, cls=Group, **kwargs)


# ----------------------------------------------------------------------------------- shared options


class _DatasetType(click.ParamType):
    """A registered benchmark, by name or alias; converts to the canonical name (choices read lazily)."""

    name = "dataset"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from clipprior.data.specs import dataset_names

        return "[" + "|".join(dataset_names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from clipprior.data.specs import get_dataset

        try:
            return get_dataset(value).name
        except ClipPriorError as err:
            self.fail(str(err), param, ctx)


class _FoldType(click.ParamType):
    """A fold number of some registered benchmark (each dataset checks its own range again)."""

    name = "fold"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"0-{_max_fold()}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            fold = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a fold number", param, ctx)
        if not 0 <= fold <= _max_fold():
            self.fail(f"{fold} is not in the range 0<=x<={_max_fold()}", param, ctx)
        return fold


def _max_fold() -> int:
    from clipprior.data.specs import all_datasets

    return max(spec.n_folds for spec in all_datasets()) - 1


def dataset_option(*, required: bool = True, default: str | None = None, help: str = "Benchmark.",
                   ) -> Callable[[F], F]:
    """``--dataset``: a registered benchmark (:func:`clipprior.data.dataset_names`), aliases accepted."""
    return click.option("--dataset", type=_DatasetType(), required=required, default=default,
                        show_default=default is not None, help=help)


def fold_option(*, required: bool = True, default: int | None = None, help: str = "Fold number.",
                ) -> Callable[[F], F]:
    """``--fold``: a fold of the benchmark (0-3 for the built-in ones)."""
    return click.option("--fold", type=_FoldType(), required=required, default=default,
                        show_default=default is not None, help=help)


def preset_option(*, default: str = "default", help: str = "Prior config preset (see clipprior.config).",
                  ) -> Callable[[F], F]:
    """``--preset``: one of :func:`clipprior.config.list_presets`."""
    return click.option("--preset", type=click.Choice(list_presets()), default=default, show_default=True,
                        help=help)


def model_option(*, default: str | None = DEFAULT_MODEL,
                 help: str = "HuggingFace hub id, local CLIPModel directory, or OpenAI checkpoint "
                             "(.pt / .safetensors).") -> Callable[[F], F]:
    """``--model``: hub id, local HF directory or OpenAI checkpoint."""
    return click.option("--model", "model", default=default, show_default=default is not None, metavar="ID|PATH",
                        help=help)


def device_option(*, help: str = "Device: " + ", ".join(DEVICE_NAMES) + ".") -> Callable[[F], F]:
    """``--device``: see :data:`clipprior._device.DEVICE_NAMES`."""
    return click.option("--device", default="auto", show_default=True, help=help)


def dtype_option(*, help: str = "Model dtype (Grad-CAM and PIR arithmetic stay float32).") -> Callable[[F], F]:
    """``--dtype``: one of :data:`clipprior._device.DTYPE_NAMES`."""
    return click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=DTYPE_NAMES[0], show_default=True,
                        help=help)


def debug_option(func: F) -> F:
    """``--debug``: show the full traceback instead of one clean line."""
    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(func)


def handle_errors(func: F) -> F:
    """Turn library errors into one clean line and exit code 1 (full traceback with ``--debug``).

    The wrapped command must take a ``debug`` keyword argument (see :func:`debug_option`).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug", False))
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ClipPriorError, OSError, ValueError, KeyError) as err:
            if debug:
                raise
            name = type(err).__name__
            message = str(err) if not isinstance(err, KeyError) else str(err.args[0] if err.args else err)
            err_console.print(f"[bold red]Error:[/] {message} [dim]({name}; rerun with --debug for a traceback)[/]",
                              highlight=False, soft_wrap=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    """Items per second of a progress task (blank until measurable)."""

    def render(self, task: Task) -> Text:
        """Render the task's speed."""
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.2f}/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, *, quiet: bool = False, transient: bool = False
                 ) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar (count, rate, elapsed, ETA) on stderr, driven by ``update(done, total)``.

    Args:
        description: Label of the bar.
        quiet: Draw nothing (e.g. when the command prints JSON).
        transient: Remove the bar when done.

    Example:
        >>> with progress_bar("reading", quiet=True) as update:
        ...     update(1, 2)
    """
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=transient, disable=quiet) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
