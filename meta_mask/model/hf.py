"""Hugging Face BART checkpoints <-> our (ModelConfig, params), and tokenizer loading.

Owns: the explicit name map between our parameter tree (meta_mask.model.bart) and the state-dict
keys of `transformers.BartForConditionalGeneration`, the config translation both ways, loading
(`load_hf`) from a local folder or a hub id, export (`save_hf`) that `from_pretrained` reads with
no missing or unexpected keys, and `load_tokenizer`. Every mismatch fails loudly: an unused key,
a missing key, or a shape difference names the key and both shapes. No torch here: tensors are
read and written with safetensors.

Layout conventions: torch Linear weights are [out, in]; our Dense kernels are [in, out]
(transposed). HF's `final_logits_bias` is [1, V]; ours is [V]. HF ties `lm_head.weight`,
`model.encoder.embed_tokens.weight` and `model.decoder.embed_tokens.weight` to
`model.shared.weight`; when a checkpoint stores them they must equal the shared table.

The errors a user fixes (meta_mask.errors.UserError) are `CheckpointNotFoundError` (no such
folder or file, or the hub could not give it) and `CheckpointError` (it does not fit our BART).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from meta_mask.config import ModelConfig
from meta_mask.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors"]
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    CONFIG_NAME,
]

# BartConfig fields that ModelConfig carries one-to-one.
_SHARED_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("dtype", "remat")
)

# Legacy / variant BartConfig flags and the only value our model implements. A checkpoint that
# sets another value has a different architecture (pre-norm mBART-style blocks, sinusoidal
# positions, ...) and would load "successfully" into wrong logits, so we refuse it.
_REQUIRED_FLAGS: dict[str, Any] = {
    "normalize_before": False,
    "add_final_layer_norm": False,
    "static_position_embeddings": False,
    "add_bias_logits": False,
    "normalize_embedding": True,
    "do_blenderbot_90_layernorm": False,
    "extra_pos_embeddings": 2,
    "is_encoder_decoder": True,
    "tie_word_embeddings": True,
    "encoder_layerdrop": 0.0,  # LayerDrop is not implemented (training-time only)
    "decoder_layerdrop": 0.0,
}

# Keys HF itself ignores when loading BART (fairseq leftovers).
_IGNORED_KEYS = ("model.encoder.version", "model.decoder.version")
# Aliases of the shared embedding that HF ties; stored copies must equal model.shared.weight.
_TIED_ALIASES = (
    "lm_head.weight",
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
)


class CheckpointError(UserError, ValueError):
    """A checkpoint does not match our BART (unused/missing key, shape, unsupported flag)."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """A checkpoint or tokenizer folder is missing, lacks a file, or the hub could not give it."""


# ----------------------------------------------------------------------------------------------
# Config translation


def config_from_hf(hf: Mapping[str, Any] | Any, **overrides: Any) -> ModelConfig:
    """ModelConfig from a BartConfig or its dict (config.json); `overrides` set dtype/remat etc.

    Refuses configs of other model types or with flags our model does not implement.
    """
    d = dict(hf if isinstance(hf, Mapping) else hf.to_dict())
    model_type = d.get("model_type", "bart")
    if model_type != "bart":
        raise CheckpointError(
            f"config model_type={model_type!r}; only 'bart' checkpoints are supported "
            "(mBART, Pegasus, Marian use a different architecture)"
        )
    for flag, want in _REQUIRED_FLAGS.items():
        if flag in d and d[flag] is not None and d[flag] != want:
            raise CheckpointError(
                f"config.json sets {flag}={d[flag]!r}, which meta_mask's BART does not implement "
                f"(supported: {flag}={want!r})"
            )
    kwargs = {name: d[name] for name in _SHARED_FIELDS if name in d}
    for name in ("eos_token_id", "forced_eos_token_id"):
        if isinstance(kwargs.get(name), list):  # BartConfig allows lists; we decode with one id
            ids = kwargs[name]
            if len(ids) != 1:
                raise CheckpointError(f"config.json {name}={ids}: expected a single token id")
            kwargs[name] = ids[0]
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json dict that transformers.BartConfig / from_pretrained reads back."""
    d: dict[str, Any] = {name: getattr(config, name) for name in _SHARED_FIELDS}
    d.update(
        model_type="bart",
        architectures=["BartForConditionalGeneration"],
        is_encoder_decoder=True,
        tie_word_embeddings=True,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        classifier_dropout=0.0,
        use_cache=True,
    )
    return d


# ----------------------------------------------------------------------------------------------
# The name map


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: our tree path, the HF key, and whether the tensor is transposed."""

    ours: tuple[str, ...]
    hf: str
    transpose: bool = False  # Dense kernel [in,out] <-> torch Linear weight [out,in]
    unsqueeze: bool = False  # final_logits_bias [V] <-> [1,V]


def _linear(ours: tuple[str, ...], hf: str) -> list[Entry]:
    return [Entry((*ours, "kernel"), f"{hf}.weight", True), Entry((*ours, "bias"), f"{hf}.bias")]


def _layer_norm(ours: tuple[str, ...], hf: str) -> list[Entry]:
    return [Entry((*ours, "scale"), f"{hf}.weight"), Entry((*ours, "bias"), f"{hf}.bias")]


def name_map(config: ModelConfig) -> list[Entry]:
    """Every parameter of `Bart(config)`, with its HF state-dict key (explicit, in order)."""
    entries = [
        Entry(("shared", "embedding"), "model.shared.weight"),
        Entry(("final_logits_bias",), "final_logits_bias", unsqueeze=True),
    ]
    for side, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        entries.append(
            Entry((side, "embed_positions", "embedding"), f"model.{side}.embed_positions.weight")
        )
        entries += _layer_norm((side, "layernorm_embedding"), f"model.{side}.layernorm_embedding")
        attns = ["self_attn"] + (["encoder_attn"] if side == "decoder" else [])
        for i in range(n_layers):
            ours, hf = (side, f"layers_{i}"), f"model.{side}.layers.{i}"
            for attn in attns:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    entries += _linear((*ours, attn, proj), f"{hf}.{attn}.{proj}")
                entries += _layer_norm((*ours, f"{attn}_layer_norm"), f"{hf}.{attn}_layer_norm")
            entries += _linear((*ours, "fc1"), f"{hf}.fc1")
            entries += _linear((*ours, "fc2"), f"{hf}.fc2")
            entries += _layer_norm((*ours, "final_layer_norm"), f"{hf}.final_layer_norm")
    return entries


def _param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax  # local: keeps `config_from_hf` importable without initializing jax

    from meta_mask.model.bart import init_params

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), (1, 2)))
    return {tuple(k.key for k in path): leaf.shape for path, leaf in _flatten(shapes)}


def _flatten(tree: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    import jax

    return iter(jax.tree_util.tree_flatten_with_path(tree)[0])


def _hf_shape(entry: Entry, ours: tuple[int, ...]) -> tuple[int, ...]:
    if entry.transpose:
        return tuple(reversed(ours))
    if entry.unsqueeze:
        return (1, *ours)
    return ours


def hf_state_to_params(state: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, Any]:
    """HF state dict (numpy) -> our nested params (float32 numpy). Strict; see module docstring."""
    state = _normalize_prefix(dict(state))
    for key in _IGNORED_KEYS:
        state.pop(key, None)
    _resolve_tied(state)
    if "final_logits_bias" not in state:
        # HF lists final_logits_bias in _keys_to_ignore_on_load_missing and zero-initializes it.
        state["final_logits_bias"] = np.zeros((1, config.vocab_size), np.float32)

    shapes = _param_shapes(config)
    entries = name_map(config)
    mapped = {e.hf for e in entries}
    unused = sorted(set(state) - mapped)
    if unused:
        raise CheckpointError(
            f"checkpoint keys not used by meta_mask's BART: {unused[:10]}"
            + (f" (+{len(unused) - 10} more)" if len(unused) > 10 else "")
            + f"; config: encoder_layers={config.encoder_layers}, "
            f"decoder_layers={config.decoder_layers}"
        )
    missing = [e.hf for e in entries if e.hf not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint is missing keys: {missing[:10]}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    params: dict[str, Any] = {}
    for e in entries:
        tensor = np.asarray(state[e.hf])
        want = _hf_shape(e, shapes[e.ours])
        if tensor.shape != want:
            raise CheckpointError(
                f"shape mismatch for {e.hf}: checkpoint has {tuple(tensor.shape)}, the config "
                f"expects {want} (our parameter {'/'.join(e.ours)} {shapes[e.ours]})"
            )
        value = tensor.T if e.transpose else (tensor[0] if e.unsqueeze else tensor)
        _set(params, e.ours, np.ascontiguousarray(value, dtype=np.float32))
    return params


def params_to_hf_state(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """Our params -> HF state dict (float32 numpy), tied aliases omitted like save_pretrained."""
    flat = {tuple(k.key for k in path): leaf for path, leaf in _flatten(params)}
    entries = name_map(config)
    expected = {e.ours for e in entries}
    if set(flat) != expected:
        extra, missing = sorted(set(flat) - expected), sorted(expected - set(flat))
        raise CheckpointError(
            f"params do not match the config: unexpected {extra[:5]}, missing {missing[:5]}"
        )
    shapes = _param_shapes(config)
    state = {}
    for e in entries:
        value = np.asarray(flat[e.ours], dtype=np.float32)
        if value.shape != shapes[e.ours]:
            raise CheckpointError(
                f"shape mismatch for {'/'.join(e.ours)}: params have {value.shape}, the config "
                f"expects {shapes[e.ours]}"
            )
        value = value.T if e.transpose else (value[None] if e.unsqueeze else value)
        state[e.hf] = np.ascontiguousarray(value)
    return state


def _normalize_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A checkpoint saved from BartModel (base_model_prefix "model") lacks the "model." prefix.
    if any(k.startswith("model.") for k in state):
        return state
    return {
        k if k in ("final_logits_bias", "lm_head.weight") else f"model.{k}": v
        for k, v in state.items()
    }


def _resolve_tied(state: dict[str, np.ndarray]) -> None:
    present = [k for k in ("model.shared.weight", *_TIED_ALIASES) if k in state]
    if not present:
        return  # reported as missing model.shared.weight
    shared = state.setdefault("model.shared.weight", state[present[0]])
    for alias in _TIED_ALIASES:
        if alias in state:
            other = state.pop(alias)
            if other.shape != shared.shape or not np.array_equal(other, shared):
                raise CheckpointError(
                    f"{alias} {tuple(other.shape)} differs from model.shared.weight "
                    f"{tuple(shared.shape)}; meta_mask's BART ties them (untied embeddings are "
                    "not supported)"
                )


def _set(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------
# Files and the hub


def resolve_dir(path_or_id: str, allow_patterns: list[str], flag: str = "path_or_id") -> Path:
    """A local folder as is; otherwise a hub id through `huggingface_hub.snapshot_download`.

    `flag` names the caller's argument/flag in the error, so the user knows what to change.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise CheckpointNotFoundError(f"{flag}={path_or_id!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=path_or_id, allow_patterns=allow_patterns))
    except Exception as err:  # offline mode, no network, unknown repo: all need the same fix
        # The hub's own traceback adds nothing to its message, which is kept here.
        raise CheckpointNotFoundError(
            f"{flag}={path_or_id!r} is not a local folder, and fetching it from the Hugging Face "
            f"hub failed ({type(err).__name__}: {err}). If this machine is offline, download the "
            f"folder elsewhere (e.g. `hf download {path_or_id} --local-dir DIR`), copy it here "
            f"and pass its local path as {flag}=DIR."
        ) from None


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors (or a sharded index) as float32 numpy arrays."""
    index = folder / WEIGHTS_INDEX_NAME
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise CheckpointNotFoundError(
            f"{folder} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (pytorch_model.bin is "
            "not supported: convert it to safetensors)"
        )
    from safetensors import safe_open

    state: dict[str, np.ndarray] = {}
    for file in files:
        # framework="flax" reads bfloat16/float16 too (numpy has no bfloat16).
        with safe_open(str(file), framework="flax") as f:
            for key in f.keys():
                state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return state


def load_hf(
    path_or_id: str, *, flag: str = "path_or_id", **config_overrides: Any
) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, params) from a local folder or hub id holding config.json + safetensors.

    `config_overrides` set our own fields (dtype="bfloat16", remat=True, dropout=...).
    """
    folder = resolve_dir(path_or_id, HUB_PATTERNS, flag)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointNotFoundError(f"{config_file} not found ({flag}={path_or_id!r})")
    try:
        config = config_from_hf(json.loads(config_file.read_text()), **config_overrides)
    except ValueError as err:  # CheckpointError or ModelConfig's own field validation
        raise CheckpointError(f"{config_file}: {err}") from None
    try:
        params = hf_state_to_params(read_safetensors(folder), config)
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    return config, params


def save_hf(params: Mapping[str, Any], config: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write config.json + model.safetensors (float32) into out_dir, atomically.

    The files are written to a temporary sibling folder that then replaces out_dir, so a crash
    never leaves a half-written checkpoint behind.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    state = params_to_hf_state(params, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_tokenizer(path_or_id: str, *, flag: str = "path_or_id") -> Any:
    """A fast (`tokenizers`-backed) transformers tokenizer from a local folder or hub id."""
    from transformers import AutoTokenizer

    folder = resolve_dir(path_or_id, TOKENIZER_PATTERNS, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:  # no or unreadable tokenizer files
        raise CheckpointNotFoundError(
            f"{flag}={path_or_id!r}: no usable tokenizer in {folder} ({err})"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(
            f"{flag}={path_or_id!r} gives a slow tokenizer ({type(tokenizer).__name__}); "
            "meta_mask needs a fast one (tokenizer.json) for offsets and word ids"
        )
    return tokenizer
