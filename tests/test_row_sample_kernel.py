"""The per-row draw of continuous batching: the kernel (ops/triton_row_sample.py, under Triton's CPU
interpreter) against the torch path (`row_sampling.draw_rows_torch`, whose warpers
tests/test_batching.py compares with Transformers'), Philox against its published answers, and the
draws against the distribution Transformers' warpers give."""

from __future__ import annotations

import pytest
import torch
import transformers
import triton
import triton.language as tl
from archs import PHIMOE
from parity import make_pair, run_requests

import moetorch
from moetorch.engine import batching, row_sampling
from moetorch.engine.row_sampling import RowSettings, Sampling
from moetorch.ops import triton_row_sample

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # rows of a few hundred values then span several blocks of the kernel's passes
    monkeypatch.setattr(triton_row_sample, "BLOCK", 64)


def put(values, dtype):
    return torch.tensor(values, dtype=dtype)


def random_settings(n: int, g: torch.Generator, V: int) -> list[Sampling]:
    """Rows with every mix of the filters, a greedy row among them."""
    out = []
    for i in range(n):
        r = torch.rand(4, generator=g).tolist()
        out.append(Sampling(
            do_sample=i % 5 != 1, temperature=0.3 + 1.5 * r[0],
            top_k=[0, 1, 3, int(r[1] * V), V + 4][i % 5] if i % 3 else 0,
            top_p=[1.0, 0.05 + 0.9 * r[2], 0.9, 0.5][i % 4], min_p=[0.0, 0.0, 0.3 * r[3]][i % 3], seed=i))
    return out


def both(scores, settings, seeds, firsts, step):
    rows = RowSettings.of(settings, put)
    got = triton_row_sample.draw(scores, rows.sampled, rows.temperature, rows.top_k, rows.top_p, rows.min_p,
                                 seeds, firsts, step)
    want = row_sampling.draw_rows_torch(scores, rows, seeds, firsts, step)
    return got, want, rows


def margin_rows(scores, rows, seeds, firsts, step):
    """Rows whose race's best ratio leads the next by more than a rounding difference (where the
    two paths' own roundings cannot change the winner)."""
    warped = row_sampling.warp_rows(scores, rows.temperature, rows.top_k, rows.top_p, rows.min_p)
    q = -(1 - row_sampling.philox_uniform(seeds[:, None], (step - firsts)[:, None], torch.arange(scores.shape[-1]))).log()
    ratio = torch.where(rows.sampled[:, None], warped.softmax(-1) / q, warped.softmax(-1))
    two = ratio.topk(2, dim=-1).values
    return (two[:, 0] - two[:, 1]) > 1e-5 * two[:, 0]


def test_philox_gives_the_published_answers():
    # Random123's known-answer vectors for Philox-4x32-10: (counter, key) -> output
    kat = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
           ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
           ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for c, k, want in kat:
        got = row_sampling.philox4x32(tuple(torch.tensor([x]) for x in c), tuple(torch.tensor([x]) for x in k))
        assert [int(x) for x in got] == list(want)


@triton.jit
def _uniforms_kernel(out_ptr, seed_ptr, draw_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.arange(0, BLOCK)
    u = triton_row_sample._uniform(tl.load(seed_ptr + row), idx, tl.load(draw_ptr + row).to(tl.int32))
    tl.store(out_ptr + row * V + idx, u, mask=idx < V)


def test_kernel_uniforms_are_philox_uniform():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    seeds = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**62 + 12345]), torch.randint(0, 2**62, (3,), generator=g)])
    draws = torch.tensor([0, 1, 7, 2**31 - 1, 5, 0, 3, 100])
    V = 50
    got = torch.empty(len(seeds), V)
    _uniforms_kernel[(len(seeds),)](got, seeds, draws, V, BLOCK=64)
    want = row_sampling.philox_uniform(seeds[:, None], draws[:, None], torch.arange(V))
    assert torch.equal(got, want)
    assert (want >= 0).all() and (want < 1).all() and torch.equal(want, (want * 2**24).round() / 2**24)
    # the uniforms move with the seed, the draw index and the token
    assert len({tuple(r) for r in want.tolist()}) == len(seeds)
    assert len(set(want[5].tolist())) > V - 2


@pytest.mark.parametrize("kind", ["float32", "ties"])
def test_kernel_is_the_torch_path(kind):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    checked = 0
    for trial in range(4):
        B, V = 10, 150 + 61 * trial  # not a multiple of the block
        if kind == "float32":
            scores = torch.randn(B, V, generator=g) * 3
        else:  # integer values: ties at the top-k value, the top-p boundary and the min-p cut
            scores = torch.randint(-4, 5, (B, V), generator=g).float()
        scores[0, : V // 2] = -float("inf")  # never drawn, never kept past a filter that cuts them
        settings = random_settings(B, g, V)
        seeds = torch.randint(0, 2**62, (B,), generator=g)
        firsts = torch.randint(0, 50, (B,), generator=g)
        (tok, warped), (want_tok, want_warped), rows = both(scores, settings, seeds, firsts, 60 + trial)
        assert torch.equal(torch.isinf(warped), torch.isinf(want_warped)), f"trial {trial}: kept sets differ"
        assert torch.equal(warped, want_warped)
        sure = margin_rows(scores, rows, seeds, firsts, 60 + trial)
        assert torch.equal(tok[sure], want_tok[sure]), (tok.tolist(), want_tok.tolist())
        checked += int(sure.sum())
        assert not torch.isinf(warped.gather(1, tok[:, None])).any()  # a drawn token survived its filters
        assert int(tok[0]) >= V // 2
    assert checked >= 30


def test_the_race_over_every_token_is_the_race_over_the_possible_ones():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    scores = torch.randn(40, 90, generator=g) * 2
    scores[torch.rand(40, 90, generator=g) < 0.6] = -float("inf")  # as filters leave rows
    scores[:, 0] = 0.0
    p = scores.softmax(-1)
    sampled = torch.rand(40, generator=g) < 0.8
    seeds, draws = torch.randint(0, 2**62, (40,), generator=g), torch.randint(0, 1000, (40,), generator=g)
    dense = row_sampling.race(p, sampled, seeds, draws, sparse=False)
    sparse = row_sampling.race(p, sampled, seeds, draws, sparse=True)
    assert torch.equal(dense[sampled], sparse[sampled])
    assert (p.gather(1, dense[:, None]) > 0).all()


def test_kernel_reads_strided_rows_and_greedy_rows_take_the_first_maximum():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(-3, 3, (4, 3, 200), generator=g).float()  # ties at the maximum
    scores = seq[:, -1]  # strided rows
    settings = [Sampling(False), Sampling(True, top_p=0.7, seed=3), Sampling(False), Sampling(True, top_k=5, seed=4)]
    (tok, warped), (want_tok, want_warped), _ = both(scores, settings, torch.arange(4), torch.zeros(4, dtype=torch.long), 2)
    assert torch.equal(warped, want_warped) and torch.equal(tok, want_tok)
    assert tok[0] == scores[0].argmax() and tok[2] == scores[2].argmax()
    assert torch.equal(warped[0], scores[0])  # a greedy row's scores as they came


def test_rows_without_a_finite_score_still_give_a_token_in_the_vocabulary():
    # a broken model's rows: every score -inf, or NaN among them; the token must stay a valid id
    scores = torch.randn(4, 100)
    scores[0] = -float("inf")
    scores[1] = -float("inf")
    scores[2, 10:20] = float("nan")
    scores[3] = float("nan")
    settings = [Sampling(False), Sampling(True, top_p=0.9, seed=1), Sampling(True, top_k=5, min_p=0.1, seed=2),
                Sampling(True, seed=3)]
    rows = RowSettings.of(settings, put)
    tok, _ = triton_row_sample.draw(scores, rows.sampled, rows.temperature, rows.top_k, rows.top_p, rows.min_p,
                                    torch.arange(4), torch.zeros(4, dtype=torch.long), 0)
    assert ((tok >= 0) & (tok < 100)).all(), tok
    assert tok[0] == 0 and tok[1] == 0  # as torch's argmax of -inf rows


def test_draws_follow_transformers_distribution():
    """A row set's draws, each row at its own seed, against the probabilities Transformers' warpers
    leave (5 sigma per token). The torch path, which draws what the kernel draws (above), at 20000
    rows; the kernel under the interpreter takes 60 ms a row."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.tensor([[2.0, 1.5, 1.2, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9, 1.9]])
    n = 20000
    for s in [Sampling(True, temperature=0.7, top_k=6, top_p=0.8, seed=0), Sampling(True, min_p=0.2, seed=0),
              Sampling(True, temperature=1.3, seed=0)]:
        want = transformers.LogitsProcessorList([
            TemperatureLogitsWarper(s.temperature), *([TopKLogitsWarper(s.top_k)] if s.top_k else []),
            *([TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []), *([MinPLogitsWarper(s.min_p)] if s.min_p else []),
        ])(None, logits.clone()).softmax(-1)[0].double()
        tok, _ = row_sampling.draw_rows_torch(logits.expand(n, -1), RowSettings.of([s] * n, put),
                                              torch.randint(0, 2**62, (n,)), torch.zeros(n, dtype=torch.long), 0)
        freq = torch.bincount(tok, minlength=logits.shape[-1]).double() / n
        sigma = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 5 * sigma + 1e-12).all(), (s, freq, want)
        assert (freq[want == 0] == 0).all()


def test_a_rows_draw_depends_on_its_seed_and_index_alone():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 120, generator=g)
    settings = [Sampling(True, temperature=2.0, seed=i) for i in range(6)]
    rows = RowSettings.of(settings, put)
    seeds, firsts = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([0, 3, 3, 1, 0, 2])

    def draw(s, r, sd, f, step):
        return triton_row_sample.draw(s, r.sampled, r.temperature, r.top_k, r.top_p, r.min_p, sd, f, step)[0]

    tok = draw(scores, rows, seeds, firsts, 4)
    # the rows reversed, and row 2 alone, at the same draw indices: the same tokens
    rev = torch.arange(5, -1, -1)
    assert torch.equal(draw(scores[rev], RowSettings.of(settings[::-1], put), seeds[rev], firsts[rev], 4), tok[rev])
    assert torch.equal(draw(scores[2:3], RowSettings.of(settings[2:3], put), seeds[2:3], firsts[2:3], 4), tok[2:3])
    # the same index reached from another step count: the same tokens
    assert torch.equal(draw(scores, rows, seeds, firsts + 10, 14), tok)
    # other indices or seeds draw otherwise (hot rows: 16 draws of a flat row cannot all agree)
    later = torch.stack([draw(scores, rows, seeds, firsts, 5 + i) for i in range(16)])
    assert (later != tok).any(0).all()


def test_manager_draws_with_the_kernel_as_with_torch(monkeypatch, tmp_path):
    """The manager's sampled requests (penalties, top-p, top-k, min-p, seeds, a greedy one), run
    once through the torch path and once through the kernel: the same tokens and log-probabilities."""
    _, ours = make_pair(PHIMOE, tmp_path, seed=3)
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (4, 7, 3, 9, 5)]
    kws = [{"do_sample": True, "top_p": 0.8, "seed": 11}, {"do_sample": True, "temperature": 1.7, "top_k": 9, "seed": 2},
           {}, {"do_sample": True, "min_p": 0.05, "frequency_penalty": 0.5, "seed": 4},
           {"do_sample": True, "temperature": 0.8, "repetition_penalty": 1.3, "seed": 9}]

    def run():
        return run_requests(ours, moetorch.GenerationConfig(max_new_tokens=8, do_sample=False),
                            {"max_requests_per_batch": 4, "return_logprobs": True},
                            {str(i): (p, kw) for i, (p, kw) in enumerate(zip(inputs, kws))})

    torch_path = run()

    def kernel(scores, rows, seeds, firsts, step):
        return triton_row_sample.draw(scores, rows.sampled, rows.temperature, rows.top_k, rows.top_p, rows.min_p,
                                      seeds, firsts, step)

    monkeypatch.setattr(batching, "draw_rows", kernel)
    kernel_path = run()
    for rid, r in torch_path.items():
        assert r.generated_tokens == kernel_path[rid].generated_tokens, rid
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(kernel_path[rid].logprobs))
    assert len({tuple(r.generated_tokens) for r in torch_path.values()}) == len(inputs)
