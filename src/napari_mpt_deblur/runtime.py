"""Where and how computations run: devices, precision, and CPU allocator tuning.

Nothing here runs on import: the command line and the benchmarks call
:func:`tune_cpu_allocator` once at start; library users may call it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import sys
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**30) -> bool:
    """Keep freed feature maps in the heap instead of returning them to the OS.

    A forward pass allocates and frees tens of maps of 10-30 MB; glibc returns
    each to the OS and faults it in again (zero-filled) on the next allocation,
    which costs about a quarter of CPU inference time on small machines. Raising
    the mmap threshold to its maximum (32 MB) and the trim threshold to 1 GiB
    makes the heap reuse them. Both must be set together: a fixed trim threshold
    alone switches off glibc's adaptive mmap threshold and is much slower.

    Returns True when the settings were applied (glibc on Linux), else False.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a setting: ``auto`` picks CUDA, then Apple MPS, then the CPU.

    Raises
    ------
    ValueError
        When the named device is not present (e.g. ``cuda`` on a machine without a GPU).
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch sees no CUDA GPU (torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) present")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: Apple MPS is not available here; use cpu")
    return device


def available_devices() -> list[str]:
    """Device settings that work on this machine, ``auto`` first (for menus)."""
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a device and precision setting; None means plain fp32.

    ``auto`` is fp32 on the CPU (exact: bf16 moves a ``lite`` output by up to 0.01, and only CPUs with
    bf16 in hardware, :func:`cpu_has_native_bf16`, run it faster) and
    fp16 on GPUs (twice the throughput; MPT's norms and softmax stay in fp32
    under autocast).
    """
    import torch

    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 products in hardware (AVX-512 BF16 or AMX), where bf16 math is fast.

    Elsewhere oneDNN emulates bf16, which is no faster than fp32.
    """
    import torch

    try:
        capabilities = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch, or a CPU it cannot query
        return False
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def run_to_end(steps: Generator[Any, None, T], on_step: Callable[[Any], None] | None = None) -> T:
    """Run a compute generator to its end and return what it returns.

    ``on_step`` sees every yielded item; if it raises (a cancel button, Ctrl-C),
    the generator is closed first, so its ``finally`` blocks run before the error
    propagates.
    """
    while True:
        try:
            item = next(steps)
        except StopIteration as finished:
            return finished.value
        if on_step is not None:
            try:
                on_step(item)
            except BaseException:
                steps.close()
                raise


MAX_CPU_WORKERS = 4
"""At most this many planes are deblurred at once on the CPU: each holds its own feature maps."""


def cpu_workers(tasks: int) -> int:
    """How many independent forward passes to run side by side on the CPU, one thread each.

    One torch thread per plane, planes side by side, instead of every core on one
    plane: the network's many small operations then need no thread barriers, which
    is as fast on an idle machine and stays fast when another process takes a core
    (with all cores on one plane, every barrier waits for the preempted thread;
    see ``docs/benchmarks.md``, experiment 5).
    """
    import torch

    return max(1, min(tasks, torch.get_num_threads(), MAX_CPU_WORKERS))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the calling thread's torch operations on ``count`` threads, then restore the setting.

    Torch keeps the thread count per calling thread, plus a default that threads
    started later inherit; both are restored on exit.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_side_by_side(function: Callable[[Any], T], items: list[Any], workers: int) -> Iterator[T]:
    """``map(function, items)`` with up to ``workers`` calls at once, each on its share of torch's threads.

    Results come in order. The calls see the caller's grad and inference mode
    (both are per thread in torch). Closing the iterator early waits for the
    calls under way and starts no more. ``workers`` 1 runs in the calling thread.
    """
    import torch

    if workers <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    threads = max(1, torch.get_num_threads() // workers)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def call(item: Any) -> T:
        with torch_threads(threads), torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(item)

    upcoming = iter(items)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="torch-side-by-side")
    try:
        pending = deque(pool.submit(call, item) for item in itertools.islice(upcoming, workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(call, item) for item in itertools.islice(upcoming, 1))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
