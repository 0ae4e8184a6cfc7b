"""The driver of a job that `knnlm submit` started: `python -u -m cluster.job_driver [-v] pipeline.yaml`
in the job's working_dir (cluster/jobs.py stages it and names this module in the entrypoint).

It connects to the cluster it runs on *before* `knnlm run`, so that `ray_session` reuses this
connection: the job's runtime env already ships the project's code to every worker, so the
py_modules runtime env that `connect_ray` would add is not wanted (a second upload of the same
folders, and a runtime env Ray would have to merge with the job's)."""
from __future__ import annotations

import logging
import os
import sys

from cluster.cli import main


def job_main(argv: list[str]) -> int:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=True)
    flags = [x for x in argv if x == "-v"]
    return main(flags + ["run"] + [x for x in argv if x != "-v"])


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
