"""The datastore manifest: the single source of truth for how a datastore was made.

`manifest.json` at the datastore root is written last, when every shard is committed.
While a build runs, its identity (what must not change on a resume) lives in
`_build/request.json` (builder/layout.py); every later stage compares its own request with the manifest
and refuses a mismatch, naming both values and the flag.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from builder.errors import KnnlmError
from builder.layout import MANIFEST, version_path
from builder.storage import NotFound, Storage

FORMAT_VERSION = 1
# sha256 of the manifest's canonical content without this field (`content_checksum`): any change to
# manifest.json (a flipped byte in a number or a string) is detected on load; manifests without it load
CHECKSUM_FIELD = "manifest_checksum"

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


def content_checksum(d: dict) -> str:
    """"sha256:<hex>" of a manifest's content (parsed JSON) without its `manifest_checksum` field:
    canonical JSON (sorted keys, no spaces), so it does not depend on how the file was formatted."""
    body = {k: v for k, v in d.items() if k != CHECKSUM_FIELD}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def path_problem(path) -> str | None:
    """Why a path the manifest lists cannot be used, or None: it must be a relative path inside the
    datastore root (no absolute path, no '..', '.' or empty component, no backslash or NUL)."""
    if not isinstance(path, str) or not path:
        return f"{path!r} is not a relative path"
    if path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in path.split("/")):
        return f"{path!r} leaves the datastore root"
    return None


def check_format(d: dict) -> None:
    """A knnlm manifest of the format this knnlm reads (checked before anything else: another format may
    define its fields, and its checksum, otherwise)."""
    if "format_version" not in d:
        raise ManifestError("not a knnlm datastore manifest (it has no format_version)")
    if d.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"unsupported manifest format_version {d.get('format_version')!r} "
                            f"(this knnlm reads {FORMAT_VERSION})")


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
    # versions (builder/versions.py): each ingestion, removal and compaction publishes version + 1
    version: int = 1
    history: list = field(default_factory=list)      # [{version, kind, at, num_keys, ...}] oldest first
    ingestions: dict = field(default_factory=dict)   # --name -> {version, inputs, files, first_id, num_keys, ...}
    removed: dict | None = None         # ids no query may return until compaction: {ranges: [[first, end)], num_keys}
    removals: list = field(default_factory=list)     # [{version, at, source | docs, num_docs, num_keys, ranges}]
    extra: dict = field(default_factory=dict)  # fields this knnlm does not know (a newer one wrote them), kept

    def to_json(self) -> str:
        d = asdict(self)
        extra, tuned, pipeline = d.pop("extra"), d.pop("tuned"), d.pop("pipeline")
        if tuned is not None:
            extra = extra | {"knnlm": {**extra.get("knnlm", {}), "tuned": tuned}}
        if pipeline is not None:
            extra = extra | {"pipeline": pipeline}
        d = json.loads(json.dumps(d | extra))          # as a reader will parse it (tuples → lists, ...)
        return json.dumps(d | {CHECKSUM_FIELD: content_checksum(d)}, indent=1, sort_keys=False)

    @staticmethod
    def from_dict(d: dict) -> "Manifest":
        check_format(d)
        known = set(Manifest.__dataclass_fields__) - {"extra", "tuned", "pipeline"}
        extra = {k: v for k, v in d.items() if k not in known and k != CHECKSUM_FIELD}
        knnlm = dict(extra.pop("knnlm", None) or {})
        tuned, pipeline = knnlm.pop("tuned", None), extra.pop("pipeline", None)
        if knnlm:
            extra["knnlm"] = knnlm
        return Manifest(**{k: v for k, v in d.items() if k in known}, tuned=tuned, pipeline=pipeline, extra=extra)

    def paths(self) -> list[tuple[str, object]]:
        """(field, path) of every file the manifest lists under the datastore root."""
        out: list[tuple[str, object]] = [(f"shards[{i}].path", s.get("path")) for i, s in enumerate(self.shards)]
        if self.index:
            out.append(("index.path", self.index.get("path")))
        out += [(f"index_shards[{i}].path", s.get("path")) for i, s in enumerate(self.index_shards or [])]
        if self.index_merged:
            out += [(f"index_merged.{k}", self.index_merged.get(k)) for k in ("path", "ivfdata")]
        return out

    def validate(self, where: str = MANIFEST) -> None:
        """Every listed path inside the datastore root; ids contiguous from 0 to num_keys-1 in shard order;
        index shards (when listed) contiguous over the same ids; removed ranges sorted, disjoint, inside.
        `where` names the manifest in errors."""
        for name, path in self.paths():
            if (why := path_problem(path)) is not None:
                raise ManifestError(f"{where}: {name} {why}")
        if not isinstance(self.version, int) or self.version < 1:
            raise ManifestError(f"{where}: version must be a positive integer, not {self.version!r}")
        end = 0
        for a, b in (self.removed or {}).get("ranges", []):
            if not end <= a < b <= self.num_keys:
                raise ManifestError(f"{where}: removed range [{a}, {b}) is not sorted, disjoint and inside "
                                    f"[0, {self.num_keys})")
            end = b
        nxt = 0
        for s in self.shards:
            if s["first_id"] != nxt:
                raise ManifestError(f"shard {s['path']}: first_id {s['first_id']} != expected {nxt}")
            nxt += s["num_rows"]
        if nxt != self.num_keys:
            raise ManifestError(f"shards hold {nxt} rows but num_keys is {self.num_keys}")


def load_manifest(storage: Storage) -> Manifest:
    try:
        raw = storage.read_bytes(MANIFEST)
    except NotFound:
        raise ManifestError(f"{storage.url(MANIFEST)} not found: {storage.uri} is not a finished datastore "
                            "(run `knnlm build` first, or rerun it to finish)") from None
    return parse_manifest(raw, storage.url(MANIFEST))


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """A manifest's bytes, checked (format, checksum, paths, ids); errors name `where`."""
    try:
        d = json.loads(raw.decode("utf-8"))
        if not isinstance(d, dict):
            raise TypeError(f"a JSON {type(d).__name__}, not an object")
        check_format(d)
        near = [k for k in d if len(k) == len(CHECKSUM_FIELD) and k != CHECKSUM_FIELD and
                sum(a != b for a, b in zip(k, CHECKSUM_FIELD)) == 1]
        if near and CHECKSUM_FIELD not in d:     # a flipped byte in the field's name must not disable the check
            raise ManifestError(f"{where}: field {near[0]!r} looks like a corrupted {CHECKSUM_FIELD}: restore "
                                "the manifest from a copy or rebuild the datastore")
        if CHECKSUM_FIELD in d and d[CHECKSUM_FIELD] != content_checksum(d):
            raise ManifestError(f"{where}: its content does not match its {CHECKSUM_FIELD} (corrupted, or edited "
                                "by hand): restore it from a copy or rebuild the datastore")
        m = Manifest.from_dict(d)
        m.validate(where)
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        if isinstance(e, ManifestError):
            raise ManifestError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        raise ManifestError(f"{where} is not a valid manifest: {e}") from None
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
    """Replace manifest.json atomically (later stages add their sections to it), in the version it was
    read in: a manifest read before another version was published (an ingestion, a removal) is refused,
    never written over the newer one. The version's copy under versions/ is kept in step."""
    m.validate()
    check_current(storage, m)
    text = m.to_json()
    if storage.exists(version_path(m.version)):
        storage.write_text(version_path(m.version), text)
    storage.write_text(MANIFEST, text)


def check_current(storage: Storage, m: Manifest) -> None:
    """Raise unless manifest.json is still at m's version (a newer one must not be overwritten)."""
    try:
        cur = json.loads(storage.read_text(MANIFEST)).get("version", 1)
    except NotFound:
        return
    except (ValueError, AttributeError):
        return                               # unreadable: load_manifest reports it where it matters
    if cur != m.version:
        raise ManifestError(f"{storage.uri} is at version {cur} now, this run read version {m.version} (an "
                            "ingestion, removal or compaction was published meanwhile): rerun the command")


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
        raise ManifestError(f"{where} was built with different settings: " + "; ".join(diffs) +
                            ". Use a new --out, or rerun with the original settings.")
