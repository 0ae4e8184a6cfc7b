"""Keys: locate the key layer in any HF causal LM, and the one forward pass over windows.

`forward` is the only batched forward of the project: the datastore build takes its keys
(`compute_keys`, via builder/unit.py), the evaluation and `knnlm neighbours` take its keys as
queries and, in the same pass, the LM's log-probabilities of the next tokens
(retriever/evaluate.py `score_windows`). So queries and keys come from exactly the same code,
layer, batching and window rules. Generation (retriever/generate.py) runs `model.generate()`
with its KV cache instead, but reads each step's query through the same `KeyEncoder` hook.

For keys alone the forward stops at the key layer: the pre-hook on the key module captures its
input and aborts the forward, so neither the rest of the last block nor the LM head is computed
(the LM head alone is about half of GPT-2-small's cost).

Precision: the blocks run in the compute dtype (`resolve_dtype`; the datastore's manifest records
it and every later forward uses the same one); when the LM's log-probabilities are wanted, the LM
head runs in float32 (`fp32_head`): in bfloat16 a logit near -100 is rounded to a step of 0.5.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from builder.errors import KnnlmError
from builder.model_dir import config_dtype

log = logging.getLogger(__name__)

# names of the feed-forward module inside a transformer block, across HF families
FFN_NAMES = ("mlp", "feed_forward", "ffn", "ff", "block_sparse_moe", "fc1")


class KeyLayerError(KnnlmError, ValueError):
    pass


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks: the one whose length is the number of layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if n_layers is not None and len(mod) == n_layers:
                return name, mod
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise KeyLayerError(f"cannot find the transformer blocks of {type(model).__name__}: "
                            "no ModuleList of layers; use --key-layer final_hidden")
    return best


def find_key_module(model: torch.nn.Module, key_layer: str) -> tuple[str, torch.nn.Module]:
    """(dotted name, module) whose *input* is the key.

    ffn_input: the last block's feed-forward module (its input is the output of that block's
    post-attention layer norm); final_hidden: the LM head (its input is after the final norm)."""
    if key_layer == "final_hidden":
        head = model.get_output_embeddings()
        if head is None:
            raise KeyLayerError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
        name = next(n for n, m in model.named_modules() if m is head)
        return name, head
    if key_layer != "ffn_input":
        raise KeyLayerError(f"unknown key layer {key_layer!r} (--key-layer: ffn_input or final_hidden)")
    blocks_name, blocks = find_blocks(model)
    last = blocks[-1]
    for child_name in FFN_NAMES:
        mod = getattr(last, child_name, None)
        if isinstance(mod, torch.nn.Module):
            return f"{blocks_name}.{len(blocks) - 1}.{child_name}", mod
    children = ", ".join(n for n, _ in last.named_children())
    raise KeyLayerError(f"cannot find the feed-forward module of the last block of {type(model).__name__} "
                        f"(children of {blocks_name}.{len(blocks) - 1}: {children}); "
                        "use --key-layer final_hidden or add its name to builder.keys.FFN_NAMES")


class ComputeDtypeError(KnnlmError, ValueError):
    """A compute dtype the device cannot run (e.g. bfloat16 on a GPU without it)."""


def default_compute_dtype(on_cuda: bool, trained_dtype: str | None = None) -> str:
    """`--compute-dtype auto`, the one rule (build driver and workers alike):

    CPU: float32 (half precision is no faster there, and exact is free). GPU: float16, the paper's
    and 3 mantissa bits finer than bfloat16 (bench/bench_precision.py: about 8x smaller key error),
    unless the model's config says it was trained/published in bfloat16 (`trained_dtype`, config
    `dtype`/`torch_dtype`): such models may have activations beyond float16's range (65504), so
    bfloat16 (builder/unit.py check_finite refuses non-finite keys either way)."""
    if not on_cuda:
        return "float32"
    return "bfloat16" if trained_dtype == "bfloat16" else "float16"


def resolve_dtype(device: str, compute_dtype: str = "auto", trained_dtype: str | None = None) -> torch.dtype:
    if compute_dtype == "auto":
        compute_dtype = default_compute_dtype(device.startswith("cuda"), trained_dtype)
    return getattr(torch, compute_dtype)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def check_device_dtype(device: str, dtype: torch.dtype, source: str) -> None:
    """Refuse, naming `source` (what asked for the dtype) and the device, a compute dtype the device cannot
    run: bfloat16 on a GPU without native bfloat16 (before Ampere), or any dtype whose matmul and layer
    norm fail there. Never a silent change of dtype: keys and queries must come from the same one."""
    dev = torch.device(device)
    name = str(dtype).replace("torch.", "")
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ComputeDtypeError(f"{source}: {_device_name(dev)} has no native bfloat16 (it needs compute "
                                "capability 8.0 or newer)")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=dev)
        torch.nn.functional.layer_norm(a @ a, (4,))                 # the ops every block runs
    except (RuntimeError, TypeError) as e:
        raise ComputeDtypeError(f"{source}: {_device_name(dev)} cannot compute in {name} "
                                f"({str(e).splitlines()[0]})") from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KeyLayerError("--device cuda: no CUDA device is visible to this worker")
    return device


class _Captured(Exception):
    """Raised by the hook to stop the forward pass at the key layer."""


def fp32_head(model: torch.nn.Module) -> bool:
    """Make the LM head (`get_output_embeddings()`) compute in float32 whatever the compute dtype:
    (..., d) hidden states in the compute dtype → (..., V) float32 logits. Returns whether it did
    (False: the head is already float32, or there is none).

    The module's own `forward` is replaced on the instance by one on a float32 copy of its weight
    (and bias), so its hooks (the key hook of --key-layer final_hidden) still run, the model's own
    post-processing of the logits (soft-capping, scaling) runs in float32 on them, and the head is
    computed once. The shared (tied) embedding is not touched. Cost: V·d·4 bytes (GPT-2-small:
    154 MB; a 128k-vocabulary 4096-dim LM: 2.1 GB) and one float32 GEMM instead of a half-precision
    one; keys-only builds never call it. The products of half-precision operands are exact in
    float32, so this equals a half-precision GEMM that accumulates and returns float32."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_knnlm_fp32", False) or head.weight.dtype == torch.float32:
        return False
    with torch.no_grad():
        if isinstance(head, torch.nn.Linear):
            w32 = head.weight.detach().float()                                          # (V, d)
            b32 = head.bias.detach().float() if head.bias is not None else None          # (V,)

            def forward(x: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.linear(x.float(), w32, b32)                   # (..., V) fp32
        else:  # another head module: a float32 copy without hooks
            import copy
            h32 = copy.deepcopy(head).float()
            h32._forward_pre_hooks.clear()
            h32._forward_hooks.clear()

            def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                return h32(x.float(), *args, **kwargs)
    head.forward = forward
    head._knnlm_fp32 = True
    log.debug("%s: LM head %s computes in float32", type(model).__name__, type(head).__name__)
    return True


class KeyEncoder:
    """A causal LM cut at its key layer: input ids (B, T) → keys (B, T, d).

    One forward pre-hook on the key module serves every use: it keeps the module's input in
    `last`, then stops the forward there when `stop` is set (keys only: the default), or lets it
    run whole (`score`; generation, whose `model.generate()` steps leave each step's key in `last`)."""

    def __init__(self, model: torch.nn.Module, key_layer: str, device: str = "cpu", stop: bool = True):
        self.model = model.eval()
        self.key_layer = key_layer
        self.device = torch.device(device)
        self.module_name, self.module = find_key_module(model, key_layer)
        self.dim = int(model.config.hidden_size)
        self.dtype = next(model.parameters()).dtype
        self.last: torch.Tensor | None = None     # (B, T, d) the key module's input in the latest forward
        self.stop = stop
        self.shape: tuple[int, int] | None = None  # (B, T) of the current forward's input ids
        self._handles = [model.register_forward_pre_hook(self._shape_hook, with_kwargs=True),
                         self.module.register_forward_pre_hook(self._hook)]

    def _shape_hook(self, module, args, kwargs):
        """Note (B, T) of every forward of the model (generation's steps too): some blocks flatten."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.shape = tuple(ids.shape[:2]) if ids is not None else None

    def _hook(self, module, args):
        x = args[0]
        if x.dim() == 2:
            # OPT-style blocks hand their feed-forward a (B·T, d) tensor (OPTDecoderLayer flattens before
            # final_layer_norm/fc1): back to (B, T, d), row-major as flattened
            if self.shape is None or self.shape[0] * self.shape[1] != x.shape[0]:
                raise KeyLayerError(f"the key module {self.module_name} of {type(self.model).__name__} gets a "
                                    f"{tuple(x.shape)} tensor that is not (batch·time, dim) of the input "
                                    f"{self.shape}; use --key-layer final_hidden")
            x = x.reshape(*self.shape, x.shape[-1])
        self.last = x
        if self.stop:
            raise _Captured

    def remove(self) -> None:
        """Take the hooks off the model (the model then runs as if never wrapped)."""
        for h in self._handles:
            h.remove()

    def _key(self) -> torch.Tensor:
        if self.last is None:
            raise KeyLayerError(f"the key module {self.module_name} of {type(self.model).__name__} was not "
                                "called in the forward pass")
        return self.last

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole forward: (keys (B, T, d) at the key layer in the compute dtype, logits (B, T - first,
        V) float32 of positions [first, T): the LM head in float32, see `fp32_head`, set up on the first
        call), from one pass. The head runs on those positions only where the model takes
        `logits_to_keep` (a window's context positions need no logits: half of an evaluation window)."""
        fp32_head(self.model)
        self.last, stop, self.stop = None, self.stop, False
        kw = {"logits_to_keep": input_ids.shape[1] - first} if first > 0 and self._keeps_logits() else {}
        try:
            logits = self.model(input_ids=input_ids, use_cache=False, **kw).logits
            if logits.shape[1] != input_ids.shape[1] - first:           # all positions: those from `first` on
                logits = logits[:, first:]
        finally:
            self.stop = stop
        return self._key(), logits

    def _keeps_logits(self) -> bool:
        if not hasattr(self, "_logits_to_keep"):
            import inspect
            self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._logits_to_keep

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.last = None
        try:
            # right padding needs no attention mask: causal attention never looks ahead
            self.model(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
        return self._key()


def load_model(model_path: str, device: str = "auto", compute_dtype: str = "auto",
               source: str | None = None) -> torch.nn.Module:
    """The causal LM on `device` in `compute_dtype` ("auto": `default_compute_dtype`), in eval mode; a
    dtype the device cannot run is refused naming `source` (default: the --compute-dtype flag)."""
    from transformers import AutoModelForCausalLM
    dev = resolve_device(device)
    dtype = resolve_dtype(dev, compute_dtype, config_dtype(model_path) if compute_dtype == "auto" else None)
    check_device_dtype(dev, dtype, source or f"--compute-dtype {compute_dtype}")
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(dev).eval()


def load_encoder(model_path: str, key_layer: str, device: str = "auto", compute_dtype: str = "auto",
                 source: str | None = None) -> KeyEncoder:
    dev = resolve_device(device)
    return KeyEncoder(load_model(model_path, dev, compute_dtype, source), key_layer, dev)


@dataclass
class WindowJob:
    """One forward window: `tokens` (L,), keep the hidden states at positions [lo, hi); their
    next tokens, whose log-probs `forward` gives when asked, are tokens[lo + 1 : hi + 1] (hi < L)."""
    tokens: np.ndarray
    lo: int
    hi: int


def _next_logprobs(logits: torch.Tensor, job: WindowJob, first: int = 0) -> torch.Tensor:
    """logits (T - first, V) of one window's positions [first, T) → (hi - lo,) float64 log p(next token)
    at positions [lo, hi): the log-softmax in float32 over the vocabulary, then gathered and widened."""
    tgt = torch.from_numpy(np.asarray(job.tokens[job.lo + 1:job.hi + 1], dtype=np.int64)).to(logits.device)
    lp = torch.log_softmax(logits[job.lo - first:job.hi - first].float(), dim=-1)  # (m, V) fp32 (no-op cast)
    return lp.gather(1, tgt[:, None])[:, 0].double()                                # (m,) fp64


def forward(jobs: list[WindowJob], encoder: KeyEncoder, batch_size: int, pad_id: int = 0,
            logprobs: bool = False, on_batch=None) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The one batched forward: (keys, log-probs) per job, in job order.

    keys: (hi - lo, d) float16, the key-layer states at positions [lo, hi); log-probs (only with
    `logprobs`, else None): (hi - lo,) float64, the LM's log p of the next token at each of those
    positions. Keys alone stop the forward at the key layer; log-probs run it whole (the keys
    come from the same module and hook either way).

    Windows are batched longest-first (a stable sort: ties keep job order) to limit padding and
    right-padded with `pad_id`; on CUDA the copy of a batch's results to the host overlaps the
    next batch's forward pass. `on_batch(job indices, their keys, their log-probs or None)`, when given,
    is called as each batch's results are in (a caller can use them while the next batch runs: `knnlm
    eval` searches them)."""
    keys: list[np.ndarray | None] = [None] * len(jobs)
    lps: list[np.ndarray | None] | None = [None] * len(jobs) if logprobs else None
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].tokens))
    dev = encoder.device
    cuda = dev.type == "cuda"
    pending: list[tuple] = []

    def drain(p):
        idx, host, host_lp, sizes, ev = p
        if ev is not None:
            ev.synchronize()
        arr = host.numpy()
        lp = host_lp.numpy() if host_lp is not None else None
        off = 0
        for i, n in zip(idx, sizes):
            keys[i] = arr[off:off + n]
            if lp is not None:
                lps[i] = lp[off:off + n]
            off += n
        if on_batch is not None:
            on_batch(idx, [keys[i] for i in idx], [lps[i] for i in idx] if lps is not None else None)

    def to_host(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = len(jobs[idx[0]].tokens)
        ids = np.full((len(idx), T), pad_id, dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, :len(jobs[i].tokens)] = jobs[i].tokens
        ids_t = torch.from_numpy(ids).to(dev, non_blocking=cuda)
        lp = None
        if logprobs:
            first = min(jobs[i].lo for i in idx)      # logits of positions [first, T) only: the scored ones
            h, logits = encoder.score(ids_t, first)                          # (B, T, d), (B, T - first, V) fp32
            lp = torch.cat([_next_logprobs(logits[r], jobs[i], first) for r, i in enumerate(idx)])  # (sum keep,) fp64
            del logits
        else:
            h = encoder(ids_t)                                               # (B, T, d) compute dtype
        keep = torch.cat([h[r, jobs[i].lo:jobs[i].hi] for r, i in enumerate(idx)])   # (sum keep, d)
        keep = keep.to(torch.float16)
        sizes = [jobs[i].hi - jobs[i].lo for i in idx]
        if cuda:
            host, host_lp = to_host(keep), (to_host(lp) if lp is not None else None)
            ev = torch.cuda.Event()
            ev.record()
            if pending:
                drain(pending.pop())
            pending.append((idx, host, host_lp, sizes, ev))
        else:
            drain((idx, keep, lp, sizes, None))
    while pending:
        drain(pending.pop())
    return keys, lps  # type: ignore[return-value]


def compute_keys(jobs: list[WindowJob], encoder: KeyEncoder, batch_size: int,
                 pad_id: int = 0) -> list[np.ndarray]:
    """The build's keys: `forward` without log-probs, a list of (hi - lo, d) float16 arrays."""
    return forward(jobs, encoder, batch_size, pad_id)[0]
