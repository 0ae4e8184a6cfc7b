"""The `knnlm` command line: one console script, one subcommand per stage.

The parser is derived from the commands' config dataclasses (builder/config.py, retriever/config.py,
cluster/config.py; see builder/options.py): each option is defined once, as a field. A subcommand's
handler module is loaded only when it runs (`COMMANDS`), so `knnlm --help` loads neither numpy nor
Ray nor torch; tests/test_layers.py counts those module names as imports of this file.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass

from builder.config import (AddConfig, BuildConfig, CompactConfig, InfoConfig, IngestConfig, RemoveConfig, TrainConfig,
                            VerifyConfig)
from builder.errors import KnnlmError
from builder.options import add_options, from_args
from cluster.config import DemoConfig, LogsConfig, RunConfig, StatusConfig, SubmitConfig
from cluster.pipeline_spec import pipeline_reference
from retriever.config import (EvalConfig, GenerateConfig, NeighboursConfig, QueryConfig, ReportConfig, ServeConfig,
                              TuneConfig)

log = logging.getLogger("knnlm")


@dataclass(frozen=True)
class Command:
    options: type                  # the config dataclass its flags are derived from
    handler: tuple[str, str]       # (module, function): function(config) -> exit status
    help: str
    description: str | None = None


STAGES, RETRIEVAL, JOBS = "cluster.stage_commands", "cluster.retrieval_commands", "cluster.job_commands"
COMMANDS = {
    "demo": Command(
        DemoConfig, ("cluster.demo", "demo"),
        "the whole product end to end on this machine, offline: WikiText-2, a small GPT-2 trained on the fly, build, "
        "index, serve, tune, eval, generate",
        "Run the kNN-LM end to end on one machine with no network: the WikiText-2 text shipped with knnlm (CC BY-SA "
        "3.0) split by article into train/valid/test; a small GPT-2 trained on the train part (cached for the next "
        "run) unless --model; then build -> train-index -> add -> tune -> eval through `knnlm run` "
        "(OUT/pipeline.yaml), ending with the base vs kNN-LM perplexity table, the plots and a sample generated with "
        "and without the datastore. About 10 minutes on 2 CPU cores the first time (6 of them training the model), 4 "
        "once the model is cached."),
    "run": Command(
        RunConfig, (STAGES, "run"),
        "run a whole pipeline from a YAML file: build, train-index, add (and tune, eval, serve)",
        "Run the stages a pipeline file describes, in order: build -> train-index -> add -> tune -> eval -> serve "
        "(the last three when their sections are present). Each stage is the same function as its own subcommand: "
        "resumable, skipping what is already committed, refusing a file that asks for something other than what the "
        "datastore holds. The resolved file is stored in the manifest as `pipeline`. The same file runs on a laptop "
        "(embedded Ray, local paths) or a cluster (`address:` or --address, s3:// URIs). Relative paths in the file "
        "are relative to its folder. The inputs it names (build.corpus, tune.valid, tune.test, eval.corpus, a local "
        "build.model) are checked when it is loaded, before any work. Keys are the subcommands' options with _ for "
        "-."),
    "submit": Command(
        SubmitConfig, (JOBS, "submit"),
        "run a pipeline file as a Ray job on an existing cluster (Ray Jobs API)",
        "Submit PIPELINE.yaml (the file `knnlm run` takes) to an existing Ray cluster through the Ray Jobs API, "
        "print the job id and follow its log. The job runs `knnlm run` on the cluster with this checkout's code "
        "(builder/, cluster/, retriever/) and the resolved file, in cluster mode (the file's `address` is replaced "
        "by the cluster the job runs on); the cluster needs the dependencies installed, and paths in the file must "
        "exist on the cluster (or be s3:// URIs). The file is checked here first: config errors show before "
        "anything is submitted. The cluster reads storage with its own credentials: no environment variable of this "
        "machine is sent. Ctrl-C or a lost connection stops following, not the job. Resubmitting a pipeline whose "
        "job succeeded does nothing; one that is running is followed, not started twice; another pipeline for the "
        "same datastore is refused by the build's lease while one runs."),
    "status": Command(
        StatusConfig, (JOBS, "status"),
        "status of a submitted job (or list knnlm's jobs on the cluster)",
        "Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), its datastore and times, and for a "
        "failed job its error and where to read its log. Without JOB_ID, list the jobs knnlm submitted to the "
        "cluster."),
    "logs": Command(
        LogsConfig, (JOBS, "logs"),
        "a submitted job's log (--follow: until it ends)",
        "Print a job's log (its driver's stdout and stderr) as the cluster keeps it. With --follow, stream it until "
        "the job ends; the exit status is then the job's (non-zero if it failed)."),
    "build": Command(
        BuildConfig, (STAGES, "build"),
        "compute a datastore's keys from a corpus into shards (resumable)",
        "Build a kNN-LM datastore: tokenize the corpus with the model's tokenizer, compute one key per token (the "
        "LM's hidden state at --key-layer for the context before it) on Ray workers, and write Parquet shards plus "
        "manifest.json under --out. Rerunning the same command resumes an interrupted build; rerunning a finished "
        "one does nothing."),
    "train-index": Command(
        TrainConfig, (STAGES, "train_index"),
        "train a FAISS index (IVF-PQ by default) on a uniform sample of a datastore's keys",
        "Sample --train-size keys uniformly at random across the whole datastore (whole random row groups, then "
        "rows within them; seeded), train --index-factory on them (on a GPU when there is one), and store the "
        "trained, empty index at the datastore root, recorded in manifest.json as `index`. Rerunning with the same "
        "settings does nothing; different settings are refused unless --force, which retrains and drops the index "
        "shards built from the old index."),
    "add": Command(
        AddConfig, (STAGES, "add"),
        "encode every key into index shards (contiguous global-id ranges) on Ray workers",
        "Split the datastore into contiguous global-id ranges and encode each into its own copy of the trained "
        "index (knnlm train-index) on Ray workers, with the datastore's global ids; each index shard is a plain "
        "FAISS file listed in manifest.json as `index_shards`. Interrupted runs resume from the committed shards; "
        "rerunning a finished add does nothing."),
    "ingest": Command(
        IngestConfig, (STAGES, "ingest"),
        "add a new corpus to a finished datastore as its next version (keys, index shards, publish)",
        "Tokenize and compute keys for the new corpus with the datastore's own model, tokenizer, key layer, "
        "windows, mode and dtype (under DATASTORE/ingest/NAME), give them ids after the existing ones, encode them "
        "with the existing trained index into new index shards, and publish a new datastore version in one atomic "
        "write of manifest.json: until then readers and servers see the previous version. Once per --name: a "
        "rerun of a published ingestion does nothing, a killed one resumes, another corpus under the same name is "
        "refused, and another ingestion is refused while one runs. The coarse quantization error of the new keys "
        "is recorded next to that of the existing keys, with a warning when the new text lies far outside the "
        "trained index (retrain with `knnlm train-index --force`)."),
    "remove": Command(
        RemoveConfig, (STAGES, "remove"),
        "take documents out of a datastore (by source file or document index) as a new version",
        "Publish a new datastore version in which the documents of --source (input files, matched against the paths "
        "or URIs given to --corpus) or --docs (document indices; input file indices in stream mode) are removed: "
        "no query returns their ids (the servers filter them), provenance never shows their text, and neighbour "
        "caches made before are refused by `knnlm tune`. Nothing is rewritten (ids keep their numbers) until "
        "`knnlm compact`. The removal is recorded in the manifest (what, when, how many keys); removing what is "
        "already removed does nothing."),
    "compact": Command(
        CompactConfig, (STAGES, "compact"),
        "rewrite the shards without the removed keys, renumbering ids contiguously from 0 (a new version)",
        "Rewrite the key shards that hold removed rows without them, renumber the remaining keys contiguously "
        "from 0 in the same order, re-encode the index shards whose ids were removed or moved (Ray tasks, with the "
        "existing trained index), and publish the result as a new version recording how ids moved; then delete "
        "the old shards and the removed documents' tokens. Interrupted runs resume; rerunning a finished "
        "compaction does nothing."),
    "serve": Command(
        ServeConfig, (RETRIEVAL, "serve"),
        "start (or --status, --stop) the index servers of a datastore on a Ray cluster",
        "Start one index server per index shard and replica: named, detached Ray actors that fetch their shard into "
        "a local cache (checksum-verified), memory-map it and hold the values (token ids) of their id range. "
        "Clients on the cluster find them by name (retriever.Retriever.connect, knnlm query --address). With "
        "--address the servers stay on the cluster after this command returns; without it an embedded local Ray is "
        "started and the servers live until Ctrl-C (other commands reach them with --address auto). The servers "
        "follow the datastore's versions (knnlm ingest, remove, compact): every --watch seconds a controller looks "
        "for a newer one, starts its servers, switches the clients to it once they all answer, and stops the old "
        "ones --grace seconds later; every answer comes wholly from one version."),
    "query": Command(
        QueryConfig, (RETRIEVAL, "query"),
        "search a datastore's sharded index for a batch of query vectors (.npy → .npz)",
        "Search float32 (n, dim) queries through the router: the global top-k of each query over every index "
        "shard. Writes dist (float32; squared L2 for an l2 index, as FAISS returns it, or inner product), ids "
        "(int64 global ids) and values (int32 token ids), each (n, k), to --out; missing results are id/value -1 "
        "and dist +inf (l2) or -inf (ip). Uses the running servers with --address, else starts embedded ones for "
        "the call."),
    "eval": Command(
        EvalConfig, ("cluster.eval_command", "eval_"),
        "base LM and kNN-LM perplexity of evaluation text",
        "Score every token of the evaluation text that would get a key (the datastore's tokenizer, windows, key "
        "layer and mode) with the base LM and with the kNN-LM: p = lambda * p_kNN + (1 - lambda) * p_LM, p_kNN(y) "
        "proportional to the sum over the k neighbours with value y of exp(-d/T), d the squared L2 distance FAISS "
        "returns (exp(s/T) for inner product). LM workers are Ray actors (one per GPU, else one using the CPUs); "
        "their queries go to the index servers in batches."),
    "report": Command(
        ReportConfig, (RETRIEVAL, "report"),
        "a page (opens from disk) of where the datastore helped and which training text each prediction came from",
        "Write a static report of an evaluation (what `knnlm eval --save-neighbours` cached; `knnlm eval --report DIR` "
        "writes one directly) to --out: index.html opens from disk with no server and no network. It shows the run's "
        "settings and both perplexities; the evaluated text coloured by each token's log-probability gain (kNN-LM "
        "minus base), paged; for a clicked token its probabilities (base, p_kNN, kNN-LM) and its nearest neighbours "
        "with distance, weight, token, source file and document, and the training text around them; perplexity "
        "against lambda and k, the histogram of gains, the gain by how often the target occurs in the training text; "
        "and the largest gains and losses, linked into the text. The folder holds a compact per-token summary (its "
        "size, printed, grows linearly with the scored tokens)."),
    "tune": Command(
        TuneConfig, (RETRIEVAL, "tune"),
        "choose lambda, T and k on cached neighbours (knnlm eval --save-neighbours), in seconds",
        "Search lambda (0 to 0.95), the temperature T (log-spaced around the typical nearest distance, and 1.0) "
        "and k (powers of two up to the cached k) on the validation cache, pick the lowest validation perplexity, "
        "and report it on the test cache, without the LM or the index."),
    "generate": Command(
        GenerateConfig, (RETRIEVAL, "generate"),
        "generate text with the kNN-LM (and, with --compare, without it)",
        "Run model.generate() with a LogitsProcessor that replaces each step's distribution by the kNN-LM's "
        "(retriever.generate.KNNLMLogitsProcessor)."),
    "neighbours": Command(
        NeighboursConfig, (RETRIEVAL, "neighbours"),
        "show, for each position of a text, the retrieved neighbours and the datastore context they come from"),
    "info": Command(
        InfoConfig, (STAGES, "info"),
        "print a datastore's manifest summary (or the whole manifest with --json)"),
    "verify": Command(
        VerifyConfig, (STAGES, "verify"),
        "check every shard of a datastore against its manifest",
        "Read every shard and check it exists, its sha256 checksum, its row count and its key width against "
        "manifest.json, and that global ids are contiguous; likewise the index files (trained index, index shards, "
        "merged index). Exit status 0 if all is well, 2 otherwise (each problem is listed)."),
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm", description="Build and serve kNN-LM datastores at scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, c in COMMANDS.items():
        extra = ({"epilog": pipeline_reference(), "formatter_class": argparse.RawDescriptionHelpFormatter}
                 if name == "run" else {})
        add_options(sub.add_parser(name, help=c.help, description=c.description, **extra), c.options)
    return p


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: parser} of make_parser()'s subcommands."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand: its config from the flags (checked by the config), then its handler."""
    c = COMMANDS[args.command]
    module, function = c.handler
    cfg = from_args(c.options, args)
    return getattr(importlib.import_module(module), function)(cfg)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="knnlm: %(levelname)s: %(message)s" if args.verbose else "knnlm: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx", "huggingface_hub", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return dispatch(args)
    except KnnlmError as e:
        if args.verbose:
            raise
        print(f"knnlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"knnlm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
