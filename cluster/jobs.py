"""The Ray Jobs API client behind `knnlm submit`, `status` and `logs` (their output: cluster/job_commands.py):
a pipeline as a Ray job on an existing cluster.

`knnlm submit PIPELINE.yaml --address http://HEAD:8265` hands the pipeline to the cluster's
Ray Jobs API and follows its log. The job runs `knnlm run` on the cluster, so it outlives
the submitting terminal: Ctrl-C or a lost connection stops following, never the job.

Why these choices:
- **The Jobs API, not `ray.init`.** A job's driver runs on the head node, so a laptop that
  goes to sleep does not kill a day-long build. Hence `--address` here is the dashboard's
  HTTP URL (as `ray job submit --address` takes it), unlike every other subcommand.
- **A `working_dir` runtime env** with this package's three source folders and the resolved
  pipeline file, nothing else (kilobytes): the cluster runs the submitter's code, on the driver
  and on every worker. The cluster needs the dependencies (torch, faiss, ...) installed, as for
  `--address` elsewhere.
- **The job's driver** (`python -m cluster.job_driver`) connects to its own cluster
  first and then runs `knnlm run` on the file with `address: auto`: the stages run in cluster
  mode, as `knnlm run --address auto` on the head node would.
- **No environment variables are shipped.** Credentials stay where they are: the job reads
  storage with the cluster's own credential chain (instance role, its env), never with the
  submitter's AWS_* or tokens. The entrypoint holds only a file name: Ray logs it.
- **A deterministic job id** from the datastore URI and a hash of the resolved pipeline:
  resubmitting a pipeline whose job succeeded does nothing, resubmitting one that is running
  follows the running job, and two concurrent submissions of the same file collide on the id
  instead of running twice. A *different* pipeline for the same datastore gets its own job,
  which the build's lease refuses while the first one runs.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from urllib.parse import urlparse

from builder.runtime import ClusterError, package_dirs
from cluster.config import DEFAULT_JOBS_ADDRESS
from cluster.pipeline_file import load_pipeline

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.yaml"                     # the resolved file, at the root of the job's working_dir
DRIVER = "cluster.job_driver"                       # the job's entrypoint module; -u: its log streams as written
ENTRYPOINT = f"python -u -m {DRIVER} {PIPELINE_FILE}"
META_PIPELINE = "knnlm_pipeline"                    # job metadata: the pipeline key (job id without attempt)
META_DATASTORE = "knnlm_datastore"
ACTIVE = ("PENDING", "RUNNING")


# ---------------------------------------------------------------------------------------------
# the Jobs API client


def jobs_address(address: str | None) -> str:
    """The Jobs API URL: the flag, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS (as Ray's own job CLI
    reads them), else the local default. A bare HOST:PORT is taken as http://HOST:PORT; ray.init-only
    forms (auto, ray://) are refused here with what to give instead."""
    source = "--address"
    addr = address
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if not addr and os.environ.get(var):
            source, addr = f"${var}", os.environ[var]
    addr = (addr or DEFAULT_JOBS_ADDRESS).strip().rstrip("/")
    if addr in ("auto", "local") or "://" in addr and not addr.startswith(("http://", "https://")):
        raise ClusterError(f"{source} {addr}: knnlm submit/status/logs need the Jobs API URL of the cluster's "
                           "dashboard, e.g. --address http://HEAD:8265 (what `ray job submit --address` takes), "
                           "not a ray.init address")
    if "://" not in addr:
        addr = "http://" + addr
    u = urlparse(addr)
    if not u.hostname:
        raise ClusterError(f"--address {addr}: not a URL; give the dashboard's, e.g. http://HEAD:8265")
    return addr


def no_answer(addr: str, why: str) -> ClusterError:
    return ClusterError(
        f"--address {addr}: the Ray Jobs API does not answer ({why}). --address must be the URL of the cluster's "
        "dashboard, http://HEAD:8265 (as `ray job submit --address` takes it), not the ray.init address HEAD:6379. "
        "Check that the cluster is up (`ray status` on the head node), that it runs the dashboard (`ray start --head "
        "--include-dashboard=true --dashboard-host=0.0.0.0`; needs `ray[default]`), and that its port is reachable "
        "from here (e.g. `ssh -L 8265:localhost:8265 HEAD` and --address http://127.0.0.1:8265)")


def _local_auth_token() -> str | None:
    """The cluster token as Ray's own clients find it: $RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token. Only ever sent in an HTTP header to a Jobs API that asked for it."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), os.path.expanduser("~/.ray/auth_token")):
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                tok = f.read().strip()
            if tok:
                return tok
    return None


def connect_jobs(address: str | None, timeout: float = 10.0):
    """A JobSubmissionClient for `address` (see jobs_address), or a ClusterError saying what to check.

    Recent Ray versions turn token authentication on by default, but Ray's client sends the token
    only when RAY_AUTH_MODE=token is set in *this* process, which a laptop rarely has. So a first
    refusal (401) is retried once with the local token (see _local_auth_token)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    addr = jobs_address(address)
    if not log.isEnabledFor(logging.DEBUG):     # Ray's client logs each upload and websocket close at INFO
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):
            logging.getLogger(name).setLevel(logging.WARNING)
    u = urlparse(addr)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:  # a quick probe: requests has no connect timeout here, and a firewalled port would hang for minutes
        socket.create_connection((u.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise no_answer(addr, getattr(e, "strerror", None) or str(e) or type(e).__name__) from None

    def make(headers):
        try:
            return JobSubmissionClient(addr, headers=headers)
        except AuthenticationError:
            raise
        except ConnectionError:     # the port is open (probed above) but no HTTP answers there
            raise ClusterError(f"--address {addr}: something listens there, but not the Ray Jobs API (is it the "
                               "ray.init/GCS port, 6379?); give the URL of the cluster's dashboard, "
                               "http://HEAD:8265") from None
        except Exception as e:
            raise ClusterError(f"--address {addr}: answers, but not as a Ray Jobs API: {short_error(e)}; give the "
                               "URL of the cluster's dashboard, http://HEAD:8265") from None
    try:
        return make(None)
    except AuthenticationError:
        pass
    token = _local_auth_token()
    if token is None:
        raise ClusterError(f"--address {addr}: the cluster uses token authentication and no token was found here: "
                           "copy the head's token (`ray get-auth-token` on the head) to ~/.ray/auth_token, or set "
                           "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")
    try:
        return make({"Authorization": f"Bearer {token}"})
    except AuthenticationError:
        raise ClusterError(f"--address {addr}: the cluster refused this machine's Ray auth token (~/.ray/auth_token, "
                           "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN): copy the head's token (`ray get-auth-token` on "
                           "the head)") from None


def short_error(e: BaseException) -> str:
    """A Jobs API error without the server's traceback: its last meaningful line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "."]
    return lines[-1].rstrip(".") if lines else type(e).__name__


def job_info(client, job_id: str, addr: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise ClusterError(f"no job {job_id!r} on the cluster at {addr}; `knnlm status --address {addr}` lists "
                               "knnlm's jobs there") from None
        raise ClusterError(f"--address {addr}: cannot read job {job_id}: {short_error(e)}") from None
    except (ConnectionError, OSError) as e:
        raise no_answer(addr, short_error(e)) from None


# ---------------------------------------------------------------------------------------------
# submitting a pipeline


def load_for_submit(pipeline_path: str):
    """The pipeline as the job will run it, its keys and values checked here first: config errors
    show on the user's terminal, not in a job log. Relative paths are resolved against the file's
    folder (as `knnlm run` does) and written out absolute, since the job runs in another folder.
    The inputs it names are not checked here: they must exist on the cluster (or be s3:// URIs),
    and the job's `knnlm run` checks them there, before any work. The address is `auto`: the
    cluster the job runs on."""
    return load_pipeline(pipeline_path, "auto", check_inputs=False)


def pipeline_key(p) -> str:
    """knnlm-<datastore name>-<12 hex of the resolved pipeline without its address>: the same resolved
    pipeline (its paths absolute, its URIs as given) is the same job, whoever submits it."""
    spec = p.resolved()
    spec.pop("address", None)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = re.sub(r"[^a-z0-9]+", "-", p.datastore.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-")[:32]
    return f"knnlm-{name or 'datastore'}-{digest}"


def stage_working_dir(p, dest: str) -> str:
    """Fill `dest` with what the job needs: the project's source folders (builder.runtime.package_dirs,
    only .py files) and the resolved pipeline as PIPELINE_FILE. Returns dest."""
    import yaml

    def not_source(folder, names):
        return [n for n in names if n == "__pycache__"
                or not (n.endswith(".py") or os.path.isdir(os.path.join(folder, n)))]

    for src in package_dirs():
        shutil.copytree(src, os.path.join(dest, os.path.basename(src)), ignore=not_source)
    with open(os.path.join(dest, PIPELINE_FILE), "w", encoding="utf-8") as f:
        f.write(f"# resolved by knnlm submit from {os.path.basename(p.source)}\n")
        yaml.safe_dump(p.resolved(), f, sort_keys=False)
    return dest


def job_runtime_env(working_dir: str) -> dict:
    """The job's runtime env: the staged folder, and deliberately no env_vars (see the module doc)."""
    return {"working_dir": working_dir}


def knnlm_jobs(client, key: str | None = None) -> list:
    """The cluster's jobs submitted by knnlm (all, or those of one pipeline key), oldest first."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(META_PIPELINE)
            and (key is None or j.metadata[META_PIPELINE] == key)]
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or ""))


def submit_pipeline(pipeline_path: str, address: str | None, rerun: bool = False,
                    verbose: bool = False) -> tuple[str, str, object]:
    """Submit the pipeline unless the cluster already has it. Returns (what, job_id, client) where
    what is 'submitted', 'running' (an earlier job of the same pipeline is pending or running) or
    'done' (one succeeded; with rerun=True a new job is submitted anyway). verbose: the job logs
    at debug level."""
    p = load_for_submit(pipeline_path)
    client = connect_jobs(address)
    addr = jobs_address(address)
    key = pipeline_key(p)
    try:
        earlier = knnlm_jobs(client, key)
    except (ConnectionError, OSError, RuntimeError) as e:
        raise ClusterError(f"--address {addr}: cannot list the cluster's jobs: {short_error(e)}") from None
    statuses = {j.submission_id: str(j.status.value) for j in earlier}
    for j in reversed(earlier):
        if statuses[j.submission_id] in ACTIVE:
            return "running", j.submission_id, client
    done = [j for j in earlier if statuses[j.submission_id] == "SUCCEEDED"]
    if done and not rerun:
        return "done", done[-1].submission_id, client
    job_id = key
    n = len(earlier) + 1
    while job_id in statuses:       # earlier attempts failed or were stopped: knnlm-...-2, -3, ...
        job_id = f"{key}-{n}"
        n += 1
    with tempfile.TemporaryDirectory(prefix="knnlm-job-") as tmp:
        wd = stage_working_dir(p, os.path.join(tmp, "job"))
        try:
            client.submit_job(entrypoint=ENTRYPOINT.replace(f" {DRIVER} ", f" {DRIVER} -v ") if verbose
                              else ENTRYPOINT, submission_id=job_id, runtime_env=job_runtime_env(wd),
                              metadata={META_PIPELINE: key, META_DATASTORE: p.datastore})
        except RuntimeError as e:
            if "already exists" in str(e):     # a concurrent submission of the same pipeline won the id
                return "running", job_id, client
            raise ClusterError(f"--address {addr}: the cluster refused the job: {short_error(e)}") from None
        except (ConnectionError, OSError) as e:
            raise no_answer(addr, short_error(e)) from None
    log.debug("submitted %s as job %s to %s", pipeline_path, job_id, addr)
    return "submitted", job_id, client


# ---------------------------------------------------------------------------------------------
# following a job


def follow_job(client, job_id: str, addr: str, out=None, reconnect_s: float = 30.0) -> object:
    """Stream the job's log to `out` (stdout) until it ends; returns its final JobDetails. A dropped
    stream is reopened (skipping what was already shown) for up to reconnect_s, then a ClusterError
    says the job goes on and how to follow it again. Ctrl-C propagates (the caller says the same)."""
    out = out or sys.stdout
    shown = 0

    async def tail():
        nonlocal shown
        seen = 0
        async for chunk in client.tail_job_logs(job_id):
            new = chunk[max(0, shown - seen):]
            seen += len(chunk)
            if new:
                out.write(new)
                out.flush()
                shown += len(new)

    lost_since = None
    while True:
        err = None
        try:
            asyncio.run(tail())
        except Exception as e:      # aiohttp errors, a closed socket, a restarted dashboard
            err = e
        try:
            info = client.get_job_info(job_id)
        except Exception as e:
            info, err = None, err or e
        if info is not None and info.status.is_terminal():
            return _settled(client, job_id, info)
        if info is not None and err is None:
            lost_since = None
            time.sleep(1.0)          # the stream ended early but the job runs: reopen it
            continue
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > reconnect_s:
            raise ClusterError(f"lost the connection to {addr} while following job {job_id} ({short_error(err)}); "
                               f"the job keeps running on the cluster. Follow it again: {logs_command(job_id, addr)} "
                               "--follow")
        log.debug("following %s: %s; retrying", job_id, err)
        time.sleep(2.0)


def _settled(client, job_id: str, info):
    """The job's details once its final message is in (the log stream can end a moment before)."""
    for _ in range(10):
        if info.status.is_terminal() and info.end_time:
            return info
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    return info


def logs_command(job_id: str, addr: str) -> str:
    return f"knnlm logs {job_id} --address {addr}"


def failure_message(client, info, addr: str, tail_lines: int = 0) -> str:
    """What a failed or stopped job says: the cluster's own error (knnlm's `error:` line, else Ray's
    message), optionally the last lines of its log, and where to read the rest."""
    job_id = info.submission_id
    try:
        logs = client.get_job_logs(job_id)
    except (RuntimeError, ConnectionError, OSError):   # the message still says where to look
        logs = ""
    lines = logs.rstrip().splitlines()
    errors = [ln for ln in lines if re.match(r"knnlm [\w-]+: error: ", ln)]
    if not errors:
        errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b.*: ", ln)]
    ray_message = (info.message or "").strip().splitlines()
    reason = errors[-1] if errors else ray_message[0] if ray_message else "no message"
    if info.driver_exit_code not in (None, 0):
        why = f" (exit code {info.driver_exit_code})"
    else:                                   # e.g. RUNTIME_ENV_SETUP_FAILED: the code never ran
        why = f" ({info.error_type})" if getattr(info, "error_type", None) else ""
    msg = f"job {job_id} {info.status.value} on the cluster{why}: {reason}"
    if tail_lines and lines:
        msg += "\nlast lines of its log:\n" + "\n".join("  " + ln for ln in lines[-tail_lines:])
    msg += (f"\nthe whole log: {logs_command(job_id, addr)}, the Ray dashboard's Jobs tab at {addr}, or on the "
            f"head node /tmp/ray/session_latest/logs/job-driver-{job_id}.log (Ray's default temp dir)")
    return msg
