"""Generation with the kNN-LM: a Hugging Face `LogitsProcessor` for `model.generate()`.

At every step the processor takes the query the model just computed at the datastore's key
layer (the build's `builder.keys.KeyEncoder` hook on the same module, left running through the
whole forward; last position), searches it through the `Retriever`, and replaces the step's
scores with log(λ·p_kNN + (1−λ)·p_LM) over the whole vocabulary, by the evaluation's formula
(retriever/knnlm.py `knn_log_probs_vocab`, `interpolate`); greedy search, sampling and beam
search then run on the kNN-LM distribution.

As in the evaluation, the queries are computed as the datastore's keys were: `generate` refuses
another model than the datastore's (`check_model`) and loads it in the manifest's compute dtype;
the LM head computes in float32 (`builder.keys.fp32_head`, set up by the processor), so the
scores the processor gets are float32 logits of the compute dtype's hidden states.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from builder.keys import KeyEncoder, fp32_head
from builder.manifest import load_manifest
from builder.storage import Storage
from retriever.evaluate import check_model, load_query_model
from retriever.knnlm import interpolate, knn_log_probs_vocab
from retriever.router import Retriever, serving


class KNNLMLogitsProcessor(LogitsProcessor):
    def __init__(self, model, retriever, key_layer: str, lam: float = 0.25, temperature: float = 1.0, k: int = 1024,
                 nprobe: int = 32, rerank: bool = False):
        if not 0 <= lam <= 1:
            raise ValueError(f"--lambda must be in [0, 1] (got {lam})")
        self.retriever, self.lam, self.temperature, self.k, self.nprobe = retriever, lam, temperature, k, nprobe
        self.rerank = rerank                    # exact distances of the k candidates (servers with --rerank)
        fp32_head(model)              # float32 scores (the model keeps it after `remove`: its base LM too)
        # the build's key hook, left running: each generation step's forward leaves its key in `last`
        self.encoder = KeyEncoder(model, key_layer, str(next(model.parameters()).device), stop=False)
        self.module_name = self.encoder.module_name

    def remove(self) -> None:
        self.encoder.remove()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """scores (B, V) of the step → (B, V) float32 kNN-LM log-probabilities (retriever/knnlm.py)."""
        if self.encoder.last is None:
            raise RuntimeError(f"the key module {self.module_name} was not called before the logits")
        query = self.encoder.last[:, -1, :]                                 # (B, d): the state before the next token
        q = query.to(torch.float16).float().cpu().numpy()                   # rounded like the stored keys
        dist, _, values = self.retriever.search(q, k=self.k, nprobe=self.nprobe, rerank=self.rerank)
        lm = torch.log_softmax(scores.double(), dim=-1).cpu().numpy()      # (B, V) fp64
        knn = knn_log_probs_vocab(dist, values, scores.shape[-1], self.temperature, self.retriever.metric)
        return torch.from_numpy(interpolate(lm, knn, self.lam)).to(torch.float32).to(scores.device)


def generate(datastore: str, prompt: str, lam: float, temperature: float, k: int, nprobe: int = 32,
             max_new_tokens: int = 40, sample: bool = False, seed: int = 0, compare: bool = False,
             address: str | None = None, cache_dir: str | None = None, model: str | None = None) -> dict:
    """`prompt` continued with the kNN-LM (servers of `datastore`: the cluster's at `address`, else
    embedded ones for the call) and, with `compare`, by the base LM alone, from the same seed. `model`
    (default: the manifest's) must be the datastore's (EvalError otherwise); it runs on the CPU in the
    manifest's compute dtype. Returns {"tokenizer", "prompt_tokens": n, "knnlm": (1, n + new) ids,
    "base": ids or None}."""
    from transformers import AutoTokenizer

    st = Storage.from_uri(datastore)
    m = load_manifest(st)
    info = check_model(model, m)
    key_layer = m.key_layer
    tok = AutoTokenizer.from_pretrained(info.path)
    model = load_query_model(info.path, m.compute_dtype, "cpu")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = {"max_new_tokens": max_new_tokens, "do_sample": sample, "pad_token_id": tok.eos_token_id or 0}
    with serving(st.uri, address, cache_dir=cache_dir):
        proc = KNNLMLogitsProcessor(model, Retriever.connect(st.uri), key_layer, lam, temperature, k, nprobe)
        torch.manual_seed(seed)
        out = model.generate(ids, logits_processor=[proc], **kw)
        proc.remove()
    base = None
    if compare:
        torch.manual_seed(seed)
        base = model.generate(ids, **kw)
    return {"tokenizer": tok, "prompt_tokens": ids.shape[1], "knnlm": out, "base": base}
