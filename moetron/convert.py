"""Checkpoint conversion CLI between Hugging Face directories and moetron's native directory.

    python -m moetron.convert --from hf      --src HF_DIR      --dst MOETRON_DIR [--dtype bf16|fp32|fp16]
    python -m moetron.convert --from moetron --src MOETRON_DIR --dst HF_DIR      [--dtype ...]
                              [--arch deepseek_v3|mixtral|qwen3_moe|llama]

A moetron directory holds `model.safetensors` (moetron tensor names) and `config.yaml` (ModelConfig).
Tokenizer and generation files found in the source directory are copied along, so a model converted
there and back is a complete HF checkpoint again. Without --dtype the stored dtypes are kept.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from moetron.model.hf import ARCHITECTURES, from_hf, model_type_of, read_hf_config, to_hf
from moetron.model.io import load_moetron, save_moetron

DTYPE_CHOICES = ("bf16", "fp32", "fp16")
# Files that belong to the checkpoint but not to the weights; copied as they are when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moetron.convert",
        description="Convert checkpoints between Hugging Face and moetron directories.",
    )
    parser.add_argument("--from", dest="source", required=True, choices=("hf", "moetron"), help="format of --src")
    parser.add_argument("--src", required=True, type=Path, help="directory to read")
    parser.add_argument("--dst", required=True, type=Path, help="directory to write (created if missing)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="parameter dtype (default: as stored)")
    parser.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        default=None,
        help="HF architecture to write with --from moetron (default: inferred from the config)",
    )
    return parser


def convert(source: str, src: Path, dst: Path, dtype: str | None = None, arch: str | None = None) -> str:
    """Run one conversion and return its one-line summary."""
    start = time.perf_counter()
    if not src.exists():
        raise FileNotFoundError(f"--src {str(src)!r} does not exist")
    if not src.is_dir():
        raise FileNotFoundError(f"--src {str(src)!r} is a file; pass the checkpoint's directory")
    if src.resolve() == dst.resolve():
        raise ValueError(f"--src and --dst are the same directory {str(src)!r}; write the conversion elsewhere")
    if source == "hf":
        if arch is not None:
            raise ValueError("--arch applies to --from moetron only (an HF checkpoint names its model_type)")
        model_type = model_type_of(read_hf_config(src))  # clear errors before reading any weights
        model = from_hf(src, dtype=dtype)
        save_moetron(model, dst)
        what = f"hf({model_type}) -> moetron"
    else:
        model = load_moetron(src, dtype=dtype)
        hf_config = to_hf(model, dst, architecture=arch)
        what = f"moetron -> hf({hf_config['model_type']})"
    copied = _copy_side_files(src, dst)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    extras = f", copied {', '.join(copied)}" if copied else ""
    return (
        f"{what}: {src} -> {dst}: {n_params / 1e6:.2f}M parameters, {cfg.n_layers} layers"
        f"{f' + {cfg.mtp_depth} MTP' if cfg.mtp_depth else ''}, {str(model.embed.weight.dtype).removeprefix('torch.')}"
        f"{extras} ({time.perf_counter() - start:.1f} s)"
    )


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = convert(args.source, args.src, args.dst, args.dtype, args.arch)
    except (ValueError, FileNotFoundError) as err:
        print(f"moetron.convert: error: {err}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
