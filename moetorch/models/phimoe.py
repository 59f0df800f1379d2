"""PhiMoE (Phi-3.5-MoE): GQA attention with LongRoPE, LayerNorm, and 16 SwiGLU experts routed
top-2 by sparsemixer.

Legend: B batch, T new tokens, S key slots, D hidden, H query heads, G kv heads, d head_dim,
E experts, K experts per token (2), I expert hidden size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cache import Cache, rotate_and_update
from ..configuration import PhimoeConfig
from ..generation import GenerationMixin
from ..modeling_utils import PreTrainedModel, check_packing_kwargs, decoder_forward
from ..ops.activations import ACTIVATIONS
from ..ops.attention import attention
from ..ops.linear import linears, plain_weight
from ..ops.moe import experts_forward
from ..ops.norms import LayerNorm, Residual
from ..ops.rope import RotaryEmbedding
from ..ops.routing import sparsemixer, switch_aux_loss
from ..outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, takes_cache_name
from .heads import causal_lm, classify, loss_positions


class PhimoeAttention(nn.Module):
    def __init__(self, config: PhimoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = config._attn_implementation
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)

    def forward(self, x_BTD, rope, mask, is_causal, cache: Cache | None, cache_position_T, need_weights):
        B, T, _ = x_BTD.shape
        cos, sin = rope
        layers, slots = (self.q_proj, self.k_proj, self.v_proj), {"cache_position": cache_position_T}
        # at decode with a static cache: projections, rotary and the cache write in one kernel
        qkv = None
        if cache is not None:
            qkv = cache.project_rotated(x_BTD, layers, self.head_dim, cos, sin, self.layer_idx, slots)
        if qkv is not None:
            q, k, v = qkv
        else:
            q, k, v = linears(x_BTD, *layers)  # one kernel at decode
            q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            q, k, v = rotate_and_update(cache, q, k, v, cos, sin, self.layer_idx, slots)
        out_BTHd, weights = attention(
            q, k, v, mask, is_causal, self.scale, self.attn_implementation,
            dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
            kv_rows=cache.slot_rows if cache is not None else None,
        )
        return linears(out_BTHd.reshape(B, T, -1), self.o_proj)[0], weights


class PhimoeExperts(nn.Module):
    """E SwiGLU experts stored as stacked `[E, out, in]` tensors (Transformers-5 layout)."""

    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__()
        E, D, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.act = ACTIVATIONS[config.hidden_act]
        self.backend: str | None = None  # None: chosen per call (see ops.moe.pick_backend)

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, 0.0, std)
        nn.init.normal_(self.down_proj, 0.0, std)

    def forward(self, x_TD, ids_TK, weights_TK, combine: bool = True):
        """[T, D]; combine=False: maybe [T, K, D], summed by the residual add (ops.moe.experts_forward)."""
        return experts_forward(
            x_TD, self.gate_up_proj, self.down_proj, ids_TK, weights_TK, self.act, self.backend, combine
        )


class PhimoeTopKRouter(nn.Linear):
    """The router's [E, D] projection. Random init draws its weight twice, as Transformers does (once
    as a Linear, once as the router), so that a seeded model gets Transformers' weights."""

    def init_parameters(self, std: float) -> None:
        self.weight.normal_(0.0, std)
        self.weight.normal_(0.0, std)


class PhimoeSparseMoeBlock(nn.Module):
    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__()
        self.router = PhimoeTopKRouter(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = PhimoeExperts(config)
        self.router_jitter = config.router_jitter_noise
        self.input_jitter = config.input_jitter_noise

    def forward(self, x_BTD, routing=None, combine: bool = True):
        """`routing`: (weights, ids, logits) when the norm's kernel already routed x (inference).
        combine=False: the output may be [B, T, K, D], for a residual add to sum (ops.norms.Residual)."""
        B, T, D = x_BTD.shape
        if self.training and self.input_jitter > 0:
            # Once, as in the original model (Transformers applies it twice, in place).
            x_BTD = x_BTD * torch.empty_like(x_BTD).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
        x_TD = x_BTD.reshape(-1, D)
        if routing is None:
            logits_TE = self.router(x_TD)
            weights_TK, ids_TK = sparsemixer(logits_TE, self.router_jitter, self.training)
        else:
            weights_TK, ids_TK, logits_TE = routing
        y = self.experts(x_TD, ids_TK, weights_TK, combine)
        return y.view(B, T, *y.shape[1:]), logits_TE


class PhimoeDecoderLayer(nn.Module):
    # the weights that may stay in pinned host memory while the layer runs on a GPU (a layer that
    # from_pretrained places on the CPU): the MLP experts', read by their kernels over the bus
    host_mappable = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    experts_per_token = 2  # sparsemixer's top-2

    def __init__(self, config: PhimoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = PhimoeAttention(config, layer_idx)
        self.mlp = PhimoeSparseMoeBlock(config)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, r: Residual, rope, mask, is_causal, cache, cache_position_T, need_weights):
        # the previous layer's pending add, then the norm: one kernel at inference
        x_BTD, h = self.input_layernorm.add_norm(*r)
        a, weights = self.self_attn(h, rope, mask, is_causal, cache, cache_position_T, need_weights)
        # x + attention, the norm, and (at decode) the router: one kernel at inference
        x_BTD, h, routing = self.post_attention_layernorm.add_norm_route(
            x_BTD, a, None, plain_weight(self.mlp.router), 2, sparsemixer_eps=self.mlp.router_jitter
        )
        m, logits_TE = self.mlp(h, routing, combine=False)
        return Residual(x_BTD, m), weights, (logits_TE,)


class PhimoePreTrainedModel(PreTrainedModel):
    config_class = PhimoeConfig
    base_model_prefix = "model"
    # what accelerate / PEFT read, as Transformers defines them: a decoder layer is never split over devices
    _no_split_modules = ["PhimoeDecoderLayer"]


class PhimoeModel(PhimoePreTrainedModel):
    """The bare PhiMoE decoder, returning hidden states (`MoeModelOutputWithPast`)."""

    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PhimoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_parameters)
        self.post_init()

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def padding_idx(self) -> int | None:
        return self.config.pad_token_id

    @takes_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **packing: Any,
    ) -> MoeModelOutputWithPast | tuple:
        """`packing`: flash-attention's keywords for packed sequences (`cu_seq_lens_q`, ...), which
        trainers pass beside `position_ids`; the mask that `position_ids` gives is the same attention.
        (`_loss_positions`, from the causal LM head: the positions whose outputs its loss reads.)"""
        loss_positions = packing.pop("_loss_positions", None)
        check_packing_kwargs(type(self).__name__, packing)
        return decoder_forward(
            self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, output_router_logits, cache_position, return_dict,
            sliding_window=self.config.sliding_window,
            loss_positions_BT=loss_positions,
        )


class PhimoeForCausalLM(PhimoePreTrainedModel, GenerationMixin):
    """PhiMoE with a language-modelling head (biased when `lm_head_bias`)."""

    loss_type = "ForCausalLM"
    # as Transformers 5.23 (the head shares the embeddings' weight where tie_word_embeddings is set)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__(config)
        self.model = PhimoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        # the router loss's settings, copied from the config as Transformers' model does: set on the
        # model they change the loss, set on the config afterwards they do not
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    @takes_cache_name
    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, position_ids=None,
        use_cache=True, logits_to_keep=0, **kwargs,
    ):
        """`GenerationMixin.prepare_inputs_for_generation` as Transformers' PhiMoE overrides it: a
        step whose ids reach past `original_max_position_embeddings` (where LongRoPE switches to its
        long factors) while the cache holds no more than that drops the cache, so that the whole
        sequence runs again."""
        omax = self.config.original_max_position_embeddings
        if (past_key_values and omax is not None and input_ids.shape[1] >= omax + 1
                and past_key_values.get_seq_length() <= omax):
            past_key_values = None
            kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            position_ids=position_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
        )

    @takes_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **loss_kwargs: Any,
    ) -> MoeCausalLMOutputWithPast | tuple:
        cfg = self.config
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, output_router_logits, cache_position, return_dict=True,
            _loss_positions=loss_positions(labels, loss_kwargs, input_ids if input_ids is not None else inputs_embeds),
        )
        return causal_lm(
            self, out, attention_mask, labels, logits_to_keep, output_router_logits, loss_kwargs, return_dict,
            self.router_loss, self.router_aux_loss_coef,
        )

    def router_loss(self, router_logits: tuple[torch.Tensor, ...], pad_mask_BT: torch.Tensor | None) -> torch.Tensor:
        """Switch load-balancing loss over every layer's router (plain softmax + top-k, not sparsemixer)."""
        return switch_aux_loss(router_logits, self.num_experts, self.num_experts_per_tok, pad_mask_BT)


class PhimoeForSequenceClassification(PhimoePreTrainedModel):
    """PhiMoE with a linear classifier on the last non-padding token."""

    loss_type = "ForSequenceClassification"
    # Transformers' Trainer reads this before the forward's **kwargs: it then passes no loss keywords and
    # averages accumulated losses (docs/differences.md)
    accepts_loss_kwargs = False

    def __init__(self, config: PhimoeConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PhimoeModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @takes_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_probs: bool | None = None,
        **kwargs: Any,
    ):
        # output_router_logits is accepted as Transformers accepts it; the classifier's output has no
        # router logits, so they are not computed. output_router_probs, and other keywords: as the
        # base model takes them (`check_packing_kwargs`)
        check_packing_kwargs(type(self).__name__, {"output_router_probs": output_router_probs, **kwargs})
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, False, cache_position, return_dict=True,
        )
        return classify(self, out, input_ids, inputs_embeds, labels, return_dict)
