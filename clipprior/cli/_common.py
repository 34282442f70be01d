"""Shared pieces of the CLI: option decorators, error handling, console."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from clipprior._device import DEVICE_NAMES, DTYPE_NAMES
from clipprior.config import DEFAULT_MODEL, list_presets
from clipprior.errors import ClipPriorError, InvalidInputError

__all__ = [
    "CONTEXT_SETTINGS",
    "PROGRESS_INTERVAL_ENV",
    "Command",
    "Group",
    "ProgressDisplay",
    "clip_options",
    "cmap_option",
    "coco_split_option",
    "command",
    "console",
    "data_root_option",
    "dataset_option",
    "dataset_options",
    "debug_option",
    "device_option",
    "dtype_option",
    "err_console",
    "fold_option",
    "folds_option",
    "group",
    "handle_errors",
    "keep_examples",
    "list_root_option",
    "model_option",
    "n_episodes_option",
    "on_error_option",
    "parse_folds",
    "preset_option",
    "progress_bar",
    "seed_option",
    "shot_option",
    "split_option",
    "threshold_option",
    "tile_height_option",
    "writing",
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


def coco_split_option(*, help: str = "COCO-20i folds: 4k+f+1 (interleaved) or 20f+1..20f+20 (contiguous).",
                      ) -> Callable[[F], F]:
    """``--coco-split``: the fold-rule variant (:data:`clipprior.data.specs.FOLD_SPLITS`)."""
    from clipprior.data.specs import FOLD_SPLITS

    return click.option("--coco-split", type=click.Choice(FOLD_SPLITS), default=FOLD_SPLITS[0], show_default=True,
                        help=help)


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


def dataset_options() -> Callable[[F], F]:
    """``--dataset``, ``--data-root`` (required) and ``--coco-split``: where a command reads a benchmark from."""

    def decorate(func: F) -> F:
        return dataset_option()(data_root_option(required=True)(coco_split_option()(func)))

    return decorate


def clip_options(*, model_default: str | None = DEFAULT_MODEL, model_help: str | None = None,
                 ) -> Callable[[F], F]:
    """``--model``, ``--device`` and ``--dtype`` together: what every command that loads CLIP takes."""
    model = model_option(default=model_default) if model_help is None else model_option(default=model_default,
                                                                                          help=model_help)

    def decorate(func: F) -> F:
        return model(device_option()(dtype_option()(func)))

    return decorate


def _root_help() -> str:
    """What a data root is, for each registered benchmark (its :attr:`~clipprior.data.DatasetSpec.root_help`)."""
    from clipprior.data.specs import all_datasets

    return " or ".join(spec.root_help for spec in all_datasets() if spec.root_help) + "."


def data_root_option(*, required: bool = False, help: str | None = None) -> Callable[[F], F]:
    """``--data-root``: the dataset folder (a directory; each command says what it reads there).

    The default help names each registered benchmark's root folder (:func:`_root_help`).
    """
    return click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), required=required,
                        default=None, help=_root_help() if help is None else help)


def split_option(*, default: str | tuple[str, ...] = "val", multiple: bool = False,
                 help: str = "val: novel classes (test episodes); train: base classes.") -> Callable[[F], F]:
    """``--split``: one of :data:`clipprior.data.classes.SPLITS` (repeatable with ``multiple``: ``splits``)."""
    from clipprior.data.classes import SPLITS

    return click.option("--split", "splits" if multiple else "split", type=click.Choice(SPLITS), multiple=multiple,
                        default=default, show_default=True, help=help)


def on_error_option(*, help: str = "Stop at broken data, or skip it and report.") -> Callable[[F], F]:
    """``--on-error``: one of :data:`clipprior.data.report.ON_ERROR_CHOICES` (default: raise)."""
    from clipprior.data.report import ON_ERROR_CHOICES

    return click.option("--on-error", type=click.Choice(ON_ERROR_CHOICES), default=ON_ERROR_CHOICES[0],
                        show_default=True, help=help)


def list_root_option(*, help: str = "Folder of the trainers' list files [default: build the lists from the masks].",
                     ) -> Callable[[F], F]:
    """``--list-root``: an existing folder of FSS list files."""
    return click.option("--list-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                        help=help)


def folds_option(*, help: str = "Comma-separated folds.") -> Callable[[F], F]:
    """``--folds``: a comma-separated list of folds (:func:`parse_folds`; default: every fold of ``--dataset``)."""
    return click.option("--folds", default=None, show_default="every fold of the dataset", help=help)


def _and(values: Sequence[object]) -> str:
    """``[0, 1, 2]`` -> ``"0, 1 and 2"``."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def parse_folds(text: str | None, dataset: str) -> list[int]:
    """``--folds``: ``"0,2"`` -> ``[0, 2]``, sorted, each a fold of ``dataset``; ``None``: all its folds.

    Args:
        text: The option's value.
        dataset: A registered benchmark (its :attr:`~clipprior.data.DatasetSpec.n_folds`).

    Returns:
        The folds, ascending, without duplicates.

    Raises:
        InvalidInputError: for text that is not a comma-separated list of the dataset's folds.

    Example:
        >>> parse_folds("2,0,2", "pascal5i"), parse_folds(None, "coco20i")
        ([0, 2], [0, 1, 2, 3])
    """
    from clipprior.data.specs import get_dataset

    n_folds = get_dataset(dataset).n_folds
    if text is None:
        return list(range(n_folds))
    try:
        folds = sorted({int(f) for f in text.replace(" ", "").split(",") if f})
    except ValueError:
        example = ",".join(str(f) for f in range(n_folds))
        raise InvalidInputError(f"--folds {text!r} is not a comma-separated list of folds, e.g. {example}") from None
    if not folds or any(not 0 <= f < n_folds for f in folds):
        raise InvalidInputError(f"--folds {text!r}: folds are {_and(range(n_folds))}")
    return folds


def shot_option(*, help: str = "Supports per episode.") -> Callable[[F], F]:
    """``--shot``: K, at least 1."""
    return click.option("--shot", type=click.IntRange(1, None), default=1, show_default=True, help=help)


def _episodes_help() -> str:
    """The default episode counts of the registered benchmarks (PI-CLIP's, :func:`clipprior.data.default_episodes`)."""
    from clipprior.data.specs import all_datasets

    counts = ", ".join(f"{spec.title} {spec.trainer_episodes['pi-clip']}" for spec in all_datasets()
                       if "pi-clip" in spec.trainer_episodes)
    return f"Number of episodes [default: PI-CLIP's count: {counts}]."


def n_episodes_option(*, help: str | None = None) -> Callable[[F], F]:
    """``--episodes`` (a count, argument ``n_episodes``); the default help gives each benchmark's default count."""
    return click.option("--episodes", "n_episodes", type=click.IntRange(1, None), default=None,
                        help=_episodes_help() if help is None else help)


def seed_option(*, default: int = 321, help: str = "Sampler seed.") -> Callable[[F], F]:
    """``--seed``: an int (321: the FSS trainers' test seed)."""
    return click.option("--seed", type=int, default=default, show_default=True, help=help)


def threshold_option(*, help: str = "Prior >= threshold is foreground.") -> Callable[[F], F]:
    """``--threshold``: in [0, 1], default :data:`clipprior.evaluate.DEFAULT_FIXED_THRESHOLD`."""
    from clipprior.evaluate.metrics import DEFAULT_FIXED_THRESHOLD

    return click.option("--threshold", type=click.FloatRange(0, 1), default=DEFAULT_FIXED_THRESHOLD,
                        show_default=True, help=help)


def cmap_option(*, help: str = "Heat-map colormap.") -> Callable[[F], F]:
    """``--cmap``: one of :data:`clipprior.viz.COLORMAPS`."""
    from clipprior.viz import COLORMAPS

    return click.option("--cmap", type=click.Choice(sorted(COLORMAPS)), default="jet", show_default=True, help=help)


def tile_height_option(*, help: str = "Height of each picture in a panel, in pixels.") -> Callable[[F], F]:
    """``--tile-height``: 64 to 1024 pixels."""
    return click.option("--tile-height", type=click.IntRange(64, 1024), default=224, show_default=True, help=help)


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


PROGRESS_INTERVAL_ENV = "CLIPPRIOR_PROGRESS_INTERVAL"
"""Environment variable: seconds between plain progress lines when the output is not a terminal."""

DEFAULT_PROGRESS_INTERVAL = 10.0
MIN_RATE_SECONDS = 1.0
"""No rate is shown before a task has run this long (a resumed run's instant counts are not a rate)."""


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@dataclass
class _Task:
    label: str
    done: int = 0
    total: int | None = None
    start: float | None = None
    rich_id: TaskID | None = None

    def rate(self, now: float) -> float | None:
        if self.start is None or now - self.start < MIN_RATE_SECONDS or self.done <= 0:
            return None
        return self.done / (now - self.start)

    def line(self, now: float) -> str:
        total = "?" if self.total is None else f"{self.total:,}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.rate(now)
        speed = "" if rate is None else f", {rate:,.2f}/s"
        eta = ""
        if rate and self.total is not None:
            eta = f", ETA {_duration(max(self.total - self.done, 0) / rate)}"
        elapsed = _duration(now - self.start) if self.start is not None else "0:00:00"
        return f"{self.label}: {self.done:,}/{total}{pct}{speed}, {elapsed} elapsed{eta}"


@contextmanager
def writing(target: str | os.PathLike[str], option: str) -> Iterator[None]:
    """Turn an OS error while writing ``target`` into one clean line that names the path and the fix.

    Args:
        target: The file or folder being written.
        option: The option that chose it (``"--out"``), named in the fix.

    Raises:
        click.ClickException: for any :class:`OSError` inside the block (read-only, full or missing
            folder, a file where a folder should be).

    Example:
        >>> with writing("out.png", "--out"):  # doctest: +SKIP
        ...     panel.save("out.png")
    """
    try:
        yield
    except OSError as err:
        where = err.filename or target
        reason = (err.strerror or str(err)).lower()
        raise click.ClickException(f"cannot write {where}: {reason}; pass {option} with a writable location") from err


class _RateColumn(ProgressColumn):
    """Items per second of a task, blank during its first :data:`MIN_RATE_SECONDS`."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or elapsed < MIN_RATE_SECONDS or not task.completed:
            return Text("")
        return Text(f"{task.completed / elapsed:,.2f}/s", style="progress.data.speed")


class ProgressDisplay:
    """Counts of named tasks: rich bars on a terminal, plain lines at a steady interval otherwise.

    A task shows up at its first :meth:`update` (never as an empty "0/?" bar before an error).
    Without a terminal (a cluster job writing to a log), one line per started task is printed
    every ``interval`` seconds and once at the end. Calling the display as ``display(done, total)``
    updates its first task, so it can be passed as a library ``progress(done, total)`` callback.

    Args:
        tasks: Task labels, in display order (the keys of :meth:`update`).
        console: Where to draw.
        quiet: Draw nothing.
        transient: Remove the bars when done (terminal only).
        interval: Seconds between plain lines [default: ``$CLIPPRIOR_PROGRESS_INTERVAL`` or 10].
        clock: Monotonic time source (tests pass a fake one).
        terminal: Force (or refuse) the bars [default: whether ``console`` is a terminal].

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with ProgressDisplay(["images"], console=Console(file=out), interval=0) as show:
        ...     show.update("images", 1, 2)
        >>> out.getvalue().splitlines()[0]
        'images: 1/2 (50%), 0:00:00 elapsed'
    """

    def __init__(self, tasks: Sequence[str], *, console: Console, quiet: bool = False, transient: bool = False,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic,
                 terminal: bool | None = None) -> None:
        if not tasks:
            raise ValueError("a progress display needs at least one task")
        self.console, self.quiet, self.clock = console, quiet, clock
        self.tasks = {label: _Task(label) for label in tasks}
        self.first = next(iter(self.tasks))
        if interval is None:
            interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL))
        self.interval = interval
        self.terminal = console.is_terminal if terminal is None else terminal
        self._bars: Progress | None = None
        if not quiet and self.terminal:
            width = max(len(label) for label in tasks)
            self._bars = Progress(TextColumn(f"[bold]{{task.description:<{width}}}"), BarColumn(),
                                  MofNCompleteColumn(), _RateColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=console, transient=transient)
        self._last_lines: float | None = None
        self._changed = False

    def __enter__(self) -> ProgressDisplay:
        if self._bars is not None:
            self._bars.start()
        self._last_lines = self.clock()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._bars is not None:
            self._bars.stop()
        elif not self.quiet and exc_type is None and self._changed:
            self._print_lines(self.clock())

    def __call__(self, done: int, total: int | None = None) -> None:
        """Update the first task: ``done`` of ``total`` (a library ``progress(done, total)`` callback)."""
        self.update(self.first, done, total)

    def update(self, label: str, done: int | None = None, total: int | None = None, *, advance: int = 0) -> None:
        """Set a task's count (``done``) or add to it (``advance``), and its total if given."""
        task = self.tasks[label]
        now = self.clock()
        if task.start is None:
            task.start = now
        if done is not None:
            task.done = int(done)
        task.done += int(advance)
        if total is not None:
            task.total = int(total)
        self._changed = True
        if self._bars is not None:
            if task.rich_id is None:
                task.rich_id = self._bars.add_task(label, total=task.total)
            self._bars.update(task.rich_id, completed=task.done, total=task.total)
        elif not self.quiet and self._last_lines is not None and now - self._last_lines >= self.interval:
            self._print_lines(now)

    def advance(self, label: str, n: int = 1) -> None:
        """Add ``n`` to a task's count."""
        self.update(label, advance=n)

    def _print_lines(self, now: float) -> None:
        for task in self.tasks.values():
            if task.start is not None:
                self.console.print(Text(task.line(now)), soft_wrap=True, highlight=False)
        self._last_lines = now
        self._changed = False


@contextmanager
def progress_bar(description: str, *, quiet: bool = False, transient: bool = False, console: Console | None = None,
                 ) -> Iterator[ProgressDisplay]:
    """One-task :class:`ProgressDisplay` on stderr, driven by ``update(done, total)``.

    Args:
        description: Label of the task.
        quiet: Draw nothing (e.g. when the command prints JSON).
        transient: Remove the bar when done.
        console: Where to draw [default: stderr].

    Example:
        >>> with progress_bar("reading", quiet=True) as update:
        ...     update(1, 2)
    """
    with ProgressDisplay([description], console=console or err_console, quiet=quiet, transient=transient) as display:
        yield display
