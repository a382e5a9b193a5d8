"""Model weights on disk: safetensors directories (single file or sharded with an index), building a
Transformer from a state dict without a throwaway initialization, and moetron's native checkpoint
directory (`model.safetensors` + `config.yaml`) that `python -m moetron.convert` reads and writes.

Weights are only ever read and written with safetensors, never with pickle (`torch.load`).
Hugging Face checkpoints go through `moetron.model.hf`, which uses the helpers here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetron.model.config import ModelConfig
from moetron.model.layers import RotaryEmbedding
from moetron.model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_YAML = "config.yaml"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # as HF's save_pretrained did for years: 5 GiB per shard

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None (keep stored dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling HF configs use)."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------- safetensors directories
def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: the shards listed by `model.safetensors.index.json`
    when it exists, else `model.safetensors`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]  # tensor name -> shard file
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {found}); "
            "only safetensors checkpoints are read"
        )
    tensors = {}
    for file in files:
        if not (path / file).exists():
            raise FileNotFoundError(f"{INDEX_FILE} in {str(path)!r} lists shard {file!r}, which is missing")
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                if weight_map is None or weight_map.get(name) == file:
                    tensors[name] = f.get_tensor(name)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{INDEX_FILE} in {str(path)!r} lists tensors its shards lack: {absent[:10]}")
    return tensors


def write_safetensors_dir(
    tensors: Mapping[str, torch.Tensor], path: str | Path, max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write `tensors` as `model.safetensors`, or, when they exceed `max_shard_bytes` (None: never),
    as `model-00001-of-0000N.safetensors` shards plus `model.safetensors.index.json` (HF's layout).
    Tensors go in the given order, a new shard starting when the next tensor would overflow the
    current one. A stale single file or index from an earlier write is removed. Returns the files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        files = [SINGLE_FILE]
        (path / INDEX_FILE).unlink(missing_ok=True)
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        (path / SINGLE_FILE).unlink(missing_ok=True)
    weight_map = {}
    for file, names in zip(files, shards, strict=True):
        # clone: safetensors refuses tensors that share storage (views of one stacked or tied tensor)
        save_file({n: tensors[n].detach().to("cpu").contiguous().clone() for n in names}, str(path / file), metadata)
        weight_map.update({n: file for n in names})
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


# ---------------------------------------------------------------------- state dict -> model
def model_from_state_dict(
    cfg: ModelConfig,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A Transformer holding exactly the tensors of `state` (moetron names), built on the meta device
    so no memory or time goes to a random initialization that would be overwritten.

    Parameters take `dtype` (None: the dtype they are stored in); buffers keep the dtype the model
    declares (the router's selection bias stays fp32). With tie_embeddings, `lm_head.weight` may be
    absent (it is the embedding). Non-persistent buffers (rotary tables, load counters) are computed
    afresh. Raises ValueError listing missing or unexpected names and shape mismatches."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    buffer_names = {name for name, _ in model.named_buffers()}
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the head is the embedding
        expected.pop("lm_head.weight")
    _check_names_and_shapes(state, expected)

    loaded = {}
    for name, tensor in state.items():
        if name in buffer_names:
            target_dtype = expected[name].dtype
        elif dtype is None or not tensor.is_floating_point():
            target_dtype = tensor.dtype
        else:
            target_dtype = dtype
        loaded[name] = tensor.to(device=device, dtype=target_dtype)
    model.load_state_dict(loaded, strict=False, assign=True)  # strictness checked above
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight

    # Non-persistent buffers are not in any checkpoint: still on the meta device, so allocate them
    # (zeros: the load counters) and recompute the rotary frequencies.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.zeros_like(buffer, device=device))
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
    return model


def _check_names_and_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name}: got {tuple(state[name].shape)}, model expects {tuple(expected[name].shape)}"
        for name in expected
        if name in state and tuple(state[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_short(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches [{'; '.join(wrong[:10])}]")
    if problems:
        raise ValueError("state dict does not match the ModelConfig: " + ", ".join(problems))


def _short(names: list[str], limit: int = 12) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return str(names[:limit]) + more


# ---------------------------------------------------------------------- moetron's own directory
def save_moetron(model: Transformer, path: str | Path, max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write `model.safetensors` (moetron names; the tied head is not duplicated) and `config.yaml`."""
    path = Path(path)
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    if any(t.is_meta for t in state.values()):
        raise ValueError("save_moetron: the model is still on the meta device; materialize or load it first")
    write_safetensors_dir(state, path, max_shard_bytes)
    model.cfg.to_yaml(path / CONFIG_YAML)


def load_moetron(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Read a directory written by `save_moetron`; parameters in `dtype` (None: as stored). Eval mode."""
    path = Path(path)
    if not (path / CONFIG_YAML).exists():
        raise FileNotFoundError(f"{str(path)!r} is not a moetron checkpoint directory: {CONFIG_YAML} is missing")
    cfg = ModelConfig.from_yaml(path / CONFIG_YAML)
    return model_from_state_dict(cfg, read_safetensors_dir(path), parse_dtype(dtype), device).eval()


__all__ = [
    "dtype_name",
    "load_moetron",
    "model_from_state_dict",
    "parse_dtype",
    "read_safetensors_dir",
    "save_moetron",
    "write_safetensors_dir",
]
