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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from builder.errors import KnnlmError

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


def resolve_dtype(device: str, compute_dtype: str = "auto") -> torch.dtype:
    if compute_dtype != "auto":
        return getattr(torch, compute_dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KeyLayerError("--device cuda: no CUDA device is visible to this worker")
    return device


class _Captured(Exception):
    """Raised by the hook to stop the forward pass at the key layer."""


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
        self._handle = self.module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.last = args[0]
        if self.stop:
            raise _Captured

    def remove(self) -> None:
        """Take the hook off the model (the model then runs as if never wrapped)."""
        self._handle.remove()

    def _key(self) -> torch.Tensor:
        if self.last is None:
            raise KeyLayerError(f"the key module {self.module_name} of {type(self.model).__name__} was not "
                                "called in the forward pass")
        return self.last

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole forward: (keys (B, T, d) at the key layer, logits (B, T, V)), from one pass."""
        self.last, stop, self.stop = None, self.stop, False
        try:
            logits = self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            self.stop = stop
        return self._key(), logits

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.last = None
        try:
            # right padding needs no attention mask: causal attention never looks ahead
            self.model(input_ids=input_ids, use_cache=False)
        except _Captured:
            pass
        return self._key()


def load_encoder(model_path: str, key_layer: str, device: str = "auto",
                 compute_dtype: str = "auto") -> KeyEncoder:
    from transformers import AutoModelForCausalLM
    dev = resolve_device(device)
    dtype = resolve_dtype(dev, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return KeyEncoder(model.to(dev), key_layer, dev)


@dataclass
class WindowJob:
    """One forward window: `tokens` (L,), keep the hidden states at positions [lo, hi); their
    next tokens, whose log-probs `forward` gives when asked, are tokens[lo + 1 : hi + 1] (hi < L)."""
    tokens: np.ndarray
    lo: int
    hi: int


def _next_logprobs(logits: torch.Tensor, job: WindowJob) -> torch.Tensor:
    """logits (T, V) of one window → (hi - lo,) float64 log p(next token) at positions [lo, hi):
    the log-softmax in float32 over the vocabulary, then gathered and widened."""
    tgt = torch.from_numpy(np.asarray(job.tokens[job.lo + 1:job.hi + 1], dtype=np.int64)).to(logits.device)
    lp = torch.log_softmax(logits[job.lo:job.hi].float(), dim=-1)                  # (m, V) fp32
    return lp.gather(1, tgt[:, None])[:, 0].double()                                # (m,) fp64


def forward(jobs: list[WindowJob], encoder: KeyEncoder, batch_size: int, pad_id: int = 0,
            logprobs: bool = False) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The one batched forward: (keys, log-probs) per job, in job order.

    keys: (hi - lo, d) float16, the key-layer states at positions [lo, hi); log-probs (only with
    `logprobs`, else None): (hi - lo,) float64, the LM's log p of the next token at each of those
    positions. Keys alone stop the forward at the key layer; log-probs run it whole (the keys
    come from the same module and hook either way).

    Windows are batched longest-first (a stable sort: ties keep job order) to limit padding and
    right-padded with `pad_id`; on CUDA the copy of a batch's results to the host overlaps the
    next batch's forward pass."""
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
            h, logits = encoder.score(ids_t)                                 # (B, T, d), (B, T, V) compute dtype
            lp = torch.cat([_next_logprobs(logits[r], jobs[i]) for r, i in enumerate(idx)])   # (sum keep,) fp64
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
