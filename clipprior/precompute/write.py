"""Stage 5, write: finished priors off the device and into the cache writer, on a thread of their own.

The device thread hands each finished batch to :class:`WriteThread` as a task; the copies off a
CUDA device go to page-locked host memory without blocking (:func:`to_host`), and the thread
waits for them, converts and calls the cache writer, so HDF5 writes never stall the device. The
tasks run in the order they were handed over, which is the order of the serial engine: the writer
sees the same calls, commits the same segments (one per chunk), and a killed run resumes as before.
An error in the thread is raised in the device thread at its next hand-over (or at :meth:`close`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipprior.precompute.plan import PrecomputeStats, QueryWork, Writer

__all__ = ["HostTensor", "WriteThread", "to_host", "write_vtp"]


@dataclass
class HostTensor:
    """A tensor on its way to the host: :meth:`numpy` waits for the copy to finish.

    Attributes:
        tensor: The host tensor (page-locked when the copy came from a CUDA device).
        event: The CUDA event recorded after the copy, or ``None`` for a host tensor.
    """

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None

    def numpy(self) -> np.ndarray:
        """The values as a numpy array (after the copy has landed)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensor.numpy()


def to_host(values: torch.Tensor) -> HostTensor:
    """Start the copy of a device tensor to the host without waiting for it.

    On a CUDA device: a non-blocking copy into page-locked memory and an event to wait on; on
    the CPU: the tensor itself (detached).

    Example:
        >>> to_host(torch.ones(2)).numpy()
        array([1., 1.], dtype=float32)
    """
    values = values.detach()
    if values.device.type != "cuda":
        return HostTensor(values)
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(values.device))
    return HostTensor(host, event)


def write_vtp(writer: Writer, works: Sequence[QueryWork], sizes: Sequence[tuple[int, int]],
              pairs: Sequence[tuple[int, int]], cam: HostTensor, refined: HostTensor,
              stats: PrecomputeStats) -> None:
    """Write the images and the missing VTP pairs of a query batch: cam, refined (P, h, w)."""
    cams, refs = cam.numpy(), refined.numpy()
    for p, (b, c) in enumerate(pairs):
        work = works[b]
        if not writer.has_image(work.image):
            writer.add_image(work.image, *sizes[b])
        if not writer.has_vtp(work.image, c):
            writer.add_vtp(work.image, c, cams[p], refs[p])
            stats.vtp_written += 1


def write_vvp(writer: Writer, indices: Sequence[int], maps: Sequence[HostTensor]) -> None:
    """Write the VVP (L*K, h, w) of episodes."""
    for i, vvp in zip(indices, maps, strict=True):
        writer.add_vvp(i, vvp.numpy().astype(np.float32))


class WriteThread:
    """Runs write tasks in order on a thread of its own; errors come back to the caller.

    Args:
        depth: Most tasks waiting (bounds the host memory of finished priors not yet written).

    Example:
        >>> with WriteThread() as thread:  # doctest: +SKIP
        ...     thread.submit(lambda: writer.commit())
    """

    def __init__(self, depth: int = 64) -> None:
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clipprior-write", daemon=True)
        self._thread.start()

    def __enter__(self) -> WriteThread:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.close(raise_error=exc is None)

    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            if self._error is None:
                try:
                    task()
                except BaseException as exc:  # handed to the caller's thread, never lost
                    self._error = exc

    def check(self) -> None:
        """Raise the error of a failed task, if any."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _put(self, item: Callable[[], object] | None, check: bool) -> None:
        while True:
            if check:
                self.check()
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    def submit(self, task: Callable[[], object]) -> None:
        """Queue a task (blocks while ``depth`` tasks wait); raises the error of an earlier task."""
        self._put(task, check=True)

    def close(self, raise_error: bool = True) -> None:
        """Run every queued task, stop the thread; raise a task's error unless told not to."""
        if self._thread.is_alive():
            self._put(None, check=False)
            self._thread.join()
        if raise_error:
            self.check()
