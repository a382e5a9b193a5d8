"""DataPipeline: the trainer's view of the data config: token streams, the rank-sharded training
loader, evaluation batches, and the resumable position.

Batches reach the device ready for a forward without host syncs: token ids are range-checked and the
packed documents' boundaries (`Documents.on_host`) computed on the CPU, where that costs nothing, so the
model's forward queues its kernels without waiting for the GPU (the trainer calls it with check_ids=False).
A batch is {"input_ids", "labels"}: (micro_batch_size, seq_len) int64 on the device, and "documents"."""

from __future__ import annotations

import torch

from moetron.data import DataLoader, TokenStream, builtin_token_streams, eval_batches
from moetron.model.transformer import Documents, check_token_ids
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
        self.vocab_size = model.vocab_size
        self.loader = DataLoader(self.train, data.seq_len, data.micro_batch_size, mesh.dp_rank, mesh.dp_size, seed=seed)

    def next_train_batch(self, device: torch.device) -> dict:
        return self._to_device(self.loader.next_batch(), device)

    def eval_batches(self, max_batches: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        if self.val is None or max_batches == 0:
            return []
        batches = eval_batches(
            self.val, self.data.seq_len, self.data.micro_batch_size, self.mesh.dp_rank, self.mesh.dp_size, max_batches
        )
        return [self._to_device(b, device) for b in batches]

    def _to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict:
        """A CPU batch (input_ids, labels, doc_ids) checked and prepared on the host, then copied to `device`."""
        check_token_ids(batch["input_ids"], batch["labels"], self.vocab_size)
        out = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels")}
        out["documents"] = Documents.on_host(batch["doc_ids"], device)
        return out

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
