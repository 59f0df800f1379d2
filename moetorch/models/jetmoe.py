"""JetMoE: a Mixture of Attention heads (MoA) and a mixture of SwiGLU MLP experts, both routed
top-k per token, with RMSNorm and (by default) tied embeddings.

Legend: B batch, T new tokens, S key slots, N = B*T tokens, D hidden, E experts, K experts per token,
G kv heads, d head dim (kv_channels), C = G*d (an attention expert's width), H = K*G query heads,
I MLP expert hidden size.

MoA: a token's K attention experts each project it to G query heads; the H = K*G heads share one
K/V projection, and head h = k*G + g reads kv head g = h % G ("tiled", not GQA's h // (H/G)).
The cache therefore holds G heads of size d, never tiled copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cache import Cache, rotate_and_update
from ..configuration import JetMoeConfig
from ..generation import GenerationMixin
from ..modeling_utils import PreTrainedModel, check_packing_kwargs, decoder_forward
from ..ops.activations import ACTIVATIONS
from ..ops.attention import attention
from ..ops.linear import linears, plain_weight
from ..ops.moe import expert_map, expert_reduce, experts_forward
from ..ops.norms import Residual, RMSNorm
from ..ops.rope import RotaryEmbedding
from ..ops.routing import route_topk, switch_aux_loss, z_loss
from ..outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, takes_cache_name
from .heads import causal_lm, classify, loss_positions

# Transformers builds the per-layer norms with its default eps, whatever `rms_norm_eps` says (only
# the final norm reads it). Checkpoints were trained that way.
LAYER_NORM_EPS = 1e-6


class JetMoeRMSNorm(RMSNorm):
    """RMSNorm: float32 normalisation, rounded to the input dtype, then scaled (ops.norms)."""


class JetMoeExpertWeights(nn.Module):
    """E stacked projections `[E, out, in]` (one module so the checkpoint name is `<name>.weight`).

    Calling it with `op` returns `op(weight)`. A wrapper in its place acts on the call (PEFT's LoRA
    on a parameter, `target_parameters`, reparametrises the weight for the length of the call), so
    the experts read their weight through `with_weight`, which calls the wrapper."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def init_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, 0.0, std)

    def forward(self, op):
        return op(self.weight)


def plain_expert_weight(experts: nn.Module) -> torch.Tensor | None:
    """The weight of a plain JetMoeExpertWeights, else None: a wrapper in its place (PEFT)
    exposes the base weight but changes it for the length of its call (as `ops.linear.plain_weight`
    for a Linear)."""
    return experts.weight if type(experts) is JetMoeExpertWeights else None


def with_weight(experts: nn.Module, op):
    """`op(weight)` of a JetMoeExpertWeights: the weight read directly where the module is plain,
    else through the module's call (a PEFT wrapper in its place reparametrises the weight there).
    The direct read saves the call's microseconds on the eager paths."""
    weight = plain_expert_weight(experts)
    return op(weight) if weight is not None else experts(op)


class JetMoeRouter(nn.Module):
    """Top-k of float32 logits, softmax over the k chosen; weights in the input's dtype."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x_ND):
        return route_topk(self.layer(x_ND), self.top_k, x_ND.dtype)


class JetMoeMoA(nn.Module):
    """The attention experts: query projections (`map`), output projections (`reduce`) and the
    output bias, which the decoder layer adds with the residual (after the K experts are combined)."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        E, D, C = config.num_local_experts, config.hidden_size, config.num_key_value_heads * config.kv_channels
        # in Transformers' order (see JetMoeDecoderLayer)
        self.input_linear = JetMoeExpertWeights(E, D, C)
        self.output_linear = JetMoeExpertWeights(E, C, D)
        self.router = JetMoeRouter(D, E, config.num_experts_per_tok)
        self.bias = nn.Parameter(torch.empty(D))
        self.backend: str | None = None  # None: chosen per call (see ops.moe.pick_backend)

    def init_parameters(self, std: float) -> None:
        nn.init.zeros_(self.bias)

    def map(self, x_ND, ids_NK):
        return with_weight(self.input_linear, lambda w: expert_map(x_ND, w, ids_NK, self.backend))

    def reduce(self, o_NKC, ids_NK, weights_NK, combine: bool = True):
        return with_weight(self.output_linear,
                           lambda w: expert_reduce(o_NKC, w, ids_NK, weights_NK, self.backend, combine))

    def map_weight(self) -> torch.Tensor | None:
        """The map's weight for a kernel that stands in for `map` (at decode, the kv projection's),
        or None where the map is wrapped (PEFT) and must run through its call."""
        return plain_expert_weight(self.input_linear) if self.backend is None else None


class JetMoeAttention(nn.Module):
    def __init__(self, config: JetMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.top_k, self.n_kv, self.head_dim = (
            config.num_experts_per_tok, config.num_key_value_heads, config.kv_channels
        )
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = config._attn_implementation
        self.experts = JetMoeMoA(config)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.n_kv * self.head_dim, bias=False)

    def forward(
        self, x_BTD, rope, mask, is_causal, cache: Cache | None, cache_position_T, need_weights, routing=None,
        combine: bool = True,
    ):
        """(output without the bias, attention weights, router logits); combine=False: the output may be
        [B, T, K, D], for a residual add to sum (ops.norms.Residual)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weights_NK, ids_NK, logits_NE = routing if routing is not None else self.experts.router(x_ND)
        cos, sin = rope
        slots = {"cache_position": cache_position_T}
        # at decode with a static cache: kv projection, rotary of the keys and the cache write in one
        # kernel (at one token the MoA map too). The queries go to the attention unrotated, which
        # rotates them as it reorders their heads for the kv heads (or, at decode, as it loads them).
        kv = None
        if cache is not None:
            w = self.experts.map_weight()
            experts = (w, ids_NK) if w is not None else None
            kv = cache.project_rotated(x_BTD, (self.kv_proj,), self.head_dim, cos, sin, self.layer_idx, slots, experts)
        q = kv[0] if kv is not None else None  # the map, where the kv kernel took it
        if q is None:
            # [N, K, G*d] -> [B, H, T, d]: head h = k*G + g
            q = self.experts.map(x_ND, ids_NK).view(B, T, -1, self.head_dim).transpose(1, 2)
        if kv is not None:
            _, k, v = kv
        else:
            k, v = linears(x_BTD, self.kv_proj)[0].chunk(2, dim=-1)
            k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
            _, k, v = rotate_and_update(cache, None, k, v, cos, sin, self.layer_idx, slots)
        out_BTHd, weights = attention(
            q, k, v, mask, is_causal, self.scale, self.attn_implementation,
            dropout_p=self.dropout if self.training else 0.0, kv_layout="tiled", need_weights=need_weights,
            rope_q=(cos, sin),
            kv_rows=cache.slot_rows if cache is not None else None,
        )
        y = self.experts.reduce(out_BTHd.reshape(B * T, self.top_k, -1), ids_NK, weights_NK, combine)
        return y.view(B, T, *y.shape[1:]), weights, logits_NE


class JetMoeMoE(nn.Module):
    """E SwiGLU experts `[E, 2I, D]` / `[E, D, I]`, routed top-k, plus an output bias (which the
    decoder layer adds with the residual)."""

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__()
        E, D, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.input_linear = JetMoeExpertWeights(E, D, 2 * I)
        self.output_linear = JetMoeExpertWeights(E, I, D)
        self.router = JetMoeRouter(D, E, config.num_experts_per_tok)
        self.bias = nn.Parameter(torch.empty(D))
        self.act = ACTIVATIONS[config.activation_function]
        self.backend: str | None = None

    def init_parameters(self, std: float) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x_BTD, routing=None, combine: bool = True):
        """(output without the bias, router logits); combine=False: the output may be [B, T, K, D],
        for a residual add to sum (ops.norms.Residual)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        weights_NK, ids_NK, logits_NE = routing if routing is not None else self.router(x_ND)
        y = with_weight(self.input_linear, lambda w13: with_weight(self.output_linear, lambda w2: experts_forward(
            x_ND, w13, w2, ids_NK, weights_NK, self.act, self.backend, combine,
        )))
        return y.view(B, T, *y.shape[1:]), logits_NE


class JetMoeDecoderLayer(nn.Module):
    # the weights that may stay in pinned host memory while the layer runs on a GPU (a layer that
    # from_pretrained places on the CPU): the MLP experts', read by their kernels over the bus
    host_mappable = ("mlp.input_linear.weight", "mlp.output_linear.weight")

    def __init__(self, config: JetMoeConfig, layer_idx: int) -> None:
        super().__init__()
        # registered in Transformers' order, so that named_parameters() lists the same sequence (an
        # optimizer's state, which is kept by position, then carries over between the libraries)
        self.mlp = JetMoeMoE(config)
        self.input_layernorm = JetMoeRMSNorm(config.hidden_size, LAYER_NORM_EPS)
        self.post_attention_layernorm = JetMoeRMSNorm(config.hidden_size, LAYER_NORM_EPS)
        self.self_attention = JetMoeAttention(config, layer_idx)

    @property
    def experts_per_token(self) -> int:
        return self.mlp.router.top_k

    def forward(self, r: Residual, rope, mask, is_causal, cache, cache_position_T, need_weights):
        # Each norm with the residual add before it and (at decode) the router reading its output:
        # one kernel at inference. The first adds the previous layer's MLP output.
        attn_router, mlp_router = self.self_attention.experts.router, self.mlp.router
        x_BTD, h, routing = self.input_layernorm.add_norm_route(
            *r, plain_weight(attn_router.layer), attn_router.top_k, logits_f32=True
        )
        a, weights, attn_logits_NE = self.self_attention(
            h, rope, mask, is_causal, cache, cache_position_T, need_weights, routing, combine=False
        )
        # x + (attention + bias), then the norm
        x_BTD, h, routing = self.post_attention_layernorm.add_norm_route(
            x_BTD, a, self.self_attention.experts.bias, plain_weight(mlp_router.layer), mlp_router.top_k,
            logits_f32=True,
        )
        m, mlp_logits_NE = self.mlp(h, routing, combine=False)
        # Transformers records the attention router twice per layer (as the router's output and as the
        # attention's), and its router_logits and aux loss carry both copies: so do ours.
        return (Residual.leaving(self, x_BTD, m, self.mlp.bias), weights,
                (attn_logits_NE, attn_logits_NE, mlp_logits_NE))


class JetMoePreTrainedModel(PreTrainedModel):
    config_class = JetMoeConfig
    base_model_prefix = "model"
    # what accelerate / PEFT read, as Transformers defines them: a decoder layer is never split over devices
    _no_split_modules = ["JetMoeDecoderLayer"]


class JetMoeModel(JetMoePreTrainedModel):
    """The bare JetMoE decoder, returning hidden states (`MoeModelOutputWithPast`).

    `router_logits` holds three `[B*T, E]` float32 tensors per layer, as in Transformers:
    attention router, attention router again, MLP router.
    """

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(JetMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = JetMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        # "dynamic" and "longrope" pick their table per forward, as Transformers' JetMoE runs them
        self.rotary_emb = RotaryEmbedding(config.kv_channels, config.rope_parameters, config.max_position_embeddings,
                                          per_forward=True)
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
            loss_positions_BT=loss_positions,
        )


def jetmoe_router_loss(
    router_logits: tuple[torch.Tensor, ...], config: JetMoeConfig, pad_mask_BT: torch.Tensor | None,
    num_experts: int, top_k: int,
) -> torch.Tensor:
    """The router loss of `config.router_loss_recipe` over a model's `router_logits` (3 per layer),
    for `num_experts` experts and `top_k` a token (the model's attributes of those names).

    "transformers": one Switch loss over all entries, the attention router counted twice per layer.
    "jetmoe": sum over the 2 routers of each layer of (Switch loss with assignment fractions over all
    T*K assignments + router_z_loss_coef * z-loss), as the original JetMoE code trains.
    Padding tokens (0 in `pad_mask_BT`) count in neither.
    """
    E, K = num_experts, top_k
    if config.router_loss_recipe == "transformers":
        return switch_aux_loss(router_logits, E, K, pad_mask_BT)
    once = [r for i, r in enumerate(router_logits) if i % 3 != 1]  # drop the attention router's copy
    terms = [
        switch_aux_loss((r,), E, K, pad_mask_BT) / K + config.router_z_loss_coef * z_loss((r,), pad_mask_BT)
        for r in once
    ]
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()  # the routers may sit on several devices


class JetMoeForCausalLM(JetMoePreTrainedModel, GenerationMixin):
    """JetMoE with a language-modelling head, tied to the input embeddings when `tie_word_embeddings`."""

    loss_type = "ForCausalLM"
    # as Transformers 5.23 (the head shares the embeddings' weight where tie_word_embeddings is set)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__(config)
        self.model = JetMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # copied from the config as Transformers' model does: set on the model they change the
        # router loss, set on the config afterwards they do not
        self.aux_loss_coef = config.aux_loss_coef
        self.tie_word_embeddings = config.tie_word_embeddings
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
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
            self.router_loss, self.aux_loss_coef,
        )

    def router_loss(self, router_logits: tuple[torch.Tensor, ...], pad_mask_BT: torch.Tensor | None) -> torch.Tensor:
        """See `jetmoe_router_loss`."""
        return jetmoe_router_loss(router_logits, self.config, pad_mask_BT, self.num_experts, self.num_experts_per_tok)


class JetMoeForSequenceClassification(JetMoePreTrainedModel):
    """JetMoE with a linear classifier on the last non-padding token."""

    loss_type = "ForSequenceClassification"
    # Transformers' Trainer reads this before the forward's **kwargs: it then passes no loss keywords and
    # averages accumulated losses (docs/differences.md)
    accepts_loss_kwargs = False

    def __init__(self, config: JetMoeConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = JetMoeModel(config)
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
