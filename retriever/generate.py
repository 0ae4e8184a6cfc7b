"""Generation with the kNN-LM: a Hugging Face `LogitsProcessor` for `model.generate()`.

At every step the processor takes the query the model just computed at the datastore's key
layer (a forward pre-hook on the same module the keys came from, last position), searches it
through the `Retriever`, and replaces the step's scores with log(λ·p_kNN + (1−λ)·p_LM) over the
whole vocabulary; greedy search, sampling and beam search then run on the kNN-LM distribution.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor

from builder.keys import find_key_module
from retriever.router import Retriever, serving


class KNNLMLogitsProcessor(LogitsProcessor):
    def __init__(self, model, retriever, key_layer: str, lam: float = 0.25, temperature: float = 1.0, k: int = 1024,
                 nprobe: int = 32, rerank: bool = False):
        if not 0 <= lam <= 1:
            raise ValueError(f"--lambda must be in [0, 1] (got {lam})")
        self.retriever, self.lam, self.temperature, self.k, self.nprobe = retriever, lam, temperature, k, nprobe
        self.rerank = rerank                    # exact distances of the k candidates (servers with --rerank)
        self.module_name, module = find_key_module(model, key_layer)
        self._query: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self._query = args[0][:, -1, :]                       # (B, d): the state before the next token

    def remove(self) -> None:
        self._handle.remove()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._query is None:
            raise RuntimeError(f"the key module {self.module_name} was not called before the logits")
        q = self._query.to(torch.float16).float().cpu().numpy()        # rounded like the stored keys
        dist, _, values = self.retriever.search(q, k=self.k, nprobe=self.nprobe, rerank=self.rerank)
        return knnlm_scores(scores, dist, values, self.lam, self.temperature, self.retriever.metric)


def knnlm_scores(scores: torch.Tensor, dist: np.ndarray, values: np.ndarray, lam: float, temperature: float,
                 metric: str = "l2") -> torch.Tensor:
    """(B, V) LM scores + (B, k) neighbours → (B, V) kNN-LM log-probabilities (float32)."""
    V = scores.shape[-1]
    lm = torch.log_softmax(scores.double(), dim=-1)                                  # (B, V)
    d = torch.from_numpy(np.asarray(dist, np.float64))
    s = (-d if metric == "l2" else d) / temperature
    vals = torch.from_numpy(np.asarray(values, np.int64))
    valid = (vals >= 0) & torch.isfinite(s) & (vals < V)
    s = torch.where(valid, s, torch.tensor(-np.inf, dtype=torch.float64))
    top = torch.clamp(s.max(dim=1, keepdim=True).values, min=-1e300)
    w = torch.where(valid, torch.exp(s - top), torch.zeros_like(s))                  # (B, k)
    p = torch.zeros((scores.shape[0], V), dtype=torch.float64).scatter_add_(1, vals.clamp(min=0), w)
    norm = p.sum(dim=1, keepdim=True)
    knn = torch.where(norm > 0, torch.log(p / torch.where(norm > 0, norm, torch.ones_like(norm))),
                      torch.full_like(p, -np.inf))
    if lam == 0:
        mix = lm
    elif lam == 1:
        mix = knn
    else:
        mix = torch.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm.to(knn.device))
    return mix.to(torch.float32).to(scores.device)


def generate(datastore: str, model_path: str, key_layer: str, prompt: str, lam: float, temperature: float, k: int,
             nprobe: int = 32, max_new_tokens: int = 40, sample: bool = False, seed: int = 0, compare: bool = False,
             address: str | None = None, cache_dir: str | None = None) -> dict:
    """`prompt` continued with the kNN-LM (servers of `datastore`: the cluster's at `address`, else
    embedded ones for the call) and, with `compare`, by the base LM alone, from the same seed.
    Returns {"tokenizer", "prompt_tokens": n, "knnlm": (1, n + new) ids, "base": ids or None}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = {"max_new_tokens": max_new_tokens, "do_sample": sample, "pad_token_id": tok.eos_token_id or 0}
    with serving(datastore, address, cache_dir=cache_dir):
        proc = KNNLMLogitsProcessor(model, Retriever.connect(datastore), key_layer, lam, temperature, k, nprobe)
        torch.manual_seed(seed)
        out = model.generate(ids, logits_processor=[proc], **kw)
        proc.remove()
    base = None
    if compare:
        torch.manual_seed(seed)
        base = model.generate(ids, **kw)
    return {"tokenizer": tok, "prompt_tokens": ids.shape[1], "knnlm": out, "base": base}
