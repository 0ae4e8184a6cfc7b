"""Keys equal an independent reference: a hook / output_hidden_states on a plain full forward."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from builder.keys import KeyEncoder, KeyLayerError, WindowJob, compute_keys, find_key_module, forward, load_encoder
from builder.unit import Segment, Unit, UnitParams, compute_unit, unit_token_range

# the last block's feed-forward, written out per family (independent of find_key_module)
LAST_FFN = {"gpt2": lambda m: m.transformer.h[-1].mlp, "neox": lambda m: m.gpt_neox.layers[-1].mlp,
            "llama": lambda m: m.model.layers[-1].mlp, "mistral": lambda m: m.model.layers[-1].mlp,
            "qwen2": lambda m: m.model.layers[-1].mlp, "opt": lambda m: m.model.decoder.layers[-1].fc1}


def reference_keys(model, family, key_layer, tokens, window, min_context):
    """Key of every target t >= 1 from a plain forward of its window, computed independently."""
    n = len(tokens)
    stride = window - min_context
    out = np.zeros((n, model.config.hidden_size), np.float32)
    cache = {}
    for t in range(1, n):
        k = max(0, -(-(t - window + 1) // stride))  # smallest k with t < k*stride + window
        s = k * stride
        assert s < t < min(s + window, n)
        if s not in cache:
            ids = torch.tensor(tokens[s:min(s + window, n)], dtype=torch.long)[None]
            captured = {}
            # OPT's fc1 gets (1·T, d): back to (1, T, d)
            h = LAST_FFN[family](model).register_forward_hook(
                lambda m, a, o: captured.update(x=a[0].reshape(ids.shape[0], ids.shape[1], -1)))
            with torch.no_grad():
                model(ids)  # the plain full forward, LM head included
                last = model.base_model(ids).last_hidden_state  # after the final norm: the LM head's input
            h.remove()
            cache[s] = (captured["x"] if key_layer == "ffn_input" else last)[0].numpy()
        out[t] = cache[s][t - 1 - s]
    return out[1:]


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "mistral", "qwen2", "opt"])
@pytest.mark.parametrize("key_layer", ["ffn_input", "final_hidden"])
def test_unit_keys_equal_reference(tiny_models, family, key_layer):
    path = tiny_models[family]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    lengths = [150, 5, 33]
    tokens = rng.integers(2, model.config.vocab_size, sum(lengths)).astype(np.int32)
    window, min_context = 24, 10
    enc = load_encoder(path, key_layer, "cpu", "float32")
    p = UnitParams(window=window, min_context=min_context, mode="document", batch_size=3, shard_rows=10 ** 6,
                   row_group_rows=1000, file_uri="mem", doc_base=100)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    for i, n in enumerate(lengths):
        ref = reference_keys(model, family, key_layer, tokens[offs[i]:offs[i + 1]].tolist(), window, min_context)
        # the whole sequence as one unit, and split at a window boundary inside the sequence
        bounds = [(1, n)] + ([(1, 24), (24, 38), (38, n)] if n == 150 else [])
        got = []
        for (t0, t1) in bounds:
            unit = Unit(0, 0, (Segment(i, int(offs[i]), n, t0, t1, i),))
            lo, hi = unit_token_range(unit, window, min_context)
            rows = list(compute_unit(unit, tokens[lo:hi], lo, enc, p))
            keys = np.concatenate([r[0] for r in rows])
            vals = np.concatenate([r[1] for r in rows])
            doc = np.concatenate([r[2] for r in rows])
            pos = np.concatenate([r[3] for r in rows])
            assert keys.dtype == np.float16 and keys.shape == (t1 - t0, 32)
            np.testing.assert_array_equal(pos, np.arange(t0, t1))
            np.testing.assert_array_equal(vals, tokens[offs[i] + t0:offs[i] + t1])
            assert (doc == 100 + i).all()
            got.append(keys)
        whole = got[0].astype(np.float32)
        np.testing.assert_allclose(whole, ref, rtol=1e-2, atol=2e-3)
        if len(got) > 1:  # a unit starting inside a sequence re-reads its context: same keys
            np.testing.assert_array_equal(np.concatenate(got[1:]), got[0])


def test_opt_keys_are_fc1_input_reshaped(tiny_models):
    """OPT blocks hand fc1 a (batch·time, dim) tensor: the keys are that input back in (batch, time, dim),
    in a padded batch too, and both the encoder and inspect_model choose fc1 as the key module."""
    from builder.modelinfo import inspect_model
    path = tiny_models["opt"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert find_key_module(model, "ffn_input")[0] == "model.decoder.layers.1.fc1"
    assert inspect_model(path, "ffn_input").key_module == "model.decoder.layers.1.fc1"
    rng = np.random.default_rng(5)
    jobs = [WindowJob(rng.integers(2, model.config.vocab_size, n), lo, n) for n, lo in ((30, 0), (12, 3), (21, 5))]
    enc = load_encoder(path, "ffn_input", "cpu", "float32")
    for bs in (1, 3):                                    # alone, and right-padded in one batch
        for job, got in zip(jobs, compute_keys(jobs, enc, bs)):
            captured = {}
            h = model.model.decoder.layers[-1].fc1.register_forward_hook(
                lambda m, a, o: captured.update(x=a[0]))
            with torch.no_grad():
                model(torch.from_numpy(job.tokens.astype(np.int64))[None])
            h.remove()
            flat = captured["x"]
            assert flat.dim() == 2 and flat.shape == (len(job.tokens), 32)       # the flattening is real
            ref = flat.reshape(1, len(job.tokens), 32)[0, job.lo:job.hi].numpy()
            assert got.shape == ref.shape
            np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-2, atol=2e-3)
    with pytest.raises(KeyLayerError, match="OPTForCausalLM"):       # a 2-D input that is not (B·T, d)
        enc.shape = (5, 5)
        enc._hook(enc.module, (torch.zeros(7, 32),))


def test_forward_stops_at_key_layer(gpt2_model):
    enc = load_encoder(gpt2_model, "ffn_input", "cpu", "float32")
    called = []
    enc.model.lm_head.register_forward_hook(lambda *a: called.append("lm_head"))
    enc.model.transformer.h[-1].mlp.register_forward_hook(lambda *a: called.append("mlp"))
    enc.model.transformer.ln_f.register_forward_hook(lambda *a: called.append("ln_f"))
    out = enc(torch.arange(2, 12)[None])
    assert out.shape == (1, 10, 32)
    assert called == []


def test_batching_does_not_change_keys(gpt2_model):
    enc = load_encoder(gpt2_model, "ffn_input", "cpu", "float32")
    rng = np.random.default_rng(1)
    jobs = [WindowJob(rng.integers(2, 300, n), 1, n) for n in (20, 7, 33, 2, 15)]
    a = compute_keys(jobs, enc, batch_size=1)
    b = compute_keys(jobs, enc, batch_size=4)
    for x, y, j in zip(a, b, jobs):
        assert x.shape == (j.hi - j.lo, 32)
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3)


def old_score_windows(windows, encoder, batch_size=8, pad_id=0):
    """The evaluation's own forward batcher as it was before `builder.keys.forward` (a reference)."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    outs = [None] * len(windows)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        ids = np.full((len(idx), len(windows[idx[0]][0])), pad_id, dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, :len(windows[i][0])] = windows[i][0]
        h, logits = encoder.score(torch.from_numpy(ids))
        for r, i in enumerate(idx):
            toks, a, b = windows[i]
            pos = slice(a - 1, b - 1)
            tgt = torch.from_numpy(np.asarray(toks[a:b], dtype=np.int64))
            lm = torch.log_softmax(logits[r, pos].float(), dim=-1).gather(1, tgt[:, None])[:, 0].double()
            outs[i] = (h[r, pos].to(torch.float16).numpy(), lm.numpy(), toks[a:b].astype(np.int64))
    return tuple(np.concatenate([o[j] for o in outs]) for j in range(3))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_forward_for_keys_and_logprobs(tiny_models, family):
    """`forward` with log-probs: bit-identical keys to the build's (`compute_keys`, stopped at the key
    layer) and to the evaluation's former batcher, the same log-probs, which a plain forward confirms."""
    from retriever.evaluate import score_windows
    path = tiny_models[family]
    enc = load_encoder(path, "ffn_input", "cpu", "float32")
    rng = np.random.default_rng(4)
    V = enc.model.config.vocab_size
    windows = [(rng.integers(2, V, n), a, n) for n, a in ((20, 1), (7, 3), (33, 10), (2, 1), (20, 5), (15, 1))]
    jobs = [WindowJob(t, a - 1, b - 1) for t, a, b in windows]
    for bs in (1, 4):
        keys, lps = forward(jobs, enc, bs, logprobs=True)
        for k, ref in zip(keys, compute_keys(jobs, enc, bs)):
            assert k.dtype == np.float16 and np.array_equal(k, ref)
        assert forward(jobs, enc, bs)[1] is None
        q, lm, tgt = score_windows(windows, enc, bs)
        oq, olm, otgt = old_score_windows(windows, enc, bs)
        assert np.array_equal(q, oq) and np.array_equal(tgt, otgt)
        # the LM head runs on the scored positions only (logits_to_keep): a GEMM of fewer rows, which may
        # round a logit differently in float32's last bit (the shared model: bit-identical on test.txt)
        np.testing.assert_allclose(lm, olm, rtol=0, atol=2e-6)
        assert lm.dtype == np.float64 and np.array_equal(np.concatenate(lps), lm)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for (t, a, b), lp in zip(windows, lps):
            logits = model(torch.from_numpy(t.astype(np.int64))[None]).logits[0]
            want = torch.log_softmax(logits.double(), -1)[torch.arange(a - 1, b - 1), torch.from_numpy(t[a:b])]
            np.testing.assert_allclose(lp, want.numpy(), rtol=1e-5, atol=1e-5)


def test_generation_reads_the_same_hook(gpt2_model):
    """A KeyEncoder left running (`stop=False`, as generation uses it) leaves the key of every forward
    in `last` and the logits untouched; `remove` takes its hook off."""
    model = AutoModelForCausalLM.from_pretrained(gpt2_model).eval()
    ids = torch.arange(2, 14)[None]
    with torch.no_grad():
        plain = model(ids).logits
    enc = KeyEncoder(model, "ffn_input", stop=False)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.equal(logits, plain)
    key = compute_keys([WindowJob(ids[0].numpy(), 0, 12)], load_encoder(gpt2_model, "ffn_input", "cpu", "float32"), 1)[0]
    assert np.array_equal(enc.last[0].to(torch.float16).numpy(), key)
    enc.remove()
    enc.last = None
    with torch.no_grad():
        model(ids)
    assert enc.last is None


def test_unknown_architecture_is_named(gpt2_model):
    model = AutoModelForCausalLM.from_pretrained(gpt2_model)
    del model.transformer.h[-1].mlp
    model.transformer.h[-1].add_module("weird", torch.nn.Identity())
    with pytest.raises(KeyLayerError, match="GPT2LMHeadModel"):
        find_key_module(model, "ffn_input")
    with pytest.raises(KeyLayerError, match="--key-layer"):
        find_key_module(model, "middle")
    assert find_key_module(model, "final_hidden")[0] == "lm_head"
    with pytest.raises(KeyLayerError):
        KeyEncoder(model, "ffn_input")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_keys_match_cpu(tiny_models, dtype):
    """The GPU path (half-precision forward, pinned async copies) gives the CPU's keys up to rounding."""
    path = tiny_models["llama"]
    rng = np.random.default_rng(2)
    jobs = [WindowJob(rng.integers(2, 300, n), 1, n) for n in (64, 17, 40, 64, 3)]
    cpu = compute_keys(jobs, load_encoder(path, "ffn_input", "cpu", "float32"), batch_size=2)
    gpu = compute_keys(jobs, load_encoder(path, "ffn_input", "cuda", dtype), batch_size=2)
    for a, b in zip(cpu, gpu):
        assert b.dtype == np.float16 and a.shape == b.shape
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=5e-2, atol=5e-2)


def test_run_unit_writes_shards_and_reports_progress(gpt2_model, tmp_path):
    from builder.key_shards import checksum, read_shard
    from builder.layout import tokens_path, unit_record_path
    from builder.storage import Storage
    from builder.unit import run_unit
    st = Storage.from_uri(str(tmp_path))
    tokens = np.random.default_rng(3).integers(2, 300, 100).astype(np.int32)
    st.write_bytes(tokens_path(0), tokens.astype("<i4").tobytes())
    unit = Unit(5, 0, (Segment(0, 0, 60, 1, 60, 0), Segment(1, 60, 40, 1, 40, 1)))
    p = UnitParams(window=24, min_context=10, mode="document", batch_size=2, shard_rows=30, row_group_rows=8,
                   file_uri="mem", doc_base=7, writer_threads=2)
    seen = []
    rec = run_unit(unit, st, load_encoder(gpt2_model, "ffn_input", "cpu", "float32"), p, seen.append)
    assert sum(seen) == rec["num_rows"] == 59 + 39 and len(seen) > 2
    assert [s["num_rows"] for s in rec["shards"]] == [30, 30, 30, 8]
    assert [s["path"] for s in rec["shards"]] == [f"shards/0000005-00{i}.parquet" for i in range(4)]
    assert st.exists(unit_record_path(5))
    rows = [read_shard(st.read_bytes(s["path"]), 32) for s in rec["shards"]]
    assert all(checksum(st.read_bytes(s["path"])) == s["checksum"] for s in rec["shards"])
    doc = np.concatenate([r["doc"] for r in rows])
    pos = np.concatenate([r["pos"] for r in rows])
    np.testing.assert_array_equal(doc, [7] * 59 + [8] * 39)
    np.testing.assert_array_equal(pos, list(range(1, 60)) + list(range(1, 40)))
    np.testing.assert_array_equal(np.concatenate([r["value"] for r in rows]),
                                  np.concatenate([tokens[1:60], tokens[61:100]]))
