"""Run one command as a child process and measure it: wall, CPU, max RSS, peak anonymous memory.

* wall: from fork to reaping, ``time.perf_counter``;
* CPU (user + sys) and max RSS: from ``/usr/bin/time`` wrapped around the command (its ``%M %U
  %S``: the child's ``rusage``, covering the descendants it waited for). Without ``/usr/bin/time``,
  the child's own ``rusage`` from ``os.wait4``, whose max RSS also counts the pages the child
  shared with this process between fork and exec (so keep this process small: it never imports
  torch);
* peak anonymous memory: ``RssAnon`` of ``/proc/<pid>/status``, summed over the child and its
  descendants, polled every ``poll_s`` (50 ms). RSS also counts the pages of memory-mapped input
  files, which the kernel can drop at any time; anonymous memory is what can exhaust RAM;
* machine load: the 1-minute load average before the run and the CPU time the rest of the machine
  used during the run (``/proc/stat`` busy time minus the child's), in cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import psutil
except ImportError:  # e.g. a GPU machine's bare python3: fall back to /proc
    psutil = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
TIME = "/usr/bin/time"


@dataclass
class Measurement:
    """One measured run."""

    cmd: list[str]
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_bytes: int
    peak_anon_bytes: int
    peak_file_bytes: int
    load1_before: float
    others_cpu_cores: float
    samples: int
    log: str
    stopped: bool = False  # killed at the timeout: wall and CPU are lower bounds, memory the peak so far

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_s"] = self.cpu_s
        return d


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _status_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of one process in bytes; (0, 0) once it is gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return anon, file


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    if psutil is not None:
        try:
            return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return [pid]
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def run_measured(
    cmd: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    poll_s: float = 0.05,
    timeout_s: float | None = None,
) -> Measurement:
    """Run ``cmd`` (stdout and stderr to ``log_path``) and measure it.

    A run still going after ``timeout_s`` is killed and returned with ``stopped`` set (rc -9).
    """
    load1 = os.getloadavg()[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timefile = log_path.with_suffix(".time")
    timefile.unlink(missing_ok=True)
    use_time = os.access(TIME, os.X_OK)
    wrapped = [TIME, "-f", "%M %U %S", "-o", str(timefile), *cmd] if use_time else list(cmd)
    peak_anon = peak_file = samples = 0
    with open(log_path, "wb") as log:
        busy0 = busy_seconds()
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = file = 0
            for p in _tree(proc.pid):
                a, f = _status_kb(p)
                anon += a
                file += f
            peak_anon = max(peak_anon, anon)
            peak_file = max(peak_file, file)
            samples += 1
            if timeout_s is not None and time.perf_counter() - start > timeout_s:
                return _stop(proc, cmd, log_path, start, busy0, load1, (peak_anon, peak_file, samples))
            time.sleep(poll_s)
        wall = time.perf_counter() - start
        busy = busy_seconds() - busy0
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting
    user, sys_, maxrss = ru.ru_utime, ru.ru_stime, ru.ru_maxrss * 1024
    if use_time and timefile.exists():
        try:
            kb, u, s = timefile.read_text().strip().splitlines()[-1].split()
            maxrss, user, sys_ = int(kb) * 1024, float(u), float(s)
        except (ValueError, IndexError):
            pass
    cpu = user + sys_
    return Measurement(
        cmd=[str(c) for c in cmd],
        rc=proc.returncode,
        wall_s=wall,
        user_s=user,
        sys_s=sys_,
        max_rss_bytes=maxrss,
        peak_anon_bytes=peak_anon,
        peak_file_bytes=peak_file,
        load1_before=load1,
        others_cpu_cores=max(0.0, (busy - cpu) / wall) if wall > 0 else 0.0,
        samples=samples,
        log=str(log_path),
    )


def _cpu_of_tree(pid: int) -> tuple[float, float]:
    """(user, sys) seconds of ``pid`` and its descendants so far (/proc/<pid>/stat)."""
    user = sys_ = 0.0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / CLK_TCK
            sys_ += int(fields[12]) / CLK_TCK
        except (OSError, ValueError, IndexError):
            pass
    return user, sys_


def _stop(proc: subprocess.Popen, cmd: list[str], log_path: Path, start: float, busy0: float, load1: float,
          peaks: tuple[int, int, int]) -> Measurement:
    """Kill a run that reached its timeout; what it used so far, marked ``stopped``."""
    user, sys_ = _cpu_of_tree(proc.pid)
    for p in reversed(_tree(proc.pid)):
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
    os.wait4(proc.pid, 0)
    proc.returncode = -9
    wall = time.perf_counter() - start
    busy = busy_seconds() - busy0
    anon, file, samples = peaks
    return Measurement(cmd=[str(c) for c in cmd], rc=-9, wall_s=wall, user_s=user, sys_s=sys_,
                       max_rss_bytes=anon + file, peak_anon_bytes=anon, peak_file_bytes=file, load1_before=load1,
                       others_cpu_cores=max(0.0, (busy - user - sys_) / wall), samples=samples, log=str(log_path),
                       stopped=True)


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (up to ``max_wait_s``) until the 1-minute load average is at most ``max_load``.

    Returns:
        The load average when the wait ended.
    """
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load > max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def read_files(paths: list[Path], chunk: int = 16 << 20) -> int:
    """Read files fully (to warm the page cache or to time reading); returns the bytes read."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total
