"""A range of memory reserved whole and backed page by page: the storage of a paged batch cache.

A batch cache of R rows x S slots is laid out as one range, but a running request needs memory
only for the slots it uses. `DevicePages` reserves the range's addresses with CUDA's virtual
memory calls (`cuMemAddressReserve`) and maps one shared page at every page of it, so that every
address is valid from the start. `back` gives pages memory of their own (physical pages of
`page` bytes, 2 MB on Hopper, kept in a pool), `release` maps the shared page there again. The
range's address never changes, so kernels and captured CUDA graphs read it as they read any
tensor; what a page holds follows its mapping. A read of a released page returns what the shared
page holds (whatever was last written there), never a fault.

`HostPages` is the same interface over an ordinary tensor, for the CPU and for tests: a released
page is filled with a poison value, so that a computation that reads a slot nobody backed shows it.

Mapping is not ordered with the work on a stream, so no work in flight may touch a page while it
is remapped. A page released while the GPU may still read it (a decode step in flight) stays
mapped until `release`'s event has completed, and `back` gives such pages back (waiting on the
oldest only when no page is free otherwise). `back` is called with the GPU idle on the range
(`batching._Batch.hold` synchronizes first).

Measured on the H200 (`bench/vmm_probe.py`, `bench/results/h200-2026-12-04-vmm-probe.json`):
mapping the shared page takes about 2.6 us a page, setting access over a range about 28 us a
page; moving one page to memory of its own and back, about 50 us each way.
"""

from __future__ import annotations

import contextlib
import ctypes
import weakref
from collections import deque

import torch


class PagesExhausted(RuntimeError):
    """`back` asked for more pages than the pool may hold."""


class Pages:
    """Pages 0 .. count - 1 of `page` bytes each over `tensor` (uint8, count * page bytes); at most
    `capacity` of them with memory of their own at once."""

    # whether a page without memory of its own reads as a poison (HostPages) rather than as values
    # that some caller wrote (DevicePages' shared page)
    poisons = False

    def __init__(self, count: int, page: int, capacity: int) -> None:
        if count <= 0 or page <= 0:
            raise ValueError(f"Pages: count and page size must be positive, got {count} and {page}")
        if capacity < 0:
            raise ValueError(f"Pages: capacity must be >= 0, got {capacity}")
        self.count, self.page, self.capacity = count, page, min(capacity, count)
        self._backed = bytearray(count)  # 1: the page is backed (its caller's)
        self._mapped = bytearray(count)  # 1: it has memory of its own (backed, or released and pending)
        self.in_use = 0  # pages with memory of their own
        self._pending: deque[tuple[object, list[int]]] = deque()  # (event, pages) released, still mapped
        self.tensor: torch.Tensor

    @property
    def backed_count(self) -> int:
        return sum(self._backed)

    @property
    def free(self) -> int:
        """Pages that `back` can still give memory (waiting on pending releases if it must)."""
        return self.capacity - self.backed_count

    def backed(self, index: int) -> bool:
        return bool(self._backed[self._index(index)])

    def covering(self, first_byte: int, end_byte: int) -> range:
        """The pages that bytes [first_byte, end_byte) of the range lie on."""
        if end_byte <= first_byte:
            return range(0)
        return range(first_byte // self.page, -(-end_byte // self.page))

    def back(self, pages) -> None:
        """Give each page in `pages` memory of its own, where it has none (its contents are then
        undefined), after giving back released pages whose event has completed. Call it with no
        work in flight on the range: mapping is not ordered with the work on a stream."""
        want = [i for i in dict.fromkeys(pages) if not self._backed[self._index(i)]]
        if not want:
            return
        new = [i for i in want if not self._mapped[i]]
        self._collect(len(new))
        if self.in_use + len(new) > self.capacity:
            raise PagesExhausted(f"{len(want)} pages asked for, {self.free} of {self.capacity} free")
        for i in new:
            self._map_own(i)
            self._mapped[i] = 1
        for i in want:  # a page released but not yet given back keeps its memory
            self._backed[i] = 1
        self.in_use += len(new)

    def release(self, pages, after: torch.cuda.Event | None = None) -> None:
        """Take their memory back: at once, or once `after` (an event recorded behind the work that
        may still read or write them) has completed; until then they stay mapped as they are."""
        done = [i for i in dict.fromkeys(pages) if self._backed[self._index(i)]]
        for i in done:
            self._backed[i] = 0
        if after is None:
            self._give_back(done)
        elif done:
            self._pending.append((after, done))

    def _give_back(self, pages: list[int]) -> None:
        pages = [i for i in pages if self._mapped[i] and not self._backed[i]]
        for i in pages:
            self._unmap_own(i)
            self._mapped[i] = 0
        self.in_use -= len(pages)

    def _collect(self, wanted: int) -> None:
        # pending pages whose event completed go back to the pool; wait on the oldest ones while
        # the pool alone cannot give `wanted`
        while self._pending:
            event, pages = self._pending[0]
            if not event.query():
                if self.capacity - self.in_use >= wanted:
                    return
                event.synchronize()
            self._pending.popleft()
            self._give_back(pages)

    def _index(self, i: int) -> int:
        if not 0 <= i < self.count:
            raise IndexError(f"page {i} is outside the range's {self.count} pages")
        return i

    def close(self) -> None:
        """Give everything back (the tensor must not be used after)."""

    def scrub(self) -> None:
        """Make every page without memory of its own read as nothing a caller wrote (HostPages:
        the poison; on a GPU they share one page, and this does nothing)."""

    # the implementations: give page i memory of its own; take it back (the shared page again)
    def _map_own(self, i: int) -> None:
        raise NotImplementedError

    def _unmap_own(self, i: int) -> None:
        raise NotImplementedError


class HostPages(Pages):
    """The interface over an ordinary tensor (any device): a page backed is zeroed, a page
    released is filled with `poison` (a float pattern of large finite values by default), so that
    an unmasked read of it changes what a computation returns."""

    poisons = True

    def __init__(self, count: int, page: int, capacity: int | None = None, device="cpu", poison: int = 0x71) -> None:
        super().__init__(count, page, count if capacity is None else capacity)
        self.poison = poison
        self.tensor = torch.full((count * page,), poison, dtype=torch.uint8, device=device)

    def scrub(self) -> None:
        # on a GPU, what one caller writes to a page without memory lands in the page all such
        # pages share, and another read of any of them sees it: here, nobody's writes are kept
        bare = torch.frombuffer(bytearray(self._backed), dtype=torch.uint8) == 0
        self.tensor.view(self.count, self.page)[bare.to(self.tensor.device)] = self.poison

    def _map_own(self, i: int) -> None:
        self.tensor[i * self.page:(i + 1) * self.page].zero_()

    def _unmap_own(self, i: int) -> None:
        self.tensor[i * self.page:(i + 1) * self.page].fill_(self.poison)


# ---- CUDA's virtual memory management through the driver library -------------------------------

class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


# CU_MEM_ALLOCATION_TYPE_PINNED, CU_MEM_LOCATION_TYPE_DEVICE, CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_PINNED, _ON_DEVICE, _READ_WRITE = 1, 1, 3
_U64, _SIZE = ctypes.c_ulonglong, ctypes.c_size_t
_driver: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        try:
            _driver = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise RuntimeError(f"paged cache storage needs the CUDA driver library (libcuda.so.1): {e}") from e
    return _driver


def _call(name: str, *args) -> None:
    lib = _lib()
    rc = getattr(lib, name)(*args)
    if rc != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(text))
        raise RuntimeError(f"{name} failed: CUDA driver error {rc} ({(text.value or b'?').decode()})")


class _CudaArray:
    # what torch.as_tensor reads to wrap device memory it did not allocate
    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def granularity(device: torch.device) -> int:
    """The page size CUDA maps on `device` (bytes)."""
    prop = _prop(device)
    size = _SIZE()
    _call("cuMemGetAllocationGranularity", ctypes.byref(size), ctypes.byref(prop), 0)
    return size.value


def _prop(device: torch.device) -> _AllocProp:
    prop = _AllocProp()
    prop.type = _PINNED
    prop.location = _Location(_ON_DEVICE, device.index if device.index is not None else torch.cuda.current_device())
    return prop


class _Mapping:
    """What a DevicePages holds of the driver's: its range, the pages mapped in it and every
    physical page made. `release` gives them back (once: `close`, or when the DevicePages is
    collected)."""

    def __init__(self) -> None:
        self.base: int | None = None
        self.size = self.page = self.mapped = 0
        self.handles: list[int] = []

    def release(self, device: torch.device) -> None:
        if self.base is None:
            return
        base, self.base = self.base, None
        with contextlib.suppress(Exception):  # at interpreter exit torch may be gone already
            torch.cuda.synchronize(device)
        for i in range(self.mapped):
            _call("cuMemUnmap", _U64(base + i * self.page), _SIZE(self.page))
        _call("cuMemAddressFree", _U64(base), _SIZE(self.size))
        for h in self.handles:
            _call("cuMemRelease", _U64(h))
        self.handles.clear()


class DevicePages(Pages):
    """`count` pages of `page` bytes (default: the GPU's mapping granularity), reserved as one range
    on `device`; at most `capacity` with memory of their own at once (allocated on first use, then
    pooled). `close` (or collection) gives the range and its memory back."""

    def __init__(self, count: int, capacity: int, device: torch.device, page: int | None = None) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"DevicePages needs a CUDA device, got {device}")
        self.device = device
        with torch.cuda.device(device):
            torch.cuda.current_stream().synchronize()  # the device's primary context, current on this thread
            self._prop = _prop(device)
            unit = granularity(device)
            page = page or unit
            if page % unit:
                raise ValueError(f"DevicePages: page must be a multiple of the device's {unit} bytes, got {page}")
            super().__init__(count, page, capacity)
            self._access = _AccessDesc(self._prop.location, _READ_WRITE)
            self._m = m = _Mapping()
            self._finalizer = weakref.finalize(self, m.release, device)
            self._finalizer.atexit = False  # at exit the driver takes everything back itself
            ptr = _U64()
            _call("cuMemAddressReserve", ctypes.byref(ptr), _SIZE(count * page), _SIZE(unit), _U64(0), _U64(0))
            m.base, m.size, m.page = ptr.value, count * page, page
            self.base, self._handles, self._pool = ptr.value, [None] * count, []
            self._shared = self._create()
            for i in range(count):
                self._map(i, self._shared)
                m.mapped += 1
            _call("cuMemSetAccess", _U64(self.base), _SIZE(count * page), ctypes.byref(self._access), _SIZE(1))
            self.tensor = torch.as_tensor(_CudaArray(self.base, count * page), device=device)
            self.tensor[:page].zero_()  # the shared page, under every page: reads of it give zeros

    def _create(self) -> int:
        handle = _U64()
        _call("cuMemCreate", ctypes.byref(handle), _SIZE(self.page), ctypes.byref(self._prop), _U64(0))
        self._m.handles.append(handle.value)
        return handle.value

    def _map(self, i: int, handle: int) -> None:
        _call("cuMemMap", _U64(self.base + i * self.page), _SIZE(self.page), _SIZE(0), _U64(handle), _U64(0))

    def _remap(self, i: int, handle: int) -> None:
        ptr = _U64(self.base + i * self.page)
        _call("cuMemUnmap", ptr, _SIZE(self.page))
        self._map(i, handle)
        _call("cuMemSetAccess", ptr, _SIZE(self.page), ctypes.byref(self._access), _SIZE(1))

    def _map_own(self, i: int) -> None:
        handle = self._pool.pop() if self._pool else self._create()
        self._remap(i, handle)
        self._handles[i] = handle

    def _unmap_own(self, i: int) -> None:
        self._remap(i, self._shared)
        self._pool.append(self._handles[i])
        self._handles[i] = None

    def close(self) -> None:
        self._finalizer()
