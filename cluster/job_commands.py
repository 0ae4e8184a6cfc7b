"""`knnlm submit`, `knnlm status`, `knnlm logs`: what they print (the Jobs API client is cluster/jobs.py).
Each handler takes its command's options (cluster/config.py)."""
from __future__ import annotations

import json
import sys
import time

from builder.runtime import ClusterError
from cluster.config import LogsConfig, StatusConfig, SubmitConfig
from cluster.jobs import (
    META_DATASTORE,
    connect_jobs,
    failure_message,
    follow_job,
    job_info,
    jobs_address,
    knnlm_jobs,
    logs_command,
    no_answer,
    short_error,
    submit_pipeline,
)


def _finish(client, info, addr: str, followed: bool) -> int:
    """Exit status of a finished job: 0 if it succeeded, else a ClusterError with its error."""
    took = f" in {(info.end_time - info.start_time) / 1000:.0f}s" if info.end_time and info.start_time else ""
    if info.status.value == "SUCCEEDED":
        ds = (info.metadata or {}).get(META_DATASTORE)
        print(f"job {info.submission_id} SUCCEEDED{took}" + (f": {ds}" if ds else ""), file=sys.stderr)
        return 0
    raise ClusterError(failure_message(client, info, addr, tail_lines=0 if followed else 20))


def _follow_or_hint(client, job_id: str, addr: str) -> int:
    print(f"following job {job_id} (Ctrl-C stops following, not the job)", file=sys.stderr)
    try:
        info = follow_job(client, job_id, addr)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster.\n"
              f"  follow it again: {logs_command(job_id, addr)} --follow\n"
              f"  its status:      knnlm status {job_id} --address {addr}\n"
              f"  stop it:         ray job stop {job_id} --address {addr}", file=sys.stderr)
        return 130
    return _finish(client, info, addr, followed=True)


# ---------------------------------------------------------------------------------------------
# the subcommands


def submit(a: SubmitConfig) -> int:
    what, job_id, client = submit_pipeline(a.pipeline, a.address, rerun=a.rerun, verbose=a.verbose)
    addr = jobs_address(a.address)
    if what == "done":
        print(f"nothing to do: job {job_id} already ran this pipeline and SUCCEEDED "
              f"(see {logs_command(job_id, addr)}; --rerun submits it again)")
        return 0
    print(job_id)                                   # stdout: the id alone, for scripts
    if what == "running":
        print(f"job {job_id} is already running this pipeline on {addr}; not submitting it again", file=sys.stderr)
    else:
        print(f"submitted {a.pipeline} to {addr} as job {job_id}", file=sys.stderr)
    if not a.follow:
        print(f"follow it: {logs_command(job_id, addr)} --follow", file=sys.stderr)
        return 0
    return _follow_or_hint(client, job_id, addr)


def status(a: StatusConfig) -> int:
    client = connect_jobs(a.address)
    addr = jobs_address(a.address)
    if a.job_id is None:
        jobs = knnlm_jobs(client)
        if a.json:
            print(json.dumps([_as_json(j) for j in jobs], indent=1))
            return 0
        if not jobs:
            print(f"no knnlm jobs on {addr}")
        width = max([len(j.submission_id) for j in jobs] or [0])
        for j in jobs:
            print(f"{j.submission_id:<{width}}  {j.status.value:<9}  {_when(j.start_time)}  "
                  f"{(j.metadata or {}).get(META_DATASTORE, '')}")
        return 0
    info = job_info(client, a.job_id, addr)
    if a.json:
        print(json.dumps(_as_json(info), indent=1))
        return 0
    print(f"{info.submission_id}: {info.status.value}")
    meta = info.metadata or {}
    if meta.get(META_DATASTORE):
        print(f"  datastore: {meta[META_DATASTORE]}")
    print(f"  started:   {_when(info.start_time)}" + (f", ended {_when(info.end_time)}" if info.end_time else ""))
    if info.status.value in ("FAILED", "STOPPED"):
        print("  " + failure_message(client, info, addr).replace("\n", "\n  "))
    elif info.message:
        print(f"  message:   {info.message.strip().splitlines()[0]}")
    return 0


def logs(a: LogsConfig) -> int:
    client = connect_jobs(a.address)
    addr = jobs_address(a.address)
    info = job_info(client, a.job_id, addr)
    if a.follow and not info.status.is_terminal():
        return _follow_or_hint(client, a.job_id, addr)
    try:
        sys.stdout.write(client.get_job_logs(a.job_id))
    except (ConnectionError, OSError) as e:
        raise no_answer(addr, short_error(e)) from None
    sys.stdout.flush()
    return _finish(client, info, addr, followed=True) if a.follow else 0


def _as_json(info) -> dict:
    d = info.model_dump(mode="json") if hasattr(info, "model_dump") else info.dict()
    return {k: (v.value if hasattr(v, "value") else v) for k, v in d.items()}


def _when(ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
