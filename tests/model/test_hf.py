"""Hugging Face checkpoint I/O: config translation, export round trip, strict loader errors,
offline hub messages, and tokenizer loading."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from meta_mask.config import ModelConfig, tiny_model_config
from meta_mask.errors import UserError
from meta_mask.model.bart import init_params
from meta_mask.model.hf import (
    CheckpointError,
    config_from_hf,
    config_to_hf,
    load_hf,
    load_tokenizer,
    name_map,
    save_hf,
)
from tests.data.tokenizer_helpers import fast_tokenizer
from tests.model.hf_fixtures import (
    jax_logits,
    make_torch_bart,
    padded_batch,
    save_torch_bart,
    torch_logits,
)
from tests.processes import run_module


def _perturbed_params(config: ModelConfig, seed: int) -> dict:
    """Random params where every leaf (layer norms, final_logits_bias too) is non-trivial."""

    @jax.jit
    def make(key):
        params = init_params(config, key)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(tree, noisy)

    return make(jax.random.PRNGKey(seed))


def test_config_round_trip_through_bart_config():
    config = tiny_model_config(activation_function="relu", encoder_layers=3, scale_embedding=True)
    hf = transformers.BartConfig(**config_to_hf(config))
    assert config_from_hf(hf) == config
    assert config_from_hf(hf.to_dict()) == config
    # transformers 5 moved forced_bos_token_id to the generation config; config.json keeps it.
    with_bos = config.replace(forced_bos_token_id=0)
    assert config_from_hf(config_to_hf(with_bos)) == with_bos
    assert config_from_hf(config_to_hf(config), dtype="bfloat16").dtype == "bfloat16"
    # Fields of the real facebook/bart-base config.json (legacy flags at supported values).
    hub_style = {
        **config_to_hf(config),
        "architectures": ["BartModel"],
        "add_bias_logits": False,
        "add_final_layer_norm": False,
        "normalize_before": False,
        "normalize_embedding": True,
        "static_position_embeddings": False,
        "extra_pos_embeddings": 2,
        "classif_dropout": 0.1,
        "gradient_checkpointing": False,
        "num_hidden_layers": 3,
        "no_repeat_ngram_size": 3,
        "num_beams": 4,
        "torch_dtype": "float32",
        "task_specific_params": {"summarization": {"num_beams": 4}},
    }
    assert config_from_hf(hub_style) == config


def test_export_loads_in_torch_with_same_logits(tmp_path):
    config = tiny_model_config(
        vocab_size=96, activation_function="gelu_new", decoder_layers=3, scale_embedding=True
    )
    params = _perturbed_params(config, seed=0)
    out = save_hf(params, config, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    torch_model, info = transformers.BartForConditionalGeneration.from_pretrained(
        str(out), output_loading_info=True
    )
    assert all(not v for v in info.values()), info  # no missing/unexpected/mismatched keys
    torch_model.eval()
    assert torch_model.lm_head.weight.data_ptr() == torch_model.model.shared.weight.data_ptr()
    ids, mask = padded_batch([10, 4], config.vocab_size, seed=3)
    dec, dec_mask = padded_batch([7, 5], config.vocab_size, seed=4)
    ours = jax_logits(config, params, ids, dec, mask, dec_mask)
    ref = torch_logits(torch_model, ids, dec, mask, dec_mask)
    keep = dec_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[keep], ref[keep], atol=1e-4, rtol=0)

    # load(save(params)) == params, bit for bit, and the config survives.
    config2, params2 = load_hf(str(out))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_save_overwrites_atomically(tmp_path):
    config = tiny_model_config(vocab_size=64, encoder_layers=1, decoder_layers=1)
    out = tmp_path / "ckpt"
    save_hf(init_params(config, jax.random.PRNGKey(0)), config, out)
    params = _perturbed_params(config, seed=5)
    save_hf(params, config, out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left
    _, loaded = load_hf(str(out))
    np.testing.assert_array_equal(loaded["shared"]["embedding"], params["shared"]["embedding"])
    with pytest.raises(CheckpointError, match="params do not match the config"):
        save_hf(params, config.replace(decoder_layers=2), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_name_map_covers_every_param_once():
    config = tiny_model_config(encoder_layers=3, decoder_layers=1)
    entries = name_map(config)
    ours = {e.ours for e in entries}
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert ours == paths and len(ours) == len(entries)
    assert len({e.hf for e in entries}) == len(entries)
    hf_keys = set(
        transformers.BartForConditionalGeneration(
            transformers.BartConfig(**config_to_hf(config))
        ).state_dict()
    )
    tied = {
        "lm_head.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
    }
    assert {e.hf for e in entries} == hf_keys - tied


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
    """A saved tiny torch checkpoint plus its state dict, for the corruption tests."""
    folder = tmp_path_factory.mktemp("ckpt")
    save_torch_bart(make_torch_bart(seed=1), folder)
    return folder, load_file(str(folder / "model.safetensors"))


def _write(tmp_path, src_folder, state, config_edit=None):
    cfg = json.loads((src_folder / "config.json").read_text())
    if config_edit:
        cfg.update(config_edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return str(tmp_path)


def test_loader_accepts_the_torch_checkpoint_and_tied_aliases(torch_checkpoint, tmp_path):
    folder, state = torch_checkpoint
    config, params = load_hf(str(folder))
    assert config.vocab_size == 96
    # Older checkpoints store the tied copies explicitly; equal copies are fine.
    shared = state["model.shared.weight"]
    with_aliases = {**state, "lm_head.weight": shared, "model.encoder.embed_tokens.weight": shared}
    _, params2 = load_hf(_write(tmp_path, folder, with_aliases))
    np.testing.assert_array_equal(params2["shared"]["embedding"], params["shared"]["embedding"])


def test_loader_reads_bartmodel_prefix_and_sharded_fp16(torch_checkpoint, tmp_path):
    folder, state = torch_checkpoint
    _, params = load_hf(str(folder))
    # A checkpoint saved from BartModel has no "model." prefix and no final_logits_bias.
    bare = {k.removeprefix("model."): v for k, v in state.items() if k != "final_logits_bias"}
    (tmp_path / "bare").mkdir()
    _, loaded = load_hf(_write(tmp_path / "bare", folder, bare))
    np.testing.assert_array_equal(loaded["final_logits_bias"], 0)
    np.testing.assert_array_equal(
        loaded["encoder"]["layers_1"]["fc1"]["kernel"],
        params["encoder"]["layers_1"]["fc1"]["kernel"],
    )
    # Sharded float16 checkpoint with an index file.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((folder / "config.json").read_text())
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k].astype(np.float16) for k in part}, str(shard_dir / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _, loaded = load_hf(str(shard_dir))
    want = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)


def test_loader_rejects_extra_key(torch_checkpoint, tmp_path):
    folder, state = torch_checkpoint
    bad = {**state, "model.encoder.layers.2.fc1.weight": np.zeros((64, 32), np.float32)}
    with pytest.raises(CheckpointError, match=r"not used.*model\.encoder\.layers\.2\.fc1\.weight"):
        load_hf(_write(tmp_path, folder, bad))


def test_loader_rejects_missing_key(torch_checkpoint, tmp_path):
    folder, state = torch_checkpoint
    bad = {k: v for k, v in state.items() if k != "model.decoder.layers.1.encoder_attn.v_proj.bias"}
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.layers\.1\.encoder_attn\.v_proj"):
        load_hf(_write(tmp_path, folder, bad))


def test_loader_rejects_wrong_shape(torch_checkpoint, tmp_path):
    folder, state = torch_checkpoint
    bad = {**state, "model.encoder.layers.0.fc2.weight": np.zeros((32, 48), np.float32)}
    with pytest.raises(CheckpointError) as err:
        load_hf(_write(tmp_path, folder, bad))
    msg = str(err.value)
    assert "model.encoder.layers.0.fc2.weight" in msg and "(32, 48)" in msg and "(32, 64)" in msg


def test_loader_rejects_untied_lm_head(torch_checkpoint, tmp_path):
    folder, state = torch_checkpoint
    bad = {**state, "lm_head.weight": state["model.shared.weight"] + 1}
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_hf(_write(tmp_path, folder, bad))


@pytest.mark.parametrize(
    "edit",
    [
        {"normalize_before": True},
        {"add_final_layer_norm": True},
        {"static_position_embeddings": True},
        {"add_bias_logits": True},
        {"model_type": "mbart"},
        {"activation_function": "gelu_fast"},
    ],
)
def test_loader_rejects_unsupported_config(torch_checkpoint, tmp_path, edit):
    folder, state = torch_checkpoint
    key, value = next(iter(edit.items()))
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        load_hf(_write(tmp_path, folder, state, edit))


def test_hub_id_offline_gives_actionable_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as err:
        load_hf("facebook/bart-base-not-cached", flag="--model_name_or_path")
    msg = str(err.value)
    assert "download the folder elsewhere" in msg and "--model_name_or_path=DIR" in msg
    # One message for the user: not the hub's chain of tracebacks.
    assert isinstance(err.value, UserError) and err.value.__suppress_context__
    with pytest.raises(OSError, match="--tokenizer=DIR"):
        load_tokenizer("facebook/bart-base-not-cached", flag="--tokenizer")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf("./does/not/exist")


def test_load_tokenizer_from_local_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "the": 4, "cat": 5, "sat": 6, "<mask>": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast_tokenizer(backend).save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.is_fast
    assert loaded("the cat sat dog", add_special_tokens=False)["input_ids"] == [4, 5, 6, 3]
    assert (loaded.pad_token_id, loaded.mask_token_id) == (1, 7)
    enc = loaded("the cat", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"] == [(0, 3), (4, 7)] and enc.word_ids() == [0, 1]


def test_torch_is_not_imported_by_meta_mask():
    proc = run_module("tests.model.imports_without_torch", timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.__version__  # the reference is available to the tests only
