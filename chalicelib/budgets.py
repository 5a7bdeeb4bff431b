"""How much decoding a request, and the whole process, may do at once.

A small file can declare a 40-megapixel picture, and decoding one takes its
full frame in memory (up to 160 MB; see ``imaging.decoding_bytes``). Eight of
them in a batch, decoded side by side, would take more memory than the
function has, and each out-of-memory kill costs a cold start. So two limits
hold, both checked from headers before any pixel is decoded:

- ``MemoryBudget``: the bytes all decodes in this process may hold at once
  (``MAX_DECODE_BYTES``). A decode waits for its share; small images still
  decode side by side, large ones take turns. A wait always ends, because
  every decode is bounded by the pixel caps.
- ``PixelAllowance``: the pixels one request may decode in all
  (``MAX_REQUEST_PIXELS``), which bounds its decoding time. Items are counted
  in input order, so which item of a batch is refused does not depend on
  which image host answered first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from chalicelib.errors import ImageTooLarge


class MemoryBudget:
    def __init__(self, capacity: int) -> None:
        _map_large_allocations_separately()
        self.capacity = capacity
        self._in_use = 0
        self._condition = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._condition:
            return self._in_use

    @contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        """Hold ``amount`` bytes for the block; wait while others hold too much to fit beside them."""
        if amount > self.capacity:
            raise ImageTooLarge(
                f"Decoding this image takes {amount / 2**20:,.0f} MiB; at most {self.capacity / 2**20:,.0f} "
                "MiB may be used for decoding (MAX_DECODE_BYTES)."
            )
        with self._condition:
            self._condition.wait_for(lambda: self._in_use + amount <= self.capacity)
            self._in_use += amount
        try:
            yield
        finally:
            with self._condition:
                self._in_use -= amount
                self._condition.notify_all()


class PixelAllowance:
    """The pixels one request may still decode."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._spent = 0

    def spend(self, pixels: int) -> None:
        if self._spent + pixels > self.limit:
            raise ImageTooLarge(
                f"This image's {pixels:,} pixels would take the request past {self.limit:,} pixels in all "
                f"(MAX_REQUEST_PIXELS; {self._spent:,} are taken by the images before it); send fewer or "
                "smaller images."
            )
        self._spent += pixels


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "mallopt") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1024 * 1024
_allocator_configured = threading.Event()


def _map_large_allocations_separately() -> None:
    """Give every allocation of a megabyte or more its own mapping, returned to the OS when freed.

    glibc otherwise raises its mmap threshold to the size of the last large
    block freed (up to 32 MB), and from then on serves Pillow's 16 MB image
    blocks from per-thread arenas, which keep freed memory for the thread
    that freed it: decodes taking turns on different threads then hold many
    frames' worth of memory though only a few are live, and the budget's
    count stops being the truth. A fixed threshold also turns off that
    adjustment. It is a no-op where the C library is not glibc.
    """
    if _allocator_configured.is_set():
        return
    library = _glibc()
    if library is not None:
        library.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    _allocator_configured.set()
