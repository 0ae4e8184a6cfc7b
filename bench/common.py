"""What the benchmarks share: writing a result file with the machine and the load average."""
from __future__ import annotations

import datetime
import json
import os
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
