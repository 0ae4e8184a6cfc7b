"""What the benchmarks share: writing a result file with the machine and the load average; a process's peak RSS."""
from __future__ import annotations

import datetime
import json
import os
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_result(kind: str, device: str, machine: dict, load_before: tuple, params: dict, figures: dict,
                 seconds: float, where: str | None = None) -> tuple[Path, dict]:
    """bench/results/<kind>-<device>-<date>.json (or `where`: a file or a directory); returns (path, result)."""
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "parameters": params,
              "figures": figures, "bench_seconds": seconds, "argv": sys.argv}
    name = f"{kind}-{device}-{datetime.date.today().isoformat()}.json"
    path = HERE / "results" / name
    if where:
        path = Path(where) / name if Path(where).is_dir() else Path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path, result


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since its exec: VmHWM from /proc/self/status.

    Not ru_maxrss: on Linux, exec folds the high-water mark of the address space it replaces into the
    process's ru_maxrss, and a child that Python's subprocess vforks shares its parent's address space
    until exec, so a child of a 3.6 GB pytest reports >= 3.6 GB whatever it does (CI, stop 24).
    ru_maxrss only where there is no /proc (macOS, whose ru_maxrss is in bytes)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (1 << 20) if sys.platform == "darwin" else r / 1024


# ---------------------------------------------------------------------------------------------
# /proc: another process's memory, its title, the processes under it (Linux)

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> dict[str, float] | None:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process in MiB (None if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in STATUS_FIELDS:
                    out[k] = int(v.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out


def proc_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def descendants(root: int) -> list[int]:
    """Every live process under `root` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def reset_hwm(pid: int) -> None:
    """VmHWM := the current VmRSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
