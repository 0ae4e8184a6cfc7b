"""Precision: queries in the datastore's compute dtype, the LM head in float32, the default compute dtype."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import write_text
from transformers import AutoModelForCausalLM

import builder.keys
from builder.build import build
from builder.config import BuildConfig
from builder.keys import ComputeDtypeError, WindowJob, check_device_dtype, compute_keys, default_compute_dtype, \
    fp32_head, load_encoder
from builder.manifest import load_manifest
from builder.model_dir import config_dtype
from builder.rows import iter_range
from builder.storage import Storage
from retriever.config import EvalConfig
from retriever.evaluate import EvalError, EvalWorkerImpl, evaluate, load_query_encoder, plan_chunks, query_dtype, \
    score_windows

W, C = 16, 6
TEXT = "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 3


def build_one(root, model: str, dtype: str, device: str = "auto") -> str:
    """A datastore of TEXT alone (one document, keys only), computed in `dtype`."""
    corpus = write_text(root / "corpus.txt", TEXT)
    out = str(root / f"ds-{dtype}")
    build(BuildConfig(corpus=[corpus], model=model, out=out, window=W, min_context=C, compute_dtype=dtype,
                      device=device, progress=False))
    return out


def stored_keys(out: str) -> np.ndarray:
    st = Storage.from_uri(out)
    m = load_manifest(st)
    return np.concatenate([p[1]["key"] for p in iter_range(st, m, 0, m.num_keys, ("key",))])


def text_windows(model: str) -> list:
    from transformers import AutoTokenizer
    ids = np.array(AutoTokenizer.from_pretrained(model)(TEXT)["input_ids"], dtype=np.int32)
    return [w for c in plan_chunks([ids], W, C) for w in c.windows]


def test_default_compute_dtype_rule(tmp_path):
    """auto: float32 on CPU; on a GPU float16 unless the model's config says bfloat16."""
    assert default_compute_dtype(False) == default_compute_dtype(False, "bfloat16") == "float32"
    assert default_compute_dtype(True) == default_compute_dtype(True, "float32") == "float16"
    assert default_compute_dtype(True, "bfloat16") == "bfloat16"
    for key, value, want in (("dtype", "bfloat16", "bfloat16"), ("torch_dtype", "float16", "float16"),
                             (None, None, None)):
        d = tmp_path / str(key)
        write_text(d / "config.json", json.dumps({key: value} if key else {"model_type": "gpt2"}))
        assert config_dtype(str(d)) == want
    write_text(tmp_path / "mm" / "config.json", json.dumps({"dtype": "float32", "text_config": {"dtype": "bfloat16"}}))
    assert config_dtype(str(tmp_path / "mm")) == "bfloat16"


def test_eval_refuses_another_compute_dtype(tmp_path, gpt2_model, ray_cluster, capsys):
    from cluster.cli import main
    out = build_one(tmp_path, gpt2_model, "float32")
    assert load_manifest(Storage.from_uri(out)).compute_dtype == "float32"     # auto on CPU, recorded
    evalf = write_text(tmp_path / "eval.txt", "The river flooded the hills.")
    msg = r"--compute-dtype bfloat16: the datastore's keys were computed in float32 \(its manifest's compute_dtype\)"
    with pytest.raises(EvalError, match=msg):
        evaluate(EvalConfig(datastore=out, corpus=[evalf], compute_dtype="bfloat16"))
    assert main(["eval", out, "--corpus", evalf, "--compute-dtype", "bfloat16"]) == 2
    assert "queries must be computed in the same dtype" in capsys.readouterr().err
    assert query_dtype("float32", load_manifest(Storage.from_uri(out))) == "float32"


def test_bf16_datastore_queries_equal_its_keys(tmp_path, gpt2_model, ray_cluster):
    """A bfloat16 build on the CPU: the eval worker's queries for the same text are its keys, bit for bit
    (and float32 queries are not: the test can tell)."""
    out = build_one(tmp_path, gpt2_model, "bfloat16", device="cpu")
    m = load_manifest(Storage.from_uri(out))
    assert m.compute_dtype == "bfloat16"
    keys = stored_keys(out)
    worker = EvalWorkerImpl(gpt2_model, m.key_layer, "cpu", query_dtype(None, m), out, None)   # as `evaluate`
    assert worker.error is None and worker.encoder.dtype == torch.bfloat16
    q, lm, _ = score_windows(text_windows(gpt2_model), worker.encoder)
    assert q.dtype == np.float16 and q.shape == keys.shape and np.array_equal(q, keys)
    q32, lm32, _ = score_windows(text_windows(gpt2_model), load_encoder(gpt2_model, "ffn_input", "cpu", "float32"))
    assert not np.array_equal(q32, keys)
    assert np.abs(lm - lm32).max() < 0.1                                          # the same LM, in another dtype


def test_a_dtype_the_device_cannot_run_is_an_eval_error(tmp_path, gpt2_model, monkeypatch):
    """Refused at loading, naming the datastore's dtype and the device; the eval worker keeps the error for
    `run`, which the driver reports as itself (not a Ray traceback from the actor's constructor)."""
    def refuse(device, dtype, source):
        raise ComputeDtypeError(f"{source}: {device} (a test device) has no native bfloat16")
    monkeypatch.setattr(builder.keys, "check_device_dtype", refuse)
    with pytest.raises(EvalError, match=r"computed in bfloat16 \(its manifest's compute_dtype\).*cpu \(a test device\)"):
        load_query_encoder(gpt2_model, "ffn_input", "bfloat16", "cpu")
    worker = EvalWorkerImpl(gpt2_model, "ffn_input", "cpu", "bfloat16", str(tmp_path), None)
    assert worker.encoder is None
    with pytest.raises(EvalError, match="has no native bfloat16"):
        worker.run(0, [], 8, 1, False, 0.25, 1.0, 8, 64)


def test_check_device_dtype_on_cpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_device_dtype("cpu", dtype, "--compute-dtype x")          # torch 2.13 runs all three on the CPU


def test_generate_refuses_another_model(tmp_path, gpt2_model, tiny_models, ray_cluster):
    from retriever.generate import generate
    out = build_one(tmp_path, gpt2_model, "float32")
    with pytest.raises(EvalError, match=r"--model .* is not the model that built the datastore"):
        generate(out, "In 1998 the", 0.25, 1.0, 8, model=tiny_models["neox"])


def large_logit_model(tmp_path, gpt2_model) -> str:
    """The tiny GPT-2 with every logit shifted to about -100 (as real LMs' logits sit): a constant -1 in
    dimension 0 of every token embedding (tied to the LM head) and a final-norm output of 100 there."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_model)
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] = -1.0
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 100.0
    path = str(tmp_path / "large-logits")
    model.save_pretrained(path)
    for f in os.listdir(gpt2_model):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(gpt2_model, f), path)
    return path


def test_lm_head_in_float32_when_scoring(tmp_path, gpt2_model):
    """bfloat16 blocks: the LM log-probs of `score_windows` are those of a float32 head on the same hidden
    states (perplexity to ~1e-6), while the model's own bfloat16 logits change the perplexity by more than 1e-3."""
    path = large_logit_model(tmp_path, gpt2_model)
    rng = np.random.default_rng(7)
    V = AutoModelForCausalLM.from_pretrained(path).config.vocab_size
    windows = [(rng.integers(2, V, 64), 1, 64) for _ in range(6)]
    enc = load_encoder(path, "ffn_input", "cpu", "bfloat16")
    _, ours, _ = score_windows(windows, enc, batch_size=1)                     # one window per forward, as below
    head = enc.model.get_output_embeddings()
    assert head.weight.dtype == torch.bfloat16 and head.weight is enc.model.transformer.wte.weight   # tied, as is
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref, naive = [], []
    for toks, a, b in windows:
        got = {}
        hook = plain.lm_head.register_forward_hook(lambda mod, args, out: got.update(h=args[0], logits=out))
        with torch.no_grad():
            plain(torch.from_numpy(toks.astype(np.int64))[None])
        hook.remove()
        pos, tgt = torch.arange(a - 1, b - 1), torch.from_numpy(toks[a:b].astype(np.int64))
        assert got["logits"].dtype == torch.bfloat16 and got["logits"].mean() < -90     # logits near -100
        with torch.no_grad():
            exact = torch.log_softmax(got["h"][0].double() @ plain.lm_head.weight.double().T, -1)   # fp64 head
        ref.append(exact[pos, tgt].numpy())
        naive.append(torch.log_softmax(got["logits"][0].float(), -1)[pos, tgt].double().numpy())
    ref, naive = np.concatenate(ref), np.concatenate(naive)

    def ppl(lp):
        return float(np.exp(-lp.mean()))
    print(f"relative perplexity error: bfloat16 head {ppl(naive) / ppl(ref) - 1:.2e}, "
          f"ours {ppl(ours) / ppl(ref) - 1:.2e}")
    assert abs(ppl(naive) / ppl(ref) - 1) > 1e-3
    assert abs(ppl(ours) / ppl(ref) - 1) < 1e-5
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)              # fp32 steps near -100: 8e-6
    # an fp32 model keeps its own head; keys-only forwards never set the float32 head up
    assert not fp32_head(AutoModelForCausalLM.from_pretrained(gpt2_model))
    keys_only = load_encoder(path, "ffn_input", "cpu", "bfloat16")
    compute_keys([WindowJob(windows[0][0], 0, 10)], keys_only, 1)
    assert not getattr(keys_only.model.get_output_embeddings(), "_knnlm_fp32", False)


def test_generation_scores_are_float32(gpt2_model, tmp_path):
    """The logits processor's model (bfloat16 blocks) gives float32 scores from its float32 head."""
    from retriever.generate import KNNLMLogitsProcessor

    class NoRetriever:
        metric = "l2"

    path = large_logit_model(tmp_path, gpt2_model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    proc = KNNLMLogitsProcessor(model, NoRetriever(), "ffn_input", lam=0.0)
    with torch.no_grad():
        logits = model(torch.arange(2, 12)[None]).logits
    proc.remove()
    assert logits.dtype == torch.float32 and proc.encoder.last.dtype == torch.bfloat16
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())              # finer than bfloat16 steps


# ---- on a GPU (skipped without CUDA) ---------------------------------------------------------


@pytest.mark.gpu
def test_gpu_datastore_queries_equal_its_keys(tmp_path, gpt2_model, ray_cluster):
    """(b) on the device: a build in the auto GPU dtype (float16 for this float32 model), then the eval
    worker's queries on the device equal the stored keys bit for bit."""
    out = build_one(tmp_path, gpt2_model, "auto", device="cuda")
    m = load_manifest(Storage.from_uri(out))
    assert m.compute_dtype == "float16"
    worker = EvalWorkerImpl(gpt2_model, m.key_layer, "cuda", query_dtype(None, m), out, None)
    q, _, _ = score_windows(text_windows(gpt2_model), worker.encoder)
    assert np.array_equal(q, stored_keys(out))


@pytest.mark.gpu
def test_gpu_bf16_refused_without_bf16(gpt2_model):
    if torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has bfloat16")
    with pytest.raises(EvalError, match=r"computed in bfloat16 .*cuda.*has no native bfloat16"):
        load_query_encoder(gpt2_model, "ffn_input", "bfloat16", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_gpu_key_relative_error(tiny_models, dtype, bound):
    """bench/bench_precision.py's key error on the device: ‖k_dtype − k_fp32‖/‖k_fp32‖ per key."""
    path = tiny_models["llama"]
    rng = np.random.default_rng(3)
    jobs = [WindowJob(rng.integers(2, 300, 64), 1, 64) for _ in range(8)]
    ref = np.concatenate(compute_keys(jobs, load_encoder(path, "ffn_input", "cuda", "float32"), 4)).astype(np.float64)
    got = np.concatenate(compute_keys(jobs, load_encoder(path, "ffn_input", "cuda", dtype), 4)).astype(np.float64)
    err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.percentile(err, 99) < bound
