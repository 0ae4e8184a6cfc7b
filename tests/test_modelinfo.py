"""Model identity: a moved model is the same model, changed weights are not."""
import shutil

from conftest import make_tiny_model

from builder.modelinfo import config_max_positions, inspect_model


def test_weight_hash_follows_the_weights_not_the_path(tmp_path):
    a = make_tiny_model(str(tmp_path / "a"), "gpt2", seed=0)
    first = inspect_model(a, "ffn_input")
    assert first.sha256.startswith("sha256:") and first.key_module == "transformer.h.1.mlp"
    assert inspect_model(a, "ffn_input").sha256 == first.sha256          # cached, same answer
    moved = str(tmp_path / "moved")
    shutil.copytree(a, moved)
    assert inspect_model(moved, "ffn_input").sha256 == first.sha256      # moved or renamed: recognised
    make_tiny_model(a, "gpt2", seed=1)                                    # changed in place
    assert inspect_model(a, "ffn_input").sha256 != first.sha256
    assert config_max_positions(a) == 64 and first.max_positions == 64
    assert first.adds_special_tokens is False
    assert inspect_model(make_tiny_model(str(tmp_path / "l"), "llama"), "ffn_input").adds_special_tokens is True
