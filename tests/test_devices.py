"""coala_stream.devices: the CPU budget (affinity, cgroup quota, SLURM, OMP), the load-aware
default thread count, --threads errors, and the thread count beside capture's writers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coala_stream import devices
from coala_stream.errors import UsageError


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A fake node: 4 CPUs in the affinity mask, an empty cgroup tree at tmp_path, no env."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(devices, "CGROUP_ROOT", root)
    monkeypatch.setattr(devices, "PROC_SELF_CGROUP", tmp_path / "self-cgroup")
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)

    def cgroup(self_line: str, files: dict[str, str]) -> None:
        (tmp_path / "self-cgroup").write_text(self_line + "\n")
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text + "\n")

    return cgroup


def test_affinity_alone(node):
    assert devices.cpu_budget() == (4, "affinity 4, cgroup quota none, SLURM_CPUS_PER_TASK unset, "
                                       "OMP_NUM_THREADS unset")
    assert devices.available_cpus() == 4


def test_cgroup_v2_quota_rounds_up(node):
    node("0::/", {"cpu.max": "150000 100000"})
    assert devices.cpu_budget()[0] == 2
    assert "cgroup quota 1.5" in devices.cpu_budget()[1]


def test_cgroup_v2_parent_quota_limits_the_child(node):
    node("0::/job/step", {"job/cpu.max": "100000 100000", "job/step/cpu.max": "max 100000"})
    assert devices.available_cpus() == 1


def test_cgroup_v2_max_is_no_limit(node):
    node("0::/", {"cpu.max": "max 100000"})
    assert devices.cgroup_quota() is None
    assert devices.available_cpus() == 4


def test_cgroup_v1_cfs_quota(node):
    node("5:cpu,cpuacct:/slurm/job1", {"cpu,cpuacct/slurm/job1/cpu.cfs_quota_us": "300000",
                                       "cpu,cpuacct/slurm/job1/cpu.cfs_period_us": "100000"})
    assert devices.available_cpus() == 3


def test_cgroup_v1_unlimited_and_missing_path_fall_back_to_the_root(node):
    # in a container without a cgroup namespace the listed path does not exist
    node("2:cpu:/docker/abc", {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"})
    assert devices.available_cpus() == 2
    node("2:cpu:/", {"cpu/cpu.cfs_quota_us": "-1"})
    assert devices.cgroup_quota() is None


@pytest.mark.parametrize("name, value, expected", [
    ("SLURM_CPUS_PER_TASK", "3", 3), ("OMP_NUM_THREADS", "2,1", 2),
    ("OMP_NUM_THREADS", "16", 4),  # never more than the affinity mask
    ("SLURM_CPUS_PER_TASK", "lots", 4), ("OMP_NUM_THREADS", "0", 4),  # unusable: ignored
])
def test_env_caps(node, monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    assert devices.available_cpus() == expected


def _stat(*cpus: tuple[int, int]) -> str:
    """A /proc/stat with (busy, idle) jiffies per CPU; cpu2 is outside our affinity mask."""
    lines = ["cpu  1 2 3 4 5 6 7 8 9 10"]
    lines += [f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0" for i, (busy, idle) in enumerate(cpus)]
    return "\n".join(lines + ["intr 12345", ""])


def test_busy_elsewhere_counts_other_processes_on_our_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(_stat((100, 100), (100, 100), (0, 0)))
    monkeypatch.setattr(devices, "PROC_STAT", stat)
    monkeypatch.setattr(devices, "_affinity", lambda: {0, 1})
    # in the window cpu0 is fully busy (someone else's loop), cpu1 idle, cpu2 is not ours
    fake_sleep = lambda s: stat.write_text(_stat((120, 100), (100, 120), (500, 0)))
    monkeypatch.setattr(devices.time, "sleep", fake_sleep)
    assert devices.busy_elsewhere(0.2) == pytest.approx(1.0, abs=0.2)


def test_busy_elsewhere_without_proc_stat(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "PROC_STAT", tmp_path / "missing")
    assert devices.busy_elsewhere(0.01) == 0.0


@pytest.mark.parametrize("budget, others, expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 1.0, 1), (2, 1.9, 1), (2, 2.0, 1), (4, 1.0, 3), (4, 2.6, 1),
])
def test_default_threads_leaves_the_busy_cores(node, monkeypatch, budget, others, expected):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(budget))
    monkeypatch.setattr(devices, "busy_elsewhere", lambda seconds=0.2: others)
    threads, why = devices.default_threads()
    assert threads == expected
    assert why.endswith(f"{others:.1f} cores busy elsewhere -> {expected} "
                        f"thread{'' if expected == 1 else 's'}")


def test_default_threads_trusts_omp_num_threads(node, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(devices, "busy_elsewhere", lambda seconds=0.2: pytest.fail("sampled"))
    assert devices.default_threads()[0] == 3


def test_resolve_threads(node, monkeypatch):
    monkeypatch.setattr(devices, "busy_elsewhere", lambda seconds=0.2: 1.0)
    assert devices.resolve_threads(None) == 3
    assert devices.resolve_threads(7) == 7  # explicit wins, even above the budget
    for bad in (0, -2):
        with pytest.raises(UsageError, match="--threads must be at least 1"):
            devices.resolve_threads(bad)


def test_torch_threads_keeps_none_and_rejects_zero():
    import torch

    before = torch.get_num_threads()
    with devices.torch_threads(None):
        assert torch.get_num_threads() == before
    with devices.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(UsageError, match="--threads"):
        with devices.torch_threads(0):
            pass


def test_threads_beside_writer_leaves_the_writers_cores_of_the_callers_threads():
    import torch

    cpu = torch.device("cpu")
    with devices.torch_threads(4):  # what the CLI set by the rule
        assert devices.threads_beside_writer(None, cpu) == 3
        assert devices.threads_beside_writer(None, cpu, writers=8) == 1
        assert devices.threads_beside_writer(2, cpu) == 2
        assert devices.threads_beside_writer(None, torch.device("cuda")) is None


def test_choose_threads_says_why(node, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    monkeypatch.setattr(devices, "busy_elsewhere", lambda seconds=0.2: pytest.fail("sampled"))
    assert devices.choose_threads(None) == (1, "affinity 4, cgroup quota none, "
                                               "SLURM_CPUS_PER_TASK 1, OMP_NUM_THREADS unset")
    assert devices.choose_threads(5) == (5, "--threads")


def test_configure_openmp_env(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "x")
    monkeypatch.delenv("OMP_WAIT_POLICY")  # recorded, so the test's setting is undone after
    assert devices.configure_openmp_env() is False  # torch is imported: too late, nothing set
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert devices.configure_openmp_env() is True
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"])
def test_resolve_threads_in_a_fresh_process(name):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    env[name] = "1"
    code = "from coala_stream.devices import resolve_threads; print(resolve_threads(None))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert res.stdout.strip() == "1"


def test_release_free_memory_returns_a_fragmented_heap_to_the_os():
    """The gradient passes' pattern in a fresh process: large temporaries freed between
    small blocks that stay; the resident size falls once the free pages are given back
    (glibc; elsewhere the call is a no-op and the test is skipped). The heap is built with
    libc's malloc itself, the mmap threshold fixed above the large blocks' size: torch's
    tensors of a few MiB land in the heap or in their own mmap by glibc's dynamic threshold,
    so a heap made of them is fragmented in some runs only."""
    import ctypes.util
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or "musl" in (ctypes.util.find_library("c") or ""):
        pytest.skip("malloc_trim is glibc's")
    code = (
        "import ctypes, ctypes.util\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "assert libc.mallopt(-3, 32 << 20) == 1  # M_MMAP_THRESHOLD (its maximum): 3 MiB blocks in the heap\n"
        "def rss(): return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
        "keep, big = [], []\n"
        "for i in range(100):\n"
        "    big.append(libc.malloc(3 << 20)); ctypes.memset(big[-1], 1, 3 << 20)\n"
        "    keep.append(libc.malloc(2048))\n"
        "for p in big: libc.free(p)\n"
        "before = rss()\n"
        # imported once the heap is made: some of its imports change how glibc's free
        # treats the blocks above (they go back at once), which would leave nothing to trim
        "from coala_stream.devices import release_free_memory\n"
        "release_free_memory(); print(before, rss())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert after < before - 200_000, (before, after)  # over 200 MB of free heap given back
