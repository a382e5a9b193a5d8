"""Mixture-of-experts feed-forward: router, grouped experts, shared experts and load balancing.

A token's hidden state goes to `top_k` of `n_routed_experts` SwiGLU experts chosen by the router and
to every shared expert (DeepSeekMoE, Dai et al. 2024). Routing is dropless by default: tokens are
sorted by expert and each expert runs one GEMM over its contiguous slice (`kernels.grouped_gemm`).
With `capacity_factor` set, an expert keeps at most ceil(capacity_factor * tokens * top_k / n_experts)
tokens, in token order, and the rest of its assignments are dropped (and counted).

Load balancing (DeepSeek-V3 section 2.1.2):
* auxiliary-loss-free: a per-expert bias is added to the scores for *selecting* experts only; the gate
  weights use the unbiased scores. After each optimizer step `update_expert_bias` moves the bias by
  `bias_update_rate * sign(mean_load - load)`, so overloaded experts become less attractive;
* sequence-wise balance loss alpha * sum_i f_i P_i per sequence (V3 eq. 17-20);
* optionally the classic batch-wise auxiliary loss, the same formula over all tokens of the batch.

FP8 (`cfg.fp8.enabled`): the experts' grouped GEMMs run in FP8 (`kernels.fp8_grouped_linear.fp8_grouped_linear`),
whose weight gradient needs every expert's rows to start at a multiple of 128. The dispatch then
places each expert's rows at a 128-aligned offset of a zero-filled buffer sized for the worst case
(tokens * top_k + n_experts * 127, rounded up to 128), with the offsets computed on the device (no
host sync), and reads the outputs back from the same places. Zero rows give zero outputs and take no
gradient. The bf16 path is unchanged (`pad_groups_to` = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moetron.kernels import grouped_gemm
from moetron.kernels.fp8_grouped_linear import fp8_grouped_linear
from moetron.kernels.fp8_linear import FP8_BLOCK, FP8WeightCache
from moetron.kernels.fp8_swiglu import fp8_swiglu_linear
from moetron.model.config import FP8Config, ModelConfig
from moetron.model.layers import SwiGLU


@dataclass
class Routing:
    indices: torch.Tensor  # (tokens, top_k) int64, chosen experts
    weights: torch.Tensor  # (tokens, top_k) fp32 gate weights
    scores: torch.Tensor  # (tokens, n_experts) fp32 affinities (softmax or sigmoid), without bias


class Router(nn.Module):
    """Token-to-expert affinities and top-k selection (softmax or sigmoid scoring, optional
    group-limited routing, optional selection bias). Scores are computed in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.score_func, self.norm_topk_prob = cfg.score_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.bias_update_rate = cfg.bias_update_rate
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.d_model))
        # Selection bias of aux-loss-free balancing: state, not a parameter (no gradient, not in the
        # optimizer); persistent so checkpoints and HF's e_score_correction_bias carry it.
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last `reset_load` (for bias updates and logging).
        self.register_buffer("load", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> Routing:
        """x (tokens, d_model) -> Routing."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32, also under autocast
            logits = F.linear(x.float(), self.weight.float())  # (tokens, n_experts)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores.detach() + self.expert_bias  # the bias steers selection only
        if self.n_group > 1:
            choice = self._limit_to_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices  # (tokens, top_k)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.training and not _recomputing():
            with torch.no_grad():
                self.load += count_per_expert(indices.flatten(), self.n_experts).float()
        return Routing(indices, weights, scores)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only experts of each token's best `topk_group` groups; a group scores the sum of its
        two best experts (DeepSeek-V3's node-limited routing)."""
        tokens = choice.shape[0]
        grouped = choice.view(tokens, self.n_group, -1)  # (tokens, n_group, experts_per_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (tokens, n_group)
        best = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, -1)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None) -> None:
        """b_i += rate * sign(mean_load - load_i). `load` defaults to this rank's accumulated counts;
        data-parallel callers pass the counts summed over ranks."""
        load = self.load if load is None else load
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def reset_load(self) -> None:
        self.load.zero_()


class GroupedExperts(nn.Module):
    """n_experts SwiGLU experts stored as 3-D weights, computed with grouped GEMMs over tokens
    sorted by expert; in FP8 with `fp8` enabled (then every group must start at a multiple of 128). In FP8 the
    gate and up projections run as one grouped GEMM over their joint FP8 forms (fp8_grouped_linear's siblings:
    x quantized once, one GEMM for y and one for dX; `gate_up_together`, on, is there for comparisons), and with
    `fp8.fuse_swiglu` the SwiGLU quantizes h for the down projection itself."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, fp8: FP8Config | None = None):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.fp8 = fp8 is not None and fp8.enabled
        self.pow2_scales = self.fp8 and fp8.pow2_scales
        self.fuse_swiglu = self.fp8 and fp8.fuse_swiglu
        self.gate_up_together = True
        cache = self.fp8 and fp8.cache_weights
        names = ("gate_up", "gate_proj", "up_proj", "down_proj")
        self.fp8_weight_caches = {name: FP8WeightCache() for name in names} if cache else {}

    def forward(self, x: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """x (routed tokens, d_model) sorted by expert; group_ends (n_experts,) cumulative counts."""
        if self.fp8 and self.gate_up_together:
            cache = self.fp8_weight_caches.get("gate_up")
            gate_up = fp8_grouped_linear(x, self.gate_proj, group_ends, self.pow2_scales, None, cache, self.up_proj)
            gate, up = gate_up.split(self.gate_proj.shape[1], dim=-1)
        else:
            gate, up = self._mm(x, "gate_proj", group_ends), self._mm(x, "up_proj", group_ends)
        if self.fuse_swiglu:  # h quantized in the SwiGLU for the down projection (moetron.kernels.fp8_swiglu)
            cache = self.fp8_weight_caches.get("down_proj")
            return fp8_swiglu_linear(gate, up, self.down_proj, group_ends, self.pow2_scales, None, cache)
        return self._mm(F.silu(gate) * up, "down_proj", group_ends)

    def _mm(self, x: torch.Tensor, name: str, group_ends: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, name)
        if self.fp8:
            return fp8_grouped_linear(x, weight, group_ends, self.pow2_scales, cache=self.fp8_weight_caches.get(name))
        return grouped_gemm(x, weight, group_ends)

    def extra_repr(self) -> str:
        n_experts, hidden, d_model = self.gate_proj.shape
        fp8 = f", fp8=e4m3, pow2_scales={self.pow2_scales}" if self.fp8 else ""
        return f"n_experts={n_experts}, d_model={d_model}, hidden={hidden}{fp8}"


class MoE(nn.Module):
    """Routed + shared experts. forward(x (batch, seq, d_model)) -> (out, balance_loss or None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.seq_aux_loss_alpha, self.aux_loss_alpha = cfg.seq_aux_loss_alpha, cfg.aux_loss_alpha
        self.router = Router(cfg)
        self.experts = GroupedExperts(
            cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_hidden, cfg.fp8.group("routed_experts")
        )
        self.shared_experts = (
            SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.moe_ffn_hidden, cfg.fp8.group("shared_experts"))
            if cfg.n_shared_experts
            else None
        )
        # Each expert's rows start at a multiple of this in the grouped GEMMs' input (FP8's wgrad needs 128).
        self.pad_groups_to = FP8_BLOCK if self.experts.fp8 else 1
        # Assignments dropped by the capacity limit since the last reset (logging).
        self.register_buffer("dropped", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor):
        batch, seq, d_model = x.shape
        flat = x.reshape(-1, d_model)  # (tokens, d_model)
        routing = self.router(flat)
        out = self._routed(flat, routing).view(batch, seq, d_model)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, self._balance_loss(routing, batch, seq)

    def _routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        tokens, k = routing.indices.shape
        expert_of = routing.indices.reshape(-1)  # (tokens * top_k,) assignment -> expert
        order = torch.argsort(expert_of, stable=True)  # assignments sorted by expert, token order kept
        counts = count_per_expert(expert_of, self.n_experts)  # (n_experts,)
        if self.capacity_factor is not None:
            order, counts = self._drop_over_capacity(order, counts, expert_of, tokens)
        if self.pad_groups_to > 1:
            y = self._padded_experts(x[order // k], expert_of[order], counts)
        else:
            y = self.experts(x[order // k], counts.cumsum(0))  # (kept assignments, d_model)

        # Un-sort: gather each assignment's output back to (tokens, top_k); dropped ones read a zero row.
        slot = torch.full((tokens * k,), order.numel(), dtype=torch.long, device=x.device)
        slot[order] = torch.arange(order.numel(), device=x.device)
        y = torch.cat([y, y.new_zeros(1, y.shape[1])])[slot].view(tokens, k, -1)
        return (y * routing.weights[..., None]).sum(dim=1).to(x.dtype)

    def _padded_experts(self, x_sorted: torch.Tensor, sorted_expert: torch.Tensor, counts: torch.Tensor):
        """The experts over x_sorted (assignments, d_model) with each expert's rows moved to a multiple of
        `pad_groups_to` in a zero-filled buffer; returns (assignments, d_model) in x_sorted's order.
        The buffer has the worst-case size, so nothing here waits for the device."""
        multiple, n = self.pad_groups_to, x_sorted.shape[0]
        rows = -(-(n + self.n_experts * (multiple - 1)) // multiple) * multiple  # worst case, rounded
        padded_counts = (counts + multiple - 1) // multiple * multiple  # (n_experts,)
        padded_ends = padded_counts.cumsum(0)
        starts, padded_starts = counts.cumsum(0) - counts, padded_ends - padded_counts
        rank_in_expert = torch.arange(n, device=x_sorted.device) - starts[sorted_expert]
        dest = padded_starts[sorted_expert] + rank_in_expert  # (assignments,) row in the padded buffer
        x_padded = x_sorted.new_zeros(rows, x_sorted.shape[1]).index_copy(0, dest, x_sorted)  # (rows, d_model)
        y_padded = self.experts(x_padded, padded_ends.to(torch.int32))  # rows past padded_ends[-1] give 0
        return y_padded.index_select(0, dest)

    def _drop_over_capacity(self, order, counts, expert_of, tokens):
        capacity = math.ceil(self.capacity_factor * tokens * self.top_k / self.n_experts)
        starts = counts.cumsum(0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[expert_of[order]]
        keep = rank_in_expert < capacity
        if self.training and not _recomputing():
            self.dropped += (~keep).sum().float().detach()
        return order[keep], counts.clamp(max=capacity)

    def _balance_loss(self, routing: Routing, batch: int, seq: int):
        if not (self.seq_aux_loss_alpha or self.aux_loss_alpha) or not self.training:
            return None
        tokens = batch * seq
        chosen = torch.zeros_like(routing.scores).scatter_(1, routing.indices, 1.0)  # (tokens, n_experts)
        probs = routing.scores / routing.scores.sum(dim=-1, keepdim=True)  # normalized affinities s'
        loss = routing.scores.new_zeros(())
        if self.seq_aux_loss_alpha:
            loss = loss + self.seq_aux_loss_alpha * balance_loss(
                chosen.view(batch, seq, -1), probs.view(batch, seq, -1), self.top_k
            )
        if self.aux_loss_alpha:
            loss = loss + self.aux_loss_alpha * balance_loss(
                chosen.view(1, tokens, -1), probs.view(1, tokens, -1), self.top_k
            )
        return loss


def count_per_expert(expert_of: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(n_experts,) int64: how many entries of expert_of (int64, values in [0, n_experts)) name each expert.
    torch.bincount would do, but on a GPU it reads the input's min and max back to the host (two syncs
    per call, three calls per MoE layer and micro-batch with checkpointing); a scatter-add does not."""
    return torch.zeros(n_experts, dtype=torch.int64, device=expert_of.device).scatter_add_(
        0, expert_of, torch.ones_like(expert_of)
    )


def _recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when activation checkpointing re-runs this
    forward: statistics must not be counted twice."""
    return torch._C._current_graph_task_id() != -1


def balance_loss(chosen: torch.Tensor, probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """sum_i f_i * P_i averaged over groups of tokens (DeepSeek-V3 eq. 17-20 without alpha).

    chosen (groups, tokens, n_experts) 0/1 selection; probs (groups, tokens, n_experts) normalized
    scores. f_i = n_experts / (top_k * tokens) * #tokens choosing i (1 everywhere when balanced);
    P_i = mean over tokens of probs_i. One group per sequence gives the sequence-wise loss, one group
    for the whole batch the classic auxiliary loss.
    """
    n_experts, tokens = chosen.shape[-1], chosen.shape[1]
    f = chosen.sum(dim=1) * (n_experts / (top_k * tokens))  # (groups, n_experts)
    p = probs.mean(dim=1)  # (groups, n_experts)
    return (f * p).sum(dim=-1).mean()
