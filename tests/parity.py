"""The shared parity runner: build a tiny model on one side, save it, load it on the other, and
compare every output field against Transformers."""

from __future__ import annotations

import torch
from archs import Arch, randomize_

from moetorch.gpu_check import real_rows

ATOL = 1e-5
RTOL = 1e-5


def make_pair(arch: Arch, tmp_path, head: str = "causal_lm", direction: str = "hf_to_ours", seed: int = 0, **overrides):
    """(hf_model, our_model) with identical random weights, moved through one library's save and
    the other's load. Both in eval mode, float32, eager attention."""
    torch.manual_seed(seed)
    if direction == "hf_to_ours":
        hf = arch.hf[head](arch.hf_config(**overrides))
        randomize_(hf, seed)
        hf.save_pretrained(tmp_path / "hf")
        ours = arch.ours[head].from_pretrained(tmp_path / "hf", attn_implementation="eager")
    else:
        ours = arch.ours[head](arch.our_config(**overrides))
        randomize_(ours, seed)
        ours.save_pretrained(tmp_path / "ours")
        hf = arch.hf[head].from_pretrained(tmp_path / "ours", attn_implementation="eager")
    hf.set_attn_implementation("eager")
    ours.set_attn_implementation("eager")
    return hf.eval(), ours.eval()


def make_inputs(vocab: int, batch: int, seq: int, padding: str | None, seed: int = 1, pad_id: int = 0):
    """Random ids and a 2D mask. padding: None (no mask), "none" (all-ones mask), "left", "right"."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    if padding is None:
        return ids, None
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        n = min(b + 1, seq - 1)
        if padding == "left":
            mask[b, :n] = 0
        elif padding == "right":
            mask[b, seq - n :] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def compare_outputs(hf_out, our_out, mask, fields=("logits", "hidden_states", "attentions", "router_logits", "loss", "aux_loss")):
    """Compare output fields; with a padding mask, only positions that are real tokens count
    (Transformers' own backends disagree on padding rows)."""
    valid = None if mask is None else mask.bool()
    for name in fields:
        a, b = getattr(hf_out, name), getattr(our_out, name)
        if a is None or (isinstance(a, tuple) and len(a) == 0):
            assert b is None or len(b) == 0, f"{name}: Transformers returned none, we returned some"
            continue
        assert b is not None, f"{name}: missing from our output"
        if isinstance(a, torch.Tensor):
            a, b = (a,), (b,)
        assert len(a) == len(b), f"{name}: {len(a)} tensors vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert x.shape == y.shape, f"{name}[{i}]: shape {tuple(x.shape)} vs {tuple(y.shape)}"
            close(real_rows(name, x, valid), real_rows(name, y, valid), f"{name}[{i}]")


class OpenAIPenalties:
    """OpenAI's frequency and presence penalties, as its API reference writes them, over the tokens
    past the prompt: mu[j] - c[j] * frequency - (c[j] > 0) * presence."""

    def __init__(self, frequency: float, presence: float, prompt_length: int) -> None:
        self.frequency, self.presence, self.prompt_length = frequency, presence, prompt_length

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for b in range(scores.shape[0]):
            generated = input_ids[b, self.prompt_length:].tolist()
            for tok in set(generated):
                out[b, tok] -= generated.count(tok) * self.frequency + self.presence
        return out


def greedy_config(n: int, **kw):
    """A moetorch GenerationConfig of n greedy tokens, pad 0, no EOS (`kw` overrides)."""
    import moetorch

    return moetorch.GenerationConfig(**{"max_new_tokens": n, "do_sample": False, "pad_token_id": 0,
                                        "eos_token_id": None, **kw})


def own_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The n greedy tokens of the model's own `generate` call on one prompt, with no EOS."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def run_queued(model, generation_config, cb: dict, requests: list[tuple], inside=None) -> tuple[dict, object]:
    """The requests ((id, prompt, add_request settings)), all queued before the loop starts (so
    that the first prefill takes them in order, with no race against the loop), through one
    manager: {id: final output}, and the manager. `inside`, when given, becomes the manager's
    `inside` attribute (a hook that tests' spies call)."""
    manager = model.init_continuous_batching(generation_config=generation_config, continuous_batching_config=cb)
    for rid, ids, kw in requests:
        manager.add_request(ids, request_id=rid, **kw)
    if inside is not None:
        manager.inside = inside
    manager.start()
    manager.stop(block=True, timeout=120)
    out = {}
    while (r := manager.get_result(timeout=0)) is not None:
        out[r.request_id] = r
    return out, manager


def run_requests(model, generation_config, cb: dict, requests: dict, timeout: float = 60) -> dict:
    """Each of `requests` ({id: (prompt ids, add_request settings)}) through one continuous
    batching manager: {id: its output}, none with an error."""
    with model.continuous_batching_context_manager(generation_config=generation_config,
                                                   continuous_batching_config=cb) as m:
        for rid, (prompt, kw) in requests.items():
            m.add_request(prompt, request_id=rid, **kw)
        out = {}
        while len(out) < len(requests):
            r = m.get_result(timeout=timeout)
            out[r.request_id] = r
    assert all(r.error is None for r in out.values()), {k: r.error for k, r in out.items()}
    return out
