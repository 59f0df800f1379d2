"""What a KV cache backed page by page through CUDA's virtual memory calls would cost (H200).

A batch cache of R rows x S slots reserves address space for all of it, but only the slots a
request uses need memory. CUDA's driver maps physical pages (2 MB) into a reserved range one by
one (`cuMemMap`), so the kernels and graphs that read the cache stay as they are. This probe
measures, with ctypes on libcuda:

- the allocation granularity, and the host time of reserving a range, mapping one shared page at
  every page of it, and setting access over the whole range in one call;
- the host time of moving one page from the shared page to a page of its own and back (unmap,
  map, set access);
- that a torch tensor over the range reads and writes through the mappings, keeps its data across
  remaps of other pages, and that a CUDA graph captured before a remap reads the new page after it;
- the decode attention kernel on the layouts a paged cache would use ([rows, slots, heads, d]
  storage) against the head-major one, at decode sizes.

    PYTHONPATH=. python bench/vmm_probe.py --out bench/results/h200-<date>-vmm-probe.json
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import time

import torch

from moetorch.engine.pages import _READ_WRITE, _AccessDesc, _call, _prop, granularity

U64, SIZE = ctypes.c_ulonglong, ctypes.c_size_t


def setup(device: int):
    torch.zeros(1, device=f"cuda:{device}")  # the primary context, current
    dev = torch.device("cuda", device)
    prop = _prop(dev)
    return prop, _AccessDesc(prop.location, _READ_WRITE), granularity(dev)


def create(prop, size):
    h = U64()
    _call("cuMemCreate", ctypes.byref(h), SIZE(size), ctypes.byref(prop), U64(0))
    return h.value


def cmap(ptr, size, handle):
    _call("cuMemMap", U64(ptr), SIZE(size), SIZE(0), U64(handle), U64(0))


def unmap(ptr, size):
    _call("cuMemUnmap", U64(ptr), SIZE(size))


def set_access(ptr, size, access):
    _call("cuMemSetAccess", U64(ptr), SIZE(size), ctypes.byref(access), SIZE(1))


class _Array:
    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None}


def probe_vmm(out: dict, pages: int) -> None:
    prop, access, P = setup(torch.cuda.current_device())
    out["granularity_bytes"] = P
    size = pages * P
    ptr = ctypes.c_ulonglong()
    t = time.perf_counter()
    _call("cuMemAddressReserve", ctypes.byref(ptr), SIZE(size), SIZE(0), U64(0), U64(0))
    out["reserve_s"] = time.perf_counter() - t
    base = ptr.value
    dummy = create(prop, P)
    t = time.perf_counter()
    for i in range(pages):
        cmap(base + i * P, P, dummy)
    out["map_shared_page_us_each"] = (time.perf_counter() - t) / pages * 1e6
    t = time.perf_counter()
    set_access(base, size, access)
    out["set_access_whole_range_s"] = time.perf_counter() - t
    out["pages"] = pages
    buf = torch.as_tensor(_Array(base, size), device="cuda")
    out["tensor_ok"] = bool(buf.data_ptr() == base)
    own = [create(prop, P) for _ in range(64)]
    t0 = time.perf_counter()
    for i in range(len(own)):
        unmap(base + (2 * i + 1) * P, P)
    t1 = time.perf_counter()
    for i, h in enumerate(own):
        cmap(base + (2 * i + 1) * P, P, h)
    t2 = time.perf_counter()
    for i in range(len(own)):
        set_access(base + (2 * i + 1) * P, P, access)
    t3 = time.perf_counter()
    n = len(own)
    out["own_page_in_us_each"] = (t3 - t0) / n * 1e6
    out["unmap_us_each"], out["map_us_each"], out["set_access_us_each"] = ((t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6,
                                                                           (t3 - t2) / n * 1e6)
    # data written through the tensor stays on its page while other pages move
    view = buf.view(pages, P)
    for i in range(len(own)):
        view[2 * i + 1].fill_(i + 1)
    torch.cuda.synchronize()
    # a graph that sums page 3 (own page 1), captured now, replayed after page 3 is remapped
    s = torch.zeros((), dtype=torch.float64, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        s.copy_(view[3].double().sum())
    g.replay()
    torch.cuda.synchronize()
    before = s.item()
    p3 = base + 3 * P
    fresh = create(prop, P)
    unmap(p3, P)
    cmap(p3, P, fresh)
    set_access(p3, P, access)
    view[3].fill_(7)
    g.replay()
    torch.cuda.synchronize()
    out["graph_reads_remapped_page"] = bool(before == 2 * P and s.item() == 7 * P)
    t = time.perf_counter()
    for i in range(len(own)):
        p = base + (2 * i + 1) * P
        unmap(p, P)
        cmap(p, P, dummy)
        set_access(p, P, access)
    out["own_page_out_us_each"] = (time.perf_counter() - t) / len(own) * 1e6
    # a remapped page's own handle, mapped elsewhere, still holds its data
    p = base + 10 * P
    unmap(p, P)
    cmap(p, P, own[5])
    set_access(p, P, access)
    out["handle_keeps_data"] = bool(view[10].eq(6).all().item())
    torch.cuda.synchronize()


def _graph_us(fn, reps: int = 20, rounds: int = 5) -> float:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / (10 * reps) * 1e3)
    return round(best, 2)


def probe_layouts(out: dict) -> None:
    from moetorch.ops import triton_fused as tf

    res = {}
    for name, H, G, tiled in (("jetmoe", 32, 16, True), ("phimoe", 32, 8, False)):
        for B, S, live in ((1, 4096, 200), (64, 4096, 640), (256, 4096, 640)):
            q = torch.randn(B, H, 1, 128, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device="cuda")
            mask[..., S // 2 - live:S // 2] = True
            kh, vh = (torch.randn(B, G, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            ks, vs = (torch.empty(B, S, G, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
            ks.copy_(kh)
            vs.copy_(vh)
            row = {}
            for layout, k, v in (("head_major", kh, vh), ("slot_major", ks, vs)):
                row[layout] = _graph_us(functools.partial(tf.decode_attention, q, k, v, mask, 0.088, tiled))
            row["equal"] = bool(torch.equal(tf.decode_attention(q, kh, vh, mask, 0.088, tiled),
                                            tf.decode_attention(q, ks, vs, mask, 0.088, tiled)))
            res[f"{name}.B{B}.S{S}.live{live}"] = row
    out["decode_attention_us"] = res


def probe_pages(out: dict) -> None:
    """moetorch.engine.pages.DevicePages at several page sizes: the host time of setting up a
    range, and of backing and releasing pages; data and graphs across remaps."""
    from moetorch.engine.pages import DevicePages

    res = {}
    for mb in (2, 8, 32):
        page = mb << 20
        count = (64 << 30) // page  # a 64 GB range
        t = time.perf_counter()
        pages = DevicePages(count, capacity=256, device="cuda", page=page)
        row = {"pages": count, "setup_s": round(time.perf_counter() - t, 3)}
        n = min(128, count // 2)
        t = time.perf_counter()
        pages.back(range(0, 2 * n, 2))
        row["back_us_a_page"] = round((time.perf_counter() - t) / n * 1e6, 1)
        view = pages.tensor.view(count, page)
        for j in range(n):
            view[2 * j].fill_(j % 250 + 1)
        s = torch.zeros((), dtype=torch.float64, device="cuda")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            s.copy_(view[2].double().sum())
        event = torch.cuda.Event()
        event.record()
        t = time.perf_counter()
        pages.release(range(0, 2 * n, 4), after=event)
        row["release_deferred_us_a_page"] = round((time.perf_counter() - t) / (n // 2) * 1e6, 1)
        t = time.perf_counter()
        pages.back(range(1, 2 * n, 4))  # takes the released pages' memory once the event is done
        row["back_after_release_us_a_page"] = round((time.perf_counter() - t) / (n // 2) * 1e6, 1)
        view[2].fill_(9)  # page 2 was kept (released pages are 0, 4, 8, ...)
        g.replay()
        torch.cuda.synchronize()
        row["graph_reads_page"] = bool(s.item() == 9 * page)
        row["kept_page_data"] = bool(view[6].eq(4).all().item())
        row["in_use"] = pages.in_use
        t = time.perf_counter()
        pages.close()
        row["close_s"] = round(time.perf_counter() - t, 3)
        res[f"{mb}MB"] = row
        print(mb, row, flush=True)
    out["device_pages"] = res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=8192)
    ap.add_argument("--out")
    ap.add_argument("--pages-only", action="store_true")
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name()}
    probe_vmm(out, args.pages)
    print(json.dumps(out, indent=1), flush=True)
    probe_pages(out)
    if not args.pages_only:
        probe_layouts(out)
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
