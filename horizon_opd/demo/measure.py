"""What a cost comparison measures besides time: the peak memory of a block of code, and the machine it ran on.

One probe for the demo's comparison (`horizon_opd.demo.compare`) and the benchmarks (`benchmarks/`), so their memory
figures mean the same thing.
"""

import gc
import os
import platform
import resource
import sys
import threading

import torch


def machine_description() -> str:
    """One line naming the machine, for the comparison's table and plot."""
    return f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPU cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads".replace("  ", " ")


def machine_info() -> dict:
    """The facts a reader needs to compare two result files (CPU, cores, RAM, GPU, library versions)."""
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram_gb = None
    try:
        with open("/proc/meminfo") as f:
            ram_gb = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_gb": ram_gb,
            "device": "cpu", "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device="cuda", gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


class PeakRSS:
    """Peak resident memory (MB) of this process while the block runs.

    ```python
    with PeakRSS() as memory:
        trainer.train()
    memory.peak, memory.increase  # MB: the absolute peak, and the peak above the RSS at entry
    ```

    On entry the garbage is collected and the heap's free pages handed back to the OS, so a block that follows a
    bigger one starts from a clean heap. The peak is the kernel's high-water mark (`VmHWM`), reset to the current RSS
    on entry through `/proc/self/clear_refs`; where that reset is not allowed (not Linux, some containers) a thread
    samples the RSS every `interval` seconds instead (getrusage's maximum is process-lifetime, so it cannot separate
    blocks that run one after another in the same process). `method` says which was used.

    On a CUDA machine `peak_cuda` is `torch.cuda.max_memory_allocated()` over the block and `baseline_cuda` the memory
    allocated at entry (MB, tensors only), the figures that bound a GPU run; both are None otherwise.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.baseline = self.peak = 0.0
        self.peak_cuda = self.baseline_cuda = None
        self.resettable = False

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_cuda = torch.cuda.memory_allocated() / 2**20
        self.resettable = _reset_high_water_mark()
        self.baseline = self.peak = current_rss_mb()
        self._stop = threading.Event()
        self._thread = None
        if not self.resettable:  # the kernel's mark is exact; sample only without it (a thread costs the GIL)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_mb(), high_water_mark_mb() if self.resettable else 0.0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_cuda = torch.cuda.max_memory_allocated() / 2**20

    @property
    def increase(self) -> float:
        """Peak RSS above the RSS at entry (MB): what the block itself allocated at its worst."""
        return self.peak - self.baseline

    @property
    def method(self) -> str:
        if self.resettable:
            return "VmHWM (reset via /proc/self/clear_refs at entry)"
        return f"RSS sampled every {self.interval * 1000:.0f} ms"

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_mb())


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    # not Linux: the lifetime maximum is the best the standard library offers
    return high_water_mark_mb()


def high_water_mark_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 1024  # bytes on macOS, KiB on Linux


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset VmHWM to the current RSS (proc(5))
        return True
    except OSError:
        return False
