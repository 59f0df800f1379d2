"""A request's own decoding settings in a continuous batch, and the batched code that applies them
row by row.

Each row of a decode step may carry its own settings. They apply in Transformers' order, with
a value per row (a neutral value leaves a row as it is):

1. logit bias (Transformers' `sequence_bias` with one-token sequences; OpenAI's `logit_bias`);
2. repetition penalty (Transformers' / CTRL's: a score of a token already in the prompt or the
   generated tokens is divided by the penalty where positive, multiplied where negative);
3. frequency and presence penalties (OpenAI's: `score - count * frequency - (count > 0) *
   presence`, counting the generated tokens only);
4. temperature, top-k, top-p, min-p (Transformers' warpers, in that order);
5. the draw (sampled rows; greedy rows take their argmax): an exponential race, argmax p / q with
   q = -log(1 - u), whose uniforms u come from Philox keyed by the request's seed at counter
   (token id, the request's draw index), so a request's draws depend on nothing beside it. Steps 4
   and 5 are one kernel on a GPU (`ops.triton_row_sample`).

The counts live on the device ([rows, vocab], `TokenCounts`), reset when a request that needs
them takes a row and updated after each step with the tokens drawn, so no step waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the settings that only sampling reads
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "seed")
# the per-request settings the step holds in float32 tensors
FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def fits_float32(x) -> bool:
    """Whether `x` is a number (not a bool) that a float32 tensor holds as a finite value."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and abs(x) <= _FLOAT32_MAX


@dataclass(frozen=True)
class Sampling:
    """A request's own decoding settings (`add_request(temperature=..., repetition_penalty=...)`),
    the manager's generation config filling what it leaves out."""

    do_sample: bool
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # 0: off
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id

    KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "seed", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "logit_bias")

    @property
    def counts(self) -> bool:
        """Whether the row's penalties read its token counts."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def processes(self) -> bool:
        """Whether the row's scores change before the warpers (bias or penalties)."""
        return self.counts or bool(self.logit_bias)

    @classmethod
    def of(cls, kwargs: dict, default: Sampling, request_id, vocab: int) -> Sampling:
        """Checked settings from `add_request`'s keyword arguments over `default`; `logit_bias`
        ({token id: bias}) replaces the default's."""
        where = f"add_request({request_id!r})" if request_id is not None else "add_request"
        unknown = sorted(set(kwargs) - set(cls.KEYS))
        if unknown:
            raise TypeError(f"{where}: unknown per-request settings {unknown}; a request may set "
                            f"{', '.join(cls.KEYS)} (other settings go in the manager's GenerationConfig)")
        v = {k: kwargs.get(k, getattr(default, k)) for k in cls.KEYS}
        # the step holds them in float32 and int64 tensors: a value past those would fail the step of
        # every row, not this request alone
        for k in FLOAT_SETTINGS:
            if not fits_float32(v[k]):
                raise TypeError(f"{where}: {k} must be a finite number within float32's range, got {v[k]!r}")
            v[k] = float(v[k])
        for k in ("top_k", "seed"):
            if v[k] is not None and (isinstance(v[k], bool) or not isinstance(v[k], int)):
                raise TypeError(f"{where}: {k} must be an int, got {v[k]!r}")
        if v["top_k"] >= vocab:  # keeps every token, as top_k=0 does (and fits the step's int64s)
            v["top_k"] = 0
        if not isinstance(v["do_sample"], bool):
            raise TypeError(f"{where}: do_sample must be a bool, got {v['do_sample']!r}")
        if not v["temperature"] > 0:
            raise ValueError(f"{where}: temperature must be a positive float, got {v['temperature']} (greedy "
                             "decoding is do_sample=False)")
        if not 0.0 < v["top_p"] <= 1.0:
            raise ValueError(f"{where}: top_p must be in (0, 1], got {v['top_p']}")
        if not 0.0 <= v["min_p"] <= 1.0:
            raise ValueError(f"{where}: min_p must be in [0, 1] (0: off), got {v['min_p']}")
        if v["top_k"] < 0:
            raise ValueError(f"{where}: top_k must be >= 0 (0: off), got {v['top_k']}")
        if v["seed"] is not None and not 0 <= v["seed"] < 2**63:
            raise ValueError(f"{where}: seed must be in [0, 2**63), got {v['seed']}")
        if not v["repetition_penalty"] > 0:
            raise ValueError(f"{where}: repetition_penalty must be positive (1.0: off), got {v['repetition_penalty']}")
        if "logit_bias" in kwargs:
            v["logit_bias"] = _bias_items(kwargs["logit_bias"], vocab, where)
        if not v["do_sample"]:
            set_ = [k for k in SAMPLING_ONLY if k in kwargs]
            if set_:
                raise ValueError(f"{where}: {set_} apply to sampling, but this request decodes greedily: pass "
                                 "do_sample=True (or set it in the manager's GenerationConfig)")
        return cls(**v)


def _bias_items(bias, vocab: int, where: str) -> tuple[tuple[int, float], ...]:
    """`{token id: bias}` (or None) as sorted (id, bias) pairs, checked."""
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise TypeError(f"{where}: logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    items = []
    for tok, b in bias.items():
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
            raise ValueError(f"{where}: logit_bias: {tok!r} is not a token id of the vocabulary (0 .. {vocab - 1})")
        if not fits_float32(b):
            raise ValueError(f"{where}: logit_bias[{tok}] must be a finite number, got {b!r}")
        items.append((tok, float(b)))
    return tuple(sorted(items))


def single_token_bias(sequence_bias) -> tuple[tuple[int, float], ...] | None:
    """A generation config's `sequence_bias` as (id, bias) pairs where every sequence is one token
    long (what the batch applies); None where some sequence is longer."""
    from ..generation.logits_process import SequenceBiasLogitsProcessor

    if not sequence_bias:
        return ()
    pairs = SequenceBiasLogitsProcessor(sequence_bias).sequence_bias
    if any(len(seq) != 1 for seq in pairs):
        return None
    return tuple(sorted((seq[0], b) for seq, b in pairs.items()))


@dataclass
class RowSettings:
    """A step's per-row settings on the device, for B rows. A filter no row uses is None."""

    sampled: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B]
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    repetition: torch.Tensor | None
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row in the step, token id, bias)
    any_sampled: bool
    counts: bool  # whether some row's penalties read the token counts

    @classmethod
    def of(cls, settings: list[Sampling], put) -> RowSettings:
        """From each row's settings (`put(values, dtype)`: a host list to a device tensor)."""
        def column(name: str, neutral, dtype=torch.float32, sampling_only: bool = False):
            values = [getattr(s, name) if (s.do_sample or not sampling_only) else neutral for s in settings]
            return put(values, dtype) if any(x != neutral for x in values) else None

        biased = [(i, t, b) for i, s in enumerate(settings) for t, b in s.logit_bias]
        bias = None
        if biased:
            rows, toks, values = zip(*biased)
            bias = (put(list(rows), torch.long), put(list(toks), torch.long), put(list(values), torch.float32))
        return cls(sampled=put([s.do_sample for s in settings], torch.bool),
                   temperature=put([s.temperature if s.do_sample else 1.0 for s in settings], torch.float32),
                   top_k=column("top_k", 0, torch.long, True), top_p=column("top_p", 1.0, sampling_only=True),
                   min_p=column("min_p", 0.0, sampling_only=True), repetition=column("repetition_penalty", 1.0),
                   frequency=column("frequency_penalty", 0.0), presence=column("presence_penalty", 0.0), bias=bias,
                   any_sampled=any(s.do_sample for s in settings), counts=any(s.counts for s in settings))


def warp_rows(scores_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor | None,
              top_p_B: torch.Tensor | None, min_p_B: torch.Tensor | None = None) -> torch.Tensor:
    """Transformers' temperature, top-k, top-p and min-p warpers (in that order, keeping at least
    one token), with a setting per row: `top_k_B` 0, `top_p_B` 1.0 and `min_p_B` 0.0 leave a row
    as it is; None: no row filters. Float32 scores in, the warped scores out (filtered tokens -inf)."""
    scores = scores_BV / temperature_B[:, None]
    if top_k_B is not None or top_p_B is not None:
        V = scores.shape[-1]
        # ascending, as Transformers' top-p sorts; stable, as CUDA's sort of a row leaves ties
        asc, order = scores.sort(dim=-1, stable=True)
        if top_k_B is not None:
            # the k-th largest score; a row keeps the scores not below it (0: all)
            kth = asc.gather(1, (V - top_k_B.clamp(0, V)).clamp(max=V - 1)[:, None])
            kth = torch.where(top_k_B[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
            asc = asc.masked_fill(asc < kth, -float("inf"))
        if top_p_B is not None:
            # drop the smallest scores whose probabilities sum to at most 1 - top_p, never the largest
            drop = (asc.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p_B)[:, None]) & (top_p_B < 1)[:, None]
            drop[:, -1] = False
            asc = asc.masked_fill(drop, -float("inf"))
        scores = torch.empty_like(scores).scatter_(1, order, asc)
    if min_p_B is not None:
        # drop tokens less likely than min_p times the likeliest (which always stays)
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < min_p_B[:, None] * probs.amax(dim=-1, keepdim=True), -float("inf"))
    return scores


_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b (a < 2**32, b int64 in [0, 2**32)), in int64 without overflow."""
    lo16 = a * (b & 0xFFFF)
    t = a * (b >> 16) + (lo16 >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo16 & 0xFFFF)


def philox4x32(c: tuple, k: tuple, rounds: int = 10) -> tuple:
    """Philox-4x32 (Salmon et al., 2011) on int64 tensors holding 32-bit words: counter words
    `c` (4) and key words `k` (2) in, the 4 output words out (as Triton's `tl.philox` computes them)."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _U32, (k1 + _PHILOX_KEY[1]) & _U32
    return c0, c1, c2, c3


def philox_uniform(seed: torch.Tensor, draw: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1), multiples of 2**-24, of broadcastable int64 tensors: Philox-4x32-10
    keyed by the seed (low word, high word) at counter (token id, draw index, 0, 0), the first
    output word's top 24 bits. The fused draw (`ops.triton_row_sample`) computes the same with
    `tl.philox`."""
    seed, draw, token = torch.broadcast_tensors(seed, draw, token)
    zero = torch.zeros_like(token)
    r, *_ = philox4x32((token, draw & _U32, zero, zero), (seed & _U32, (seed >> 32) & _U32))
    return (r >> 8).to(torch.float32) * 2.0**-24


def draw_rows(scores_BV: torch.Tensor, rows: RowSettings, seed_B: torch.Tensor, first_B: torch.Tensor,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 of the module's list and the draw: (tokens [B], the warped scores [B, V]) of float32
    scores. A sampled row races `q = -log(1 - u)` (u from `philox_uniform` at its seed and draw
    index `step - first_B`) and takes argmax p / q, which draws from p; a greedy row takes its
    argmax. One kernel on a GPU the fused kernels serve (`ops.triton_row_sample`), else torch."""
    from ..ops import fused

    if fused.SAMPLE_KERNEL and fused.serves(scores_BV.device):
        from ..ops import triton_row_sample

        return triton_row_sample.draw(scores_BV, rows.sampled, rows.temperature, rows.top_k, rows.top_p,
                                      rows.min_p, seed_B, first_B, step)
    return draw_rows_torch(scores_BV, rows, seed_B, first_B, step)


def draw_rows_torch(scores_BV: torch.Tensor, rows: RowSettings, seed_B: torch.Tensor, first_B: torch.Tensor,
                    step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_rows` in torch."""
    scores = warp_rows(scores_BV, rows.temperature, rows.top_k, rows.top_p, rows.min_p)
    tokens = scores.argmax(dim=-1)
    if rows.any_sampled:
        drawn = race(scores.softmax(dim=-1), rows.sampled, seed_B, step - first_B, sparse=scores.device.type == "cpu")
        tokens = torch.where(rows.sampled, drawn, tokens)
    return tokens, scores


def race(p_BV: torch.Tensor, sampled_B: torch.Tensor, seed_B: torch.Tensor, draw_B: torch.Tensor,
         sparse: bool) -> torch.Tensor:
    """The exponential race of each row's probabilities: argmax p / q, q = -log(1 - u) with u from
    `philox_uniform` at (seed, draw index, token). `sparse`: the uniforms of the sampled rows'
    tokens of nonzero probability alone (on a CPU a row's 32000 uniforms cost milliseconds; the
    selection waits on the device, so a GPU takes every token's)."""
    if sparse:
        r, c = ((p_BV > 0) & sampled_B[:, None]).nonzero(as_tuple=True)
        q = -(1 - philox_uniform(seed_B[r], draw_B[r], c)).log()
        return torch.zeros_like(p_BV).index_put_((r, c), p_BV[r, c] / q).argmax(dim=-1)
    token = torch.arange(p_BV.shape[-1], device=p_BV.device)
    return (p_BV / -(1 - philox_uniform(seed_B[:, None], draw_B[:, None], token)).log()).argmax(dim=-1)


def penalize_rows(scores_BV: torch.Tensor, generated_BV: torch.Tensor | None, prompt_BV: torch.Tensor | None,
                  rows: RowSettings) -> torch.Tensor:
    """Steps 1-3 of the module's list on float32 scores, a setting per row: `generated_BV` the
    rows' counts of their generated tokens, `prompt_BV` their prompts' tokens (bool)."""
    if rows.bias is not None:
        scores_BV = scores_BV.index_put(rows.bias[:2], rows.bias[2], accumulate=True)
    if rows.repetition is not None:
        seen = prompt_BV | (generated_BV > 0)
        r = rows.repetition[:, None]
        scores_BV = torch.where(seen, torch.where(scores_BV < 0, scores_BV * r, scores_BV / r), scores_BV)
    if rows.frequency is not None:
        scores_BV = scores_BV - generated_BV * rows.frequency[:, None]
    if rows.presence is not None:
        scores_BV = scores_BV - (generated_BV > 0).to(scores_BV.dtype) * rows.presence[:, None]
    return scores_BV


class TokenCounts:
    """Each row's counts of the tokens its request generated ([R, V] float32) and its prompt's
    tokens ([R, V] bool), on the device. Only a row whose request has penalties is kept exact:
    other rows' counts are stale or count throwaway tokens, which their neutral settings ignore."""

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.generated = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        self.prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)

    def reset(self, rows: list[int], prompts: list[list[int]], put, generated: list[list[int]] | None = None) -> None:
        """Rows that requests take, with their prompts and the tokens they generated so far
        (`generated`, default none; `put`: a host list to a device tensor)."""
        rows_t = put(rows, torch.long)
        self.generated[rows_t] = 0
        self.prompt[rows_t] = False
        flat_rows = put([row for row, p in zip(rows, prompts) for _ in p], torch.long)
        self.prompt[flat_rows, put([t for p in prompts for t in p], torch.long)] = True
        if generated and any(generated):
            self.add(put([row for row, g in zip(rows, generated) for _ in g], torch.long),
                     put([t for g in generated for t in g], torch.long))

    def add(self, rows_B: torch.Tensor, tokens_B: torch.Tensor) -> None:
        """Count tokens in their rows (a row may repeat)."""
        self.generated.index_put_((rows_B, tokens_B), torch.ones_like(tokens_B, dtype=torch.float32),
                                  accumulate=True)
