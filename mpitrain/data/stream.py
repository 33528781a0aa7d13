"""What every per-rank reader shares (rows, graphs, tokens): the open check, ``batches``'
argument checks, ``with`` support. A reader sets ``closed`` and ``steps_per_epoch`` and
implements ``_stream(epoch, start)`` and ``close()``.
"""

from __future__ import annotations


class StreamReader:
    closed = False
    steps_per_epoch = 0

    def _check_open(self):
        if self.closed:
            raise ValueError("reader is closed")

    def batches(self, epoch: int, start: int = 0):
        """Yield exactly ``steps_per_epoch - start`` batches of ``epoch``.

        Deterministic for (seed, epoch, rank, size); ``start`` skips the first ``start``
        batches without reading them (resume at any step).
        """
        self._check_open()
        epoch, start = int(epoch), int(start)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"start={start} is outside 0..{self.steps_per_epoch} (steps_per_epoch)")
        return self._stream(epoch, start)

    def _stream(self, epoch: int, start: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
