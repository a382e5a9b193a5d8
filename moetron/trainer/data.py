"""DataPipeline: the trainer's view of the data config: token streams, the rank-sharded training
loader, evaluation batches, and the resumable position."""

from __future__ import annotations

import torch

from moetron.data import DataLoader, TokenStream, builtin_token_streams, eval_batches
from moetron.parallel.mesh import ParallelMesh


class DataPipeline:
    def __init__(self, data, model, mesh: ParallelMesh, seed: int):
        """`data` is the DataConfig, `model` the ModelConfig (its vocabulary must hold the data's)."""
        self.data, self.mesh = data, mesh
        if data.source == "builtin":
            tokenizer, self.train, self.val = builtin_token_streams(
                data.vocab_size, data.cache_dir, data.val_fraction, seed=0
            )
            vocab = tokenizer.vocab_size
        else:
            self.train = TokenStream.from_dir(data.path, "train")
            try:
                self.val = TokenStream.from_dir(data.path, "val")
            except ValueError:
                self.val = None  # a prepared directory without a validation split: no evaluation
            vocab = self.train.vocab_size or 0
        if vocab > model.vocab_size:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} is smaller than the data's vocabulary ({vocab}); "
                "raise model.vocab_size"
            )
        self.loader = DataLoader(self.train, data.seq_len, data.micro_batch_size, mesh.dp_rank, mesh.dp_size, seed=seed)

    def next_train_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in self.loader.next_batch().items()}

    def eval_batches(self, max_batches: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        if self.val is None or max_batches == 0:
            return []
        batches = eval_batches(
            self.val, self.data.seq_len, self.data.micro_batch_size, self.mesh.dp_rank, self.mesh.dp_size, max_batches
        )
        return [{k: v.to(device) for k, v in b.items()} for b in batches]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
