"""What every per-rank reader shares (rows, graphs, tokens): the open check, the argument checks
of ``batches`` and ``test_batches``, ``with`` support. A reader sets ``closed`` and
``steps_per_epoch`` and implements ``_stream(epoch, start)``, ``_test_stream(batch_size)`` and
``close()``.
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

    def test_batches(self, batch_size: int):
        """This rank's part of the test (val) split, in order; the last batch may be short."""
        self._check_open()
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return self._test_stream(batch_size)

    def _test_stream(self, batch_size: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _stream(self, epoch: int, start: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
