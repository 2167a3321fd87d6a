"""Speed of the packed BCQ matmul backends next to the dense torch matmul, on this machine.

For every weight shape (out x in), bit width and batch, a random-normal weight is quantized
with RTN into the packed format and each requested backend of `unibcq::bcq_matmul` is timed
beside the dense fp32 and bf16 `F.linear` of the same shape, in the same process with the
same threads, so the speedups compare like with like. Decode (a few rows) on a CPU is
memory-bound, so every time is also given as effective bandwidth: bytes of the stored
weight read per call (packed planes + fp16 scales and offsets for BCQ, the dense matrix
for fp32 / bf16; activations are not counted) over seconds, next to the machine's copy
bandwidth measured once at the start. Calls rotate over enough copies of the weight to
defeat the caches (see COLD_BYTES), so small matrices are timed as a decode step meets
them: streamed from memory. A backend that raises on some inputs is reported with a note
instead of a time. On a GPU (`device`) the same grid runs on the GPU's memory, and each
timed loop ends with a synchronisation, so a time covers the queued calls end to end: for
small matrices at batch 1 that is the Python dispatch and launch of each call (tens of
microseconds) rather than the kernel, as in an eager decode step without CUDA graphs. The
copy bandwidth is then the GPU's, CPU-only backends are reported as skipped, and a CUDA
error stops the run (it would poison every later measurement).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from unibcq.errors import UnibcqError
from unibcq.formats.bcq import BCQTensor, validate_group_size
from unibcq.kernels.dispatch import BACKENDS, bcq_matmul
from unibcq.progress import progress_bar
from unibcq.quantizers import quantize_rtn
from unibcq.quantizers.uniform import check_bits

# The 7B MLP shapes (4096x11008, 11008x4096) are left out of the defaults: the reference
# and bit-plane backends take seconds per call there at batch 64, minutes for the whole grid.
DEFAULT_SHAPES = ((4096, 4096), (576, 576), (192, 576), (1536, 576), (576, 1536))
DEFAULT_BITS = (2, 3, 4)
DEFAULT_BATCHES = (1, 4, 16, 64)
DEFAULT_GROUP_SIZE = 128
DEFAULT_REPEATS = 3
DENSE_BACKENDS = ("dense-fp32", "dense-bf16")
# Each measurement cycles through copies of its weight totalling at least COLD_BYTES, more
# than the CPU's last-level cache, so every call reads its weight from DRAM as a decode step
# does; one small matrix called in a loop would be served from cache (measured: SmolLM2's
# 576x576 fp32 at twice the copy bandwidth).
COLD_BYTES = 128 * 2**20
MAX_COPIES = 4096
WARMUP_SECONDS = 0.25
# Calls shorter than this are looped within one repeat so timer noise stays small.
MIN_REPEAT_SECONDS = 0.01
BANDWIDTH_BYTES = 256 * 2**20


def packed_backends() -> list[str]:
    """The default backends: every `bcq_matmul` backend but "auto", which only picks among them."""
    return [b for b in BACKENDS if b != "auto"]


def num_copies(weight_bytes: int) -> int:
    """Copies of a weight of this size that together exceed the caches (see COLD_BYTES)."""
    return max(1, min(MAX_COPIES, math.ceil(COLD_BYTES / max(weight_bytes, 1))))


def no_sync() -> None:
    """A CPU call has finished when it returns."""


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for the work queued on `device`: a GPU runs its kernels after they are launched."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else no_sync


def time_calls(calls: Sequence[Callable[[], Any]], repeats: int, threads: int,
               sync: Callable[[], None] = no_sync) -> float:
    """Median seconds per call over `repeats` repeats, cycling through `calls`, on `threads` threads.

    `calls` run the same op on different copies of the weight. The warm-up runs each copy
    once (or as many as fit in WARMUP_SECONDS), absorbing one-time costs: numba
    compilation, the bit-plane GEMV's per-tensor fp32 scales, allocator growth. Its fastest call
    sets how many calls one repeat makes. The thread count is set before and after the
    warm-up because a first call can change it: numba's OpenMP pool starts with one thread
    per core and shares the OpenMP runtime with torch. `sync` waits for queued device work
    and closes every timed span.
    """
    torch.set_num_threads(threads)
    warm: list[float] = []
    index = 0
    sync()
    started = time.perf_counter()
    while index < max(len(calls), 2) and (index < 2 or time.perf_counter() - started < WARMUP_SECONDS):
        start = time.perf_counter()
        calls[index % len(calls)]()
        sync()
        warm.append(time.perf_counter() - start)
        index += 1
    torch.set_num_threads(threads)
    loops = max(1, min(10_000, math.ceil(MIN_REPEAT_SECONDS / max(min(warm), 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            calls[index % len(calls)]()
            index += 1
        sync()
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def copy_bandwidth_gbps(repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Memory bandwidth of a large tensor copy on `device`, counting bytes read plus bytes written (GB/s).

    256 MiB is far beyond any cache, so this is what one process with the current threads
    moves to and from DRAM (or a GPU to and from its memory): the yardstick for a
    memory-bound GEMV (which only reads, so it may come somewhat above it).
    """
    src = torch.ones(BANDWIDTH_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_calls([lambda: dst.copy_(src)], repeats, torch.get_num_threads(), device_sync(device))
    return 2 * BANDWIDTH_BYTES / seconds / 1e9


def check_settings(shapes: Sequence[tuple[int, int]], bits: Sequence[int], batches: Sequence[int],
                   group_size: int, backends: Sequence[str], repeats: int) -> None:
    """Reject a grid the run cannot measure, before minutes are spent on part of it."""
    if not shapes or not bits or not batches or not backends:
        raise UnibcqError("give at least one shape, bit width, batch and backend")
    if any(o < 1 or i < 1 for o, i in shapes):
        raise UnibcqError("shapes must be OUTxIN with both sides >= 1")
    for nbits in bits:
        check_bits(nbits)
    validate_group_size(group_size)
    if min(batches) < 1 or repeats < 1:
        raise UnibcqError("batch sizes and repeats must be >= 1")
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise UnibcqError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")


def benchmark_kernels(
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    bits: Sequence[int] = DEFAULT_BITS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    group_size: int = DEFAULT_GROUP_SIZE,
    backends: Sequence[str] | None = None,
    repeats: int = DEFAULT_REPEATS,
    show_progress: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    input_dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """One self-contained entry per measurement (see the module docstring).

    Keys: backend, shape [out, in], bits and group_size (None for dense), batch, seconds
    (None when the backend raised; `note` says why), speedup_vs_fp32 (dense fp32 seconds of
    the same shape and batch / seconds), gbps (weight bytes / seconds / 1e9), weight_bytes,
    bandwidth_gbps (the copy bandwidth of `device`, the same in every entry), threads, device
    and gpu (its name, None on a CPU), input_dtype (the packed backends' input dtype, None
    for the dense rows, whose backend names theirs; a GPU model runs in bfloat16). Weights
    and inputs are drawn on the CPU, so a seed gives the same grid anywhere.
    """
    device = torch.device(device)
    sync = device_sync(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # Repeated values would only repeat measurements (and break the batch-keyed inputs).
    shapes = list(dict.fromkeys(tuple(shape) for shape in shapes))
    bits, batches = list(dict.fromkeys(bits)), list(dict.fromkeys(batches))
    backends = list(dict.fromkeys(backends)) if backends is not None else packed_backends()
    check_settings(shapes, bits, batches, group_size, backends, repeats)
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(seed)
    total = len(shapes) * len(batches) * (len(DENSE_BACKENDS) + len(bits) * len(backends))
    entries: list[dict[str, Any]] = []
    with progress_bar(show_progress) as bar, torch.no_grad():
        task = bar.add_task("kernels: copy bandwidth", total=total)
        bandwidth = copy_bandwidth_gbps(device=device)

        def measure(backend: str, shape: tuple[int, int], nbits: int | None, batch: int, weight_bytes: int,
                    calls: list[Callable[[], Any]]) -> dict[str, Any]:
            bar.update(task, description=f"kernels: {shape[0]}x{shape[1]} "
                                         f"{'' if nbits is None else f'w{nbits} '}batch {batch} {backend}")
            try:
                seconds, note = time_calls(calls, repeats, threads, sync), None
            except (UnibcqError, ValueError, RuntimeError, NotImplementedError) as exc:
                if "CUDA error" in str(exc):  # sticky: every later call on this device would fail too
                    raise
                seconds, note = None, f"skipped: {str(exc).splitlines()[0]}"
            bar.update(task, advance=1)
            return {"backend": backend, "shape": list(shape), "bits": nbits,
                    "group_size": None if nbits is None else group_size, "batch": batch, "seconds": seconds,
                    "speedup_vs_fp32": None, "gbps": weight_bytes / seconds / 1e9 if seconds else None,
                    "weight_bytes": weight_bytes, "bandwidth_gbps": bandwidth, "threads": threads,
                    "device": str(device), "gpu": gpu,
                    "input_dtype": None if nbits is None else str(input_dtype).removeprefix("torch."), "note": note}

        for shape in shapes:
            weight = torch.randn(shape, generator=gen)
            inputs = {batch: torch.randn(batch, shape[1], generator=gen).to(device) for batch in batches}
            rows = []
            for name, dtype in zip(DENSE_BACKENDS, (torch.float32, torch.bfloat16)):
                first = weight.to(device, dtype)
                nbytes = first.numel() * first.element_size()
                copies = [first] + [first.clone() for _ in range(num_copies(nbytes) - 1)]
                for batch, x in inputs.items():
                    xd = x.to(dtype)
                    rows.append(measure(name, shape, None, batch, nbytes,
                                        [lambda xd=xd, w=w: F.linear(xd, w) for w in copies]))
            for nbits in bits:
                packed = quantize_rtn(weight, nbits, group_size)
                copies = [
                    BCQTensor(packed.planes.to(device, copy=True), packed.alpha.to(device, copy=True),
                              None if packed.offset is None else packed.offset.to(device, copy=True),
                              packed.shape, group_size)
                    for _ in range(num_copies(packed.nbytes))]
                for batch, x in inputs.items():
                    x = x.to(input_dtype)
                    for backend in backends:
                        rows.append(measure(backend, shape, nbits, batch, packed.nbytes, [
                            lambda x=x, p=p, backend=backend: bcq_matmul(
                                x, p.planes, p.alpha, p.offset, shape[1], p.group_size, backend)
                            for p in copies]))
            fp32 = {r["batch"]: r["seconds"] for r in rows if r["backend"] == "dense-fp32"}
            for row in rows:
                if fp32[row["batch"]] and row["seconds"]:
                    row["speedup_vs_fp32"] = fp32[row["batch"]] / row["seconds"]
            entries.extend(rows)
    return entries
