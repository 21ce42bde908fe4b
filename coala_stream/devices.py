"""Where computation runs: one parser for every subcommand's ``--device``, and torch's CPU threads.

Thread rule (issue 16): torch's default is every CPU of the node, which ignores what this
process is actually given (affinity masks, cgroup quotas, ``SLURM_CPUS_PER_TASK``) and what
other processes are using right now. OpenMP threads wait for each other at the end of every
operation, so one thread descheduled by another process stalls them all; on 2 shared cores
that made the quickstart ~10x slower. The default is therefore the CPU budget
(`cpu_budget`) less the cores other processes keep busy right now (`busy_elsewhere`),
never below 1 (`default_threads`). The CLI applies it once per command (`choose_threads`,
then `torch_threads` with the count); inside the library ``threads=None`` keeps the caller's
torch setting, so a Python user's ``torch.set_num_threads`` is never overridden. The budget
functions do not import torch, so a CLI can call them (and `configure_openmp_env`) before
torch is loaded.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

# The one wording of the rule in every compute subcommand's --threads help.
THREADS_RULE = ("default: the CPUs this process may use (affinity mask, cgroup quota, "
                "SLURM_CPUS_PER_TASK, OMP_NUM_THREADS) less the cores other processes keep "
                "busy when the command starts, never more; see the README's 'Threads'")

# Module-level so tests can point them at a tmp dir.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")


def resolve_device(spec: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; UsageError naming the fix otherwise.

    auto is cuda when torch sees a CUDA device, else cpu.
    """
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: torch sees no CUDA device (use --device cpu, or install "
                         f"a CUDA build of torch)")
    return device


def _affinity() -> set[int]:
    """CPUs this process may run on (all of them where the OS has no affinity call)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _cgroup_dirs() -> list[Path]:
    """This process's cgroup directories (v2 unified, v1 cpu controller), innermost first,
    walking up to the root: a quota on a parent cgroup limits us as well."""
    starts = []
    try:
        lines = PROC_SELF_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if controllers == "":
            starts.append(CGROUP_ROOT / rel)
        elif "cpu" in controllers.split(","):
            starts += [CGROUP_ROOT / c / rel for c in ("cpu", "cpu,cpuacct", controllers)]
    # Inside a container the listed path often does not exist (no cgroup namespace): the
    # container's own limits are then at the mount root.
    starts += [CGROUP_ROOT, CGROUP_ROOT / "cpu", CGROUP_ROOT / "cpu,cpuacct"]
    dirs: list[Path] = []
    for start in starts:
        d = start
        while d not in dirs and d.is_dir():
            dirs.append(d)
            if d == CGROUP_ROOT or d.parent == d:
                break
            d = d.parent
    return dirs


def _read_quota(d: Path) -> float | None:
    """CPU cores one cgroup directory allows (v2 cpu.max, v1 cfs quota/period); None: no limit."""
    try:
        if (d / "cpu.max").is_file():
            quota, period = ((d / "cpu.max").read_text().split() + ["100000"])[:2]
        else:
            quota = (d / "cpu.cfs_quota_us").read_text().strip()
            period = (d / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def cgroup_quota() -> float | None:
    """The tightest CPU quota (in cores) over this process's cgroups; None where there is none."""
    quotas = [q for q in map(_read_quota, _cgroup_dirs()) if q is not None]
    return min(quotas) if quotas else None


def _env_count(name: str) -> int | None:
    """A positive count from the environment (OMP_NUM_THREADS may be a nested list: '4,2')."""
    value = os.environ.get(name, "").split(",")[0].strip()
    try:
        count = int(value)
    except ValueError:
        return None
    return count if count >= 1 else None


def cpu_budget() -> tuple[int, str]:
    """(CPUs this process may use, the reasons as one line for --help and logs).

    The minimum of the affinity mask, the cgroup quota (rounded up: 1.5 cores lets two
    threads run most of the time, as Go and the JVM count it) and, when set,
    SLURM_CPUS_PER_TASK and OMP_NUM_THREADS.
    """
    affinity = len(_affinity())
    quota = cgroup_quota()
    slurm, omp = _env_count("SLURM_CPUS_PER_TASK"), _env_count("OMP_NUM_THREADS")
    counts = [affinity] + [c for c in (quota and max(1, math.ceil(quota - 1e-9)), slurm, omp) if c]
    why = (f"affinity {affinity}, cgroup quota {'none' if quota is None else f'{quota:g}'}, "
           f"SLURM_CPUS_PER_TASK {slurm or 'unset'}, OMP_NUM_THREADS {omp or 'unset'}")
    return max(1, min(counts)), why


def available_cpus() -> int:
    """CPUs this process may actually use (see `cpu_budget`)."""
    return cpu_budget()[0]


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from /proc/stat; None where it is unreadable."""
    busy = total = 0
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def busy_elsewhere(seconds: float = 0.2) -> float:
    """Cores of our affinity mask that other processes kept busy over ``seconds`` (0.0 where
    /proc/stat is unreadable). Our own CPU time in the window is not counted."""
    cpus = _affinity()
    before, own0 = _cpu_jiffies(cpus), time.process_time()
    time.sleep(seconds)
    after, own1 = _cpu_jiffies(cpus), time.process_time()
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    busy_fraction = (after[0] - before[0]) / (after[1] - before[1])
    # the window as /proc/stat counted it (jiffies per CPU), so both terms use one clock
    window = (after[1] - before[1]) / len(cpus) / os.sysconf("SC_CLK_TCK")
    own_cores = (own1 - own0) / window
    return max(0.0, busy_fraction * len(cpus) - own_cores)


def default_threads(sample_seconds: float = 0.2) -> tuple[int, str]:
    """(torch threads to use by default, why): the budget less the cores busy elsewhere,
    never below 1. A core counts as taken from half a core's use on (rounded): an OpenMP
    team slows to its slowest thread, so a half-taken core already costs more than it gives.
    Explicit thread settings (OMP_NUM_THREADS, SLURM) are the budget and are not sampled."""
    budget, why = cpu_budget()
    if budget == 1 or _env_count("OMP_NUM_THREADS"):
        return budget, why
    others = busy_elsewhere(sample_seconds)
    threads = max(1, min(budget, budget - math.floor(others + 0.5)))
    return threads, (f"{why}; {others:.1f} cores busy elsewhere -> {threads} "
                     f"thread{'' if threads == 1 else 's'}")


def resolve_threads(threads: int | None) -> int:
    """``--threads``: an explicit value (at least 1), else `default_threads`."""
    return choose_threads(threads)[0]


def choose_threads(threads: int | None) -> tuple[int, str]:
    """(``--threads`` resolved, why) for a command's log: an explicit value (at least 1) is
    taken as given; None follows `default_threads`."""
    if threads is None:
        return default_threads()
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    return threads, "--threads"


def configure_openmp_env() -> bool:
    """Not part of the default rule: measured passive waiting (OMP_WAIT_POLICY=PASSIVE,
    GOMP_SPINCOUNT=0) did not make 2 threads on a loaded core fast and slowed quiet runs
    (docs/benchmarks.md, tools/bench_threads.py). Kept for users who want it explicitly:
    sets OMP_WAIT_POLICY=PASSIVE unless the user set a policy; it must run before torch is
    imported (OpenMP reads it once), so it returns False, changing nothing, when it is late."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` torch CPU threads (None: leave them), then restore them.

    None keeps the caller's setting on purpose: a library call must not override what a
    Python user set with ``torch.set_num_threads``; the CLI resolves None by the rule
    (`choose_threads`) and passes the count, and tests pin one thread around calls."""
    import torch

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_beside_writer(threads: int | None, device: torch.device, writers: int = 1) -> int | None:
    """Torch threads for a CPU forward pass that ``writers`` compressing threads run beside.

    Explicit ``threads`` win. On CPU the default leaves a core to each writer: torch's
    OpenMP threads wait for each other at every operation, so one of them descheduled
    by a writer stalls them all (SmolLM2 capture on 2 cores: 35.5 s with 2 threads,
    29.6 s with 1, as fast as the plain forward on 1). The cores are the caller's torch
    setting (the CLI sets it by the thread rule, `choose_threads`), so the load is sampled
    once per command. On CUDA the CPU is left alone.
    """
    import torch

    if threads is not None or device.type != "cpu":
        return threads
    return max(1, torch.get_num_threads() - writers)


def resumed_threads(recorded: int | None, explicit: int | None, current: int,
                    what: str) -> tuple[int, str]:
    """(torch threads a resumed stage computes with, a one-line note or '').

    A QR or a matmul may round differently on another thread count, so a stage that resumes
    keeps the count it started with (``recorded``, from its state) and its result is the
    bit-identical one of an uninterrupted run, however the load changed the default count
    since. ``explicit`` (``--threads`` given) wins; ``current`` is the count otherwise in
    force (the CLI's default, or the caller's torch setting); ``what`` names the state."""
    if explicit is not None:
        if recorded is not None and recorded != explicit:
            return explicit, (f"note: {what} was started with {recorded} thread"
                              f"{'' if recorded == 1 else 's'}; --threads {explicit} may change "
                              f"the last bits of its results (leave --threads out to keep "
                              f"{recorded})")
        return explicit, ""
    if recorded is None or recorded < 1 or recorded == current:
        return current, ""
    return recorded, (f"note: resuming {what} with the {recorded} thread"
                      f"{'' if recorded == 1 else 's'} it was started with (not {current}), so "
                      f"it ends with the same bits as an uninterrupted run; --threads N overrides")


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``; nothing elsewhere).

    Loops that allocate large temporaries beside small long-lived tensors (the gradient
    passes: a window's activations, then its few kilobytes of scores) fragment glibc's heap:
    its mmap threshold adapts upward to the freed sizes, the temporaries come from the heap,
    and the small tensors left between them keep it from shrinking, so the resident size
    grew by about a block's activations per block (SmolLM2's block-by-block pass: 0.9 ->
    2.8 GB over 30 blocks at 8 windows; 0.5-0.8 GB with this call after each block, for
    about 1 % more CPU). A fixed mmap threshold stops it too, but cost 30 % more CPU there.
    """
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            import ctypes
            import ctypes.util

            try:
                _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
                _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None
