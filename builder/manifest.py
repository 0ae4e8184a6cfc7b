"""The datastore manifest: the single source of truth for how a datastore was made.

`manifest.json` at the datastore root is written last, when every shard is committed.
While a build runs, its identity (what must not change on a resume) lives in
`_build/request.json` (builder/layout.py); every later stage compares its own request with the manifest
and refuses a mismatch, naming both values and the flag.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from builder.errors import KnnlmError
from builder.layout import MANIFEST
from builder.storage import NotFound, Storage

FORMAT_VERSION = 1

# identity field → the flag that sets it (for error messages)
IDENTITY_FLAGS = {
    "model_sha256": "--model",
    "tokenizer_sha256": "--model (its tokenizer)",
    "key_layer": "--key-layer",
    "window": "--window",
    "min_context": "--min-context",
    "mode": "--mode",
    "compute_dtype": "--device/--compute-dtype",
    "format": "--format",
    "text_field": "--text-field",
    "inputs": "--corpus",
    "shard_rows": "--shard-rows",
    "unit_tokens": "--unit-tokens",
    "row_group_rows": "--row-group-rows",
}


def require_index_shards(m: "Manifest", uri: str, error: type[Exception]) -> list[dict]:
    """The manifest's index shards, or `error` saying which commands make them."""
    if not m.index or not m.index_shards:
        raise error(f"{uri} has no index shards: run `knnlm train-index` and `knnlm add` first")
    return m.index_shards


class ManifestError(KnnlmError, ValueError):
    pass


@dataclass
class Manifest:
    num_keys: int
    dim: int
    model: dict                 # {name, sha256, class, ...}
    tokenizer: dict             # {name, sha256, add_special_tokens, adds_bos, ...}
    key_layer: str
    window: int
    min_context: int
    mode: str
    compute_dtype: str
    corpus: dict                # {inputs, format, text_field, files: [...], num_documents, ...}
    shards: list[dict]          # [{path, num_rows, first_id, checksum}] in corpus order
    identity: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    key_module: str = ""
    key_dtype: str = "float16"
    value_dtype: str = "int32"
    shard_format: str = "parquet"
    shard_columns: dict = field(default_factory=lambda: {
        "key": "fixed_size_binary(2*dim): dim float16 little-endian", "value": "int32 token id",
        "doc": "int64 document index (document mode) or input file index (stream mode)",
        "pos": "int64 position of the value token in its sequence"})
    format_version: int = FORMAT_VERSION
    # written by later stages (knnlm train-index / knnlm add); None until then
    index: dict | None = None           # {path, factory, metric, train_size, seed, sample_checksum, checksum, ...}
    index_shards: list | None = None    # [{path, first_id, num_ids, bytes, checksum}] in id order
    index_merged: dict | None = None    # --merge: {path, ivfdata, num_ids, bytes, checksum, ...}
    # written by the kNN-LM stages; absent from the file until then
    tuned: dict | None = None           # knnlm tune --record: {lambda, temperature, k, ...}, eval's defaults;
    #                                     stored as "knnlm": {"tuned": ...}
    pipeline: dict | None = None        # knnlm run: the resolved pipeline file that made this datastore
    extra: dict = field(default_factory=dict)  # fields this knnlm does not know (a newer one wrote them), kept

    def to_json(self) -> str:
        d = asdict(self)
        extra, tuned, pipeline = d.pop("extra"), d.pop("tuned"), d.pop("pipeline")
        if tuned is not None:
            extra = extra | {"knnlm": {**extra.get("knnlm", {}), "tuned": tuned}}
        if pipeline is not None:
            extra = extra | {"pipeline": pipeline}
        return json.dumps(d | extra, indent=1, sort_keys=False)

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        if d.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format_version {d.get('format_version')!r} "
                                f"(this knnlm reads {FORMAT_VERSION})")
        known = set(Manifest.__dataclass_fields__) - {"extra", "tuned", "pipeline"}
        extra = {k: v for k, v in d.items() if k not in known}
        knnlm = dict(extra.pop("knnlm", None) or {})
        tuned, pipeline = knnlm.pop("tuned", None), extra.pop("pipeline", None)
        if knnlm:
            extra["knnlm"] = knnlm
        return Manifest(**{k: v for k, v in d.items() if k in known}, tuned=tuned, pipeline=pipeline, extra=extra)

    def validate(self) -> None:
        """Ids contiguous from 0 to num_keys-1 in shard order."""
        nxt = 0
        for s in self.shards:
            if s["first_id"] != nxt:
                raise ManifestError(f"shard {s['path']}: first_id {s['first_id']} != expected {nxt}")
            nxt += s["num_rows"]
        if nxt != self.num_keys:
            raise ManifestError(f"shards hold {nxt} rows but num_keys is {self.num_keys}")


def load_manifest(storage: Storage) -> Manifest:
    try:
        raw = storage.read_text(MANIFEST)
    except NotFound:
        raise ManifestError(f"{storage.url(MANIFEST)} not found: {storage.uri} is not a finished datastore "
                            "(run `knnlm build` first, or rerun it to finish)") from None
    try:
        m = Manifest.from_dict(json.loads(raw))
    except (json.JSONDecodeError, TypeError) as e:
        raise ManifestError(f"{storage.url(MANIFEST)} is not a valid manifest: {e}") from None
    m.validate()
    return m


def package_versions(packages: tuple[str, ...]) -> dict:
    """{distribution: version} of those installed (recorded in the manifest)."""
    import importlib.metadata as md
    out = {}
    for p in packages:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def write_manifest(storage: Storage, m: Manifest) -> None:
    """Replace manifest.json atomically (later stages add their sections to it)."""
    m.validate()
    storage.write_text(MANIFEST, m.to_json())


def compare_identity(have: dict, want: dict, where: str) -> None:
    """Raise if a build request differs from what built (or is building) `where`."""
    diffs = []
    for k, flag in IDENTITY_FLAGS.items():
        if k in have and k in want and have[k] != want[k]:
            a, b = have[k], want[k]
            if k == "inputs":
                a, b = f"{len(a)} inputs starting {a[:2]}", f"{len(b)} inputs starting {b[:2]}"
            diffs.append(f"{k} ({flag}): the datastore has {a!r}, this run asks for {b!r}")
    if diffs:
        raise ManifestError(f"{where} was built with different settings:\n  " + "\n  ".join(diffs) +
                            "\nUse a new --out, or rerun with the original settings.")
