"""The moetron transformer: embedding, pre-norm blocks (attention + dense or MoE FFN), output head,
and DeepSeek-V3 multi-token prediction. A plain single-device nn.Module: no process groups inside,
buildable on the meta device, every heavy op through `moetron.kernels`.

Inputs and targets: `labels[b, t]` is the token to predict at position t (already shifted, i.e.
input_ids[b, t + 1] for plain language modelling); -100 marks positions without a target.

Packed sequences: pass `doc_ids` (batch, seq) or `cu_seqlens` (document boundaries over the flattened
batch*seq tokens). Attention then stays inside each document and positions restart at 0 at every
document start (unless `position_ids` are given).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moetron.model.attention import build_attention
from moetron.model.config import ModelConfig
from moetron.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from moetron.model.moe import GroupedExperts, MoE, Router

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss + balance_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None  # sequence-wise + classic auxiliary, summed over MoE layers


@dataclass
class Documents:
    """Where packed documents start: the masks and positions every layer shares.

    Built on the device (`from_starts`, `from_doc_ids` of device tensors), it costs two host syncs (the
    boundaries' count and the longest document), and every truncation for multi-token prediction two more.
    Built on the host (`on_host`, what the trainer does with its CPU batches), it costs none: the tensors
    are computed on the CPU and copied over, and `host_starts` keeps the CPU copy the truncations start from.
    """

    starts: torch.Tensor  # (batch, seq) bool, True at each document's first token
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 over the flattened batch*seq tokens
    doc_ids: torch.Tensor  # (batch, seq) int64, document index of each token
    max_seqlen: int  # the longest document: read once here so no layer has to sync for it
    host_starts: np.ndarray | None = None  # (batch, seq) bool: `starts` on the host, when built there

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> Documents:
        starts = starts.clone()
        starts[:, 0] = True  # every row starts a document
        flat = starts.flatten()
        boundaries = flat.nonzero().flatten()
        end = torch.tensor([flat.numel()], device=flat.device)
        cu_seqlens = torch.cat([boundaries, end]).to(torch.int32)
        doc_ids = (flat.cumsum(0) - 1).view(starts.shape)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(starts, cu_seqlens, doc_ids, max_seqlen)

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> Documents:
        """From per-token document numbers (batch, seq): a document starts wherever the number changes."""
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        return cls.from_starts(starts)

    @classmethod
    def on_host(cls, doc_ids: torch.Tensor, device: torch.device | str) -> Documents:
        """from_doc_ids computed on the CPU and copied to `device`: no host sync on the device's stream."""
        return cls._moved(cls.from_doc_ids(doc_ids.cpu()), device)

    @classmethod
    def _moved(cls, host: Documents, device) -> Documents:
        # Pageable host memory is staged by the copy call itself, so the CPU tensors may go right after.
        tensors = {
            name: getattr(host, name).to(device, non_blocking=True) for name in ("starts", "cu_seqlens", "doc_ids")
        }
        return cls(**tensors, max_seqlen=host.max_seqlen, host_starts=host.starts.numpy())

    def positions(self) -> torch.Tensor:
        """(batch, seq) position of each token inside its document."""
        flat_pos = torch.arange(self.starts.numel(), device=self.starts.device)
        return (flat_pos - self.cu_seqlens[self.doc_ids.flatten()].long()).view(self.starts.shape)

    def truncate(self, seq: int) -> Documents:
        """The documents of the first `seq` positions of every row (multi-token prediction's depths)."""
        if self.host_starts is not None:
            host = Documents.from_starts(torch.from_numpy(self.host_starts[:, :seq]))
            return Documents._moved(host, self.starts.device)
        return Documents.from_starts(self.starts[:, :seq])


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x)); ffn is SwiGLU or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        if layer_idx >= cfg.n_layers and cfg.fp8.enabled and "mtp" not in cfg.fp8.layers:
            cfg = replace(cfg, fp8=replace(cfg.fp8, enabled=False))  # an MTP block in bf16
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.fp8.group("dense_ffn"))

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None):
        """x (batch, seq, d_model) -> (x, balance loss of this layer or None)."""
        # the pre-norms are applied by the attention and the dense FFN (in FP8, fused into their quantization)
        x = x + self.attn(x, rope, cu_seqlens, max_seqlen, norm=self.attn_norm)
        if self.is_moe:  # (its router reads the normed x in bf16/fp32 as well)
            out, aux = self.ffn(self.ffn_norm(x))
        else:
            out, aux = self.ffn(x, norm=self.ffn_norm), None
        return x + out, aux


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 eq. 21-22): combine the previous depth's hidden
    state at position i with the embedding of token i + k, run one block, and predict token i + k + 1
    through the shared output head: h' = proj([norm(emb(t_{i+k})); norm(h_i)])."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.embed_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hidden_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # before the shared head

    def forward(self, hidden, next_embed, rope, cu_seqlens=None, max_seqlen=None):
        x = self.proj(torch.cat([self.embed_norm(next_embed), self.hidden_norm(hidden)], dim=-1))
        return self.block(x, rope, cu_seqlens, max_seqlen)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        # A dict keyed by layer index (same state-dict names as a list) so pipeline stages can drop
        # the layers they do not own without renumbering the rest.
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.mtp_depth))
        if not self.embed.weight.is_meta:
            self.init_weights()

    # ------------------------------------------------------------------ initialization
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices; output projections (o_proj, down_proj) get
        init_std / sqrt(2 * n_layers) when scaled_init (GPT-2/Megatron), so the residual stream's
        variance does not grow with depth; norms 1, biases 0, expert bias 0. Also (re)computes the
        rotary tables and re-ties the head to the embedding, so it completes a model built on the meta
        device and moved with to_empty() (which unties shared parameters)."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        std = cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5 if cfg.scaled_init else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=out_std if name.endswith(("o_proj", "down_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_proj, std=std)
                nn.init.normal_(module.up_proj, std=std)
                nn.init.normal_(module.down_proj, std=out_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()
                module.load.zero_()
            elif isinstance(module, MoE):
                module.dropped.zero_()
        if cfg.tie_embeddings:  # the loop above drew the shared matrix twice; keep the embedding's std
            nn.init.normal_(self.embed.weight, std=std)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        documents: Documents | None = None,
        check_ids: bool = True,
    ) -> ModelOutput:
        """input_ids (batch, seq) -> ModelOutput; with labels (batch, seq) also the losses.

        Packing comes as one of doc_ids, cu_seqlens or a prepared `documents` (Documents.on_host: no host
        sync). `check_ids=False` skips the token-id range check, a host sync on a GPU; for callers that
        checked the ids on the host (check_token_ids), as the trainer's data pipeline does."""
        self._check_shapes(input_ids, labels)
        if check_ids:
            check_token_ids(input_ids, labels, self.cfg.vocab_size)
        docs = self._documents(input_ids, doc_ids, cu_seqlens, documents)
        if position_ids is None:
            position_ids = docs.positions() if docs is not None else self._arange_positions(input_ids)
        packing = (docs.cu_seqlens, docs.max_seqlen) if docs is not None else (None, None)

        h = self.embed(input_ids)  # (batch, seq, d_model)
        rope = self.rope(position_ids)
        balance = []
        for layer in self.layers.values():
            h, aux = layer(h, rope, *packing)
            balance.append(aux)
        logits = self.lm_head(self.norm(h))  # (batch, seq, vocab)
        if labels is None:
            return ModelOutput(logits=logits)

        lm_loss = _cross_entropy(logits, labels)
        mtp_loss = self._mtp_loss(h, input_ids, labels, position_ids, docs, balance) if self.mtp else None
        balance = [b for b in balance if b is not None]
        balance_loss = torch.stack(balance).sum() if balance else None
        loss = lm_loss
        for part in (mtp_loss, balance_loss):
            if part is not None:
                loss = loss + part
        return ModelOutput(logits, loss, lm_loss, mtp_loss, balance_loss)

    def _mtp_loss(self, h, input_ids, labels, position_ids, docs, balance):
        """lambda / D * sum over depths k of the cross entropy of predicting token i + k + 1 at i.

        Depth k works on the first seq - k positions; its target at i is labels[i + k] and is ignored
        where token i + k belongs to another document than token i."""
        seq = input_ids.shape[1]
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            n = seq - k
            if n <= 0:
                break
            docs_k = docs.truncate(n) if docs is not None else None
            rope = self.rope(position_ids[:, :n])
            packing = (docs_k.cu_seqlens, docs_k.max_seqlen) if docs_k is not None else (None, None)
            h, aux = module(h[:, :n], self.embed(input_ids[:, k:]), rope, *packing)
            balance.append(aux)
            target = labels[:, k:]
            if docs is not None:
                same_doc = docs.doc_ids[:, :n] == docs.doc_ids[:, k:]
                target = target.masked_fill(~same_doc, IGNORE_INDEX)
            losses.append(_cross_entropy(self.lm_head(module.norm(h)), target))
        if not losses:
            return None
        return self.cfg.mtp_loss_weight / self.cfg.mtp_depth * torch.stack(losses).sum()

    # ------------------------------------------------------------------ router state
    def routers(self) -> dict[str, Router]:
        return {_plain_name(name): m for name, m in self.named_modules() if isinstance(m, Router)}

    @torch.no_grad()
    def update_expert_bias(self, loads: dict[str, torch.Tensor] | None = None) -> None:
        """After an optimizer step: move every router's selection bias towards balance and reset the
        load counters. `loads` (name -> tokens per expert) lets data-parallel callers pass counts
        summed over ranks; by default each router's own accumulated load is used."""
        for name, router in self.routers().items():
            if router.bias_update_rate:
                router.update_bias(None if loads is None else loads[name])
            router.reset_load()

    @torch.no_grad()
    def router_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per MoE layer, since the last reset: tokens per expert, max/mean load (1.0 = perfectly
        balanced), the selection bias, and assignments dropped by the capacity limit."""
        stats = {}
        for name, module in self.named_modules():
            if isinstance(module, MoE):
                load = module.router.load
                stats[_plain_name(name)] = {
                    "tokens_per_expert": load.clone(),
                    "max_over_mean_load": load.max() / load.mean().clamp(min=1e-9),
                    "expert_bias": module.router.expert_bias.clone(),
                    "dropped_tokens": module.dropped.clone(),
                }
        return stats

    def reset_router_stats(self) -> None:
        for module in self.modules():
            if isinstance(module, MoE):
                module.router.reset_load()
                module.dropped.zero_()

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _check_shapes(input_ids: torch.Tensor, labels: torch.Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor of shape (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")

    @staticmethod
    def _documents(input_ids, doc_ids, cu_seqlens, documents) -> Documents | None:
        if sum(arg is not None for arg in (doc_ids, cu_seqlens, documents)) > 1:
            raise ValueError("pass one of doc_ids, cu_seqlens and documents, not several")
        if documents is not None:
            if documents.starts.shape != input_ids.shape:
                raise ValueError(
                    f"documents for shape {tuple(documents.starts.shape)} must match input_ids shape {tuple(input_ids.shape)}"
                )
            return documents
        if doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(
                    f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
                )
            return Documents.from_doc_ids(doc_ids)
        if cu_seqlens is not None:
            batch, seq = input_ids.shape
            bounds = cu_seqlens.long()
            if bounds[0] != 0 or bounds[-1] != batch * seq or bool((bounds[1:] < bounds[:-1]).any()):
                raise ValueError(f"cu_seqlens must rise from 0 to batch*seq={batch * seq}, got {cu_seqlens.tolist()}")
            starts = torch.zeros(batch * seq + 1, dtype=torch.bool, device=input_ids.device)
            starts[bounds] = True
            starts = starts[:-1].view(batch, seq)
            if not bool(starts[:, 0].all()):
                raise ValueError(
                    "cu_seqlens: every row of the batch must start a document (a boundary at each multiple of seq)"
                )
            return Documents.from_starts(starts)
        return None

    @staticmethod
    def _arange_positions(input_ids):
        batch, seq = input_ids.shape
        return torch.arange(seq, device=input_ids.device).expand(batch, seq)


def _plain_name(name: str) -> str:
    """Module path without the segments wrappers insert (activation checkpointing, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy in fp32 over positions whose label is not IGNORE_INDEX (0 if none)."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def check_token_ids(input_ids: torch.Tensor, labels: torch.Tensor | None, vocab_size: int) -> None:
    """Every input id in [0, vocab_size) and every label there or IGNORE_INDEX, else a ValueError naming
    the first bad (batch, position): a Python error rather than a device-side assert in the embedding.
    On a GPU tensor this reads the result back (a host sync); on the host it is free of that."""
    if input_ids.is_meta or input_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        bad = (input_ids < 0) | (input_ids >= vocab_size)
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"input_ids contain token id {int(input_ids[tuple(where)])} at (batch, position) {tuple(where)} outside "
            f"the vocabulary [0, {vocab_size}); check the tokenizer matches ModelConfig.vocab_size={vocab_size}"
        )
    if labels is not None:
        invalid = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
        if bool(invalid.any()):
            where = invalid.nonzero()[0].tolist()
            raise ValueError(
                f"labels contain {int(labels[tuple(where)])} at (batch, position) {tuple(where)}: "
                f"targets must be in [0, {vocab_size}) or {IGNORE_INDEX} (ignored)"
            )
