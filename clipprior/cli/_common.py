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

from clipprior.errors import ClipPriorError

__all__ = [
    "console",
    "debug_option",
    "device_option",
    "dtype_option",
    "err_console",
    "handle_errors",
    "model_option",
]

F = TypeVar("F", bound=Callable[..., Any])

console = Console()
err_console = Console(stderr=True)


def debug_option(func: F) -> F:
    """``--debug``: show the full traceback instead of one clean line."""
    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(func)


def model_option(func: F) -> F:
    """``--model``: hub id, local HF directory or OpenAI checkpoint."""
    return click.option(
        "--model",
        "model",
        default="openai/clip-vit-base-patch16",
        show_default=True,
        metavar="ID|PATH",
        help="HuggingFace hub id, local CLIPModel directory, or OpenAI checkpoint (.pt / .safetensors).",
    )(func)


def device_option(func: F) -> F:
    """``--device``: auto, cpu, cuda or cuda:N."""
    return click.option(
        "--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."
    )(func)


def dtype_option(func: F) -> F:
    """``--dtype``: model dtype."""
    return click.option(
        "--dtype",
        type=click.Choice(["fp32", "fp16", "bf16"]),
        default="fp32",
        show_default=True,
        help="Model dtype (Grad-CAM and PIR arithmetic stay float32).",
    )(func)


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
