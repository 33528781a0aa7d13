"""Flat buffers whose memory can be handed back range by range (ZeRO-2's gradients, ZeRO-3's parameters).

    virtual:  | block L-1 | block L-2 | ... | block 0 | rest |     one anonymous mapping of n x itemsize
    resident:      ####                                           only the pages written since their
                                                                  last release(); the rest costs nothing

An anonymous ``mmap`` is reserved address space: a page takes memory when first written and gives
it back on ``release(lo, hi)`` (``madvise(MADV_DONTNEED)`` of the pages wholly inside the range;
they read as zeros afterwards). The model's views into the buffer stay valid, so a model writes and
reads its tensors as usual while a strategy decides which parts are resident. ``resident_bytes``
asks the kernel which of its pages are resident (``mincore``), not our own bookkeeping.
"""

from __future__ import annotations

import mmap

import numpy as np

PAGE = mmap.PAGESIZE
_HAVE_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


class Paged:
    """``array``: a zeroed 1-D array of ``n`` x ``dtype`` in its own mapping."""

    def __init__(self, n: int, dtype):
        dtype = np.dtype(dtype)
        self.nbytes = int(n) * dtype.itemsize
        self._mm = mmap.mmap(-1, max(self.nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (shared
        # anonymous memory would keep released pages in shmem: private pages are freed, read back as zeros)
        self.array = np.frombuffer(self._mm, dtype=dtype, count=int(n))
        self.addr = self.array.ctypes.data

    def release(self, lo: int, hi: int) -> None:
        """Give back the pages wholly inside elements ``[lo, hi)`` (their values become zeros)."""
        size = self.array.itemsize
        a = -(-lo * size // PAGE) * PAGE
        b = len(self._mm) if hi >= self.array.size else (hi * size // PAGE) * PAGE  # (the tail page: ours)
        if b > a and _HAVE_MADVISE:
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def release_all(self) -> None:
        self.release(0, self.array.size)

    def resident_bytes(self) -> int:
        """Bytes of this buffer in memory now (the kernel's count of its resident pages; -1 where unknown)."""
        return resident_bytes(self.addr, len(self._mm))


def resident_bytes(addr: int, length: int) -> int:
    """Resident bytes of the pages [addr, addr + length) (``mincore``, Linux and the BSDs; -1 elsewhere)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return -1
    pages = -(-length // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(length), vec) != 0:
        return -1
    return sum(v & 1 for v in vec) * PAGE


def allocator(keep: list):
    """An ``alloc(n, dtype)`` for models.grads_allocator / params_allocator: each buffer a ``Paged``,
    appended to ``keep`` (so its owner can release ranges of it)."""
    def alloc(n, dtype):
        buf = Paged(n, dtype)
        keep.append(buf)
        return buf.array
    return alloc
