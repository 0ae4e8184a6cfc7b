"""The options of cluster's own commands (`knnlm run`, `submit`, `status`, `logs`, `demo`): each field
is the one definition of its option (see builder/options.py). Light: the parser is built from it."""
from __future__ import annotations

from dataclasses import dataclass

from builder.config import ConfigError
from builder.options import opt

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
JOBS_ADDRESS_HELP = ("the Ray Jobs API URL of the cluster's dashboard, http://HEAD:8265, as `ray job submit --address` "
                     "takes it (here, unlike in the other subcommands, --address is NOT the ray.init/GCS address "
                     "HEAD:6379)")
JOBS_ADDRESS_DEFAULT = f"$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_JOBS_ADDRESS}"


def _jobs_address():
    return opt(None, help=JOBS_ADDRESS_HELP, default_text=JOBS_ADDRESS_DEFAULT)


@dataclass
class RunConfig:
    """`knnlm run PIPELINE.yaml`."""
    pipeline: str = opt(flag="pipeline", metavar="PIPELINE.yaml")
    address: str | None = opt(None, help="a Ray cluster address as ray.init takes it (e.g. auto or ray://head:10001), "
                                         "overriding the file's `address`")
    check: bool = opt(False, help="only read and check the file; print it resolved")
    out: str | None = opt(None, metavar="FILE.json", help="write every stage's summary/result as JSON")


@dataclass
class SubmitConfig:
    """`knnlm submit PIPELINE.yaml`: the pipeline as a Ray job."""
    pipeline: str = opt(flag="pipeline", metavar="PIPELINE.yaml")
    address: str | None = _jobs_address()
    follow: bool = opt(True, flag="--no-follow",
                       help="print the job id and return; follow later with `knnlm logs JOB_ID --follow`")
    rerun: bool = opt(False, help="submit even if a job already ran this pipeline successfully (the stages skip "
                                  "what is done)")
    verbose: bool = opt(False, flag=False)            # the global -v: the job logs at debug level


@dataclass
class StatusConfig:
    """`knnlm status [JOB_ID]`."""
    job_id: str | None = opt(None, flag="job_id", metavar="JOB_ID", argparse_kw={"nargs": "?"})
    address: str | None = _jobs_address()
    json: bool = opt(False, help="the Jobs API's details as JSON")


@dataclass
class LogsConfig:
    """`knnlm logs JOB_ID`."""
    job_id: str = opt(flag="job_id", metavar="JOB_ID")
    address: str | None = _jobs_address()
    follow: bool = opt(False, flag=("-f", "--follow"), help="stream the log until the job ends")


@dataclass
class DemoConfig:
    """`knnlm demo`: the whole product on one machine (cluster/demo.py)."""
    out: str = opt("./knnlm-demo", help="where everything goes (data/, datastore/, pipeline.yaml, plots/, "
                                        "results.json), relative to the current folder")
    model: str | None = opt(None, help="a causal LM (local folder or hub id, e.g. gpt2 where the hub is reachable) "
                                       "instead of training the small GPT-2")
    corpus: list[str] | None = opt(None, metavar="PATH_OR_URI",
                                   help="your text instead of WikiText-2, split by article (' = Title = ' lines) or by "
                                        "blank-line paragraph: i % 10 == 0 -> test, 5 -> valid, else train")
    epochs: float = opt(3.0, help="training epochs of the small GPT-2")
    index_factory: str | None = opt(None, help="", default_text="IVF1024 with fast-scan PQ (dim/4 sub-quantizers of "
                                                                "4 bits), fast on a CPU")
    window: int | None = opt(None, help="forward window", default_text="the model's positions")
    prompt: str | None = opt(None, help="generation prompt", default_text="the start of the first test article")
    max_new_tokens: int = opt(40, help="tokens generated with and without the datastore")
    model_cache: str | None = None

    def __post_init__(self):
        if not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive (got {self.epochs})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be positive (got {self.max_new_tokens})")
