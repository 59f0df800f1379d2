"""torch.compile on the models, as Transformers users write it.

While torch.compile traces, the models take their torch code (the fused kernels and the Triton
expert backend step aside, `fused.serves` and `moe.pick_backend`), so `fullgraph=True` holds. Every
test runs under `fused.forced()`, the GPU's choice of kernels, so a kernel that dynamo tried to
trace would fail it. `generate`'s CUDA-graphed steps set a compiled forward aside
(`engine.own_forward`); here a stand-in graph that replays eagerly takes the CUDA graph's place.
"""

from __future__ import annotations

import pytest
import torch
from archs import ARCH_IDS, ARCHS, PHIMOE
from launches import tiny_model
from parity import close, make_inputs, make_pair

from moetorch import StaticCache
from moetorch.engine import GraphedDecodeStep, compiled_own_forward, own_forward
from moetorch.generation import utils as generation
from moetorch.ops import fused, moe

# inductor's float32 code sums in other orders than eager torch
ATOL = RTOL = 1e-4

# torch's own deprecation of torch.jit.script_method, which inductor's imports trigger
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend():
    """A torch.compile backend that runs the traced graph as is and counts the graphs it gets."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_compiled_forward_matches_transformers(arch, tmp_path):
    hf, ours = make_pair(arch, tmp_path, seed=11)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 7, "left", seed=12)
    want = hf(ids, attention_mask=mask).logits
    forward = torch.compile(ours.forward, fullgraph=True)
    with fused.forced():  # as on a GPU: the kernels would serve, were it not compiling
        cache = StaticCache(ours.config, max_cache_len=10)
        prompt = forward(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True).logits
        step = forward(ids[:, 6:], attention_mask=mask, past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([6])).logits
    valid = mask[:, :6].bool()
    close(prompt[valid], want[:, :6][valid], "prompt", ATOL, RTOL)
    close(step[:, -1], want[:, -1], "decode step", ATOL, RTOL)
    assert cache.get_seq_length() == 7


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_transformers_static_cache_compile_recipe(arch, tmp_path):
    """`model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)` with
    `cache_implementation="static"`, then `generate`: Transformers' tokens."""
    hf, ours = make_pair(arch, tmp_path, seed=13)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=14)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = hf.generate(ids, **kw)
    ours.generation_config.cache_implementation = "static"
    ours.forward = torch.compile(ours.forward, mode="reduce-overhead", fullgraph=True)
    with fused.forced():
        got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled forward ran (CPU)


def test_compiled_bf16_forward_traces_the_grouped_experts_bit_for_bit():
    """In bf16, dynamo's graph (run as traced, no inductor) computes what eager torch does with the
    grouped_mm expert backend, the backend `pick_backend` gives while compiling."""
    model = tiny_model(PHIMOE).to(torch.bfloat16)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 2, 12, None, seed=16)
    backend, graphs = counting_backend()
    with torch.no_grad(), fused.forced():
        got = torch.compile(model.forward, backend=backend, fullgraph=True)(ids).logits
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "backend"):
                m.backend = "grouped_mm"
        want = model(ids).logits
    assert len(graphs) == 1 and torch.equal(got, want)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_compiled_training_step_traces_the_eager_gradients(arch, backend, tmp_path):
    """A training step (cross-entropy + aux loss, a left-padded batch) traces in one graph, and
    its gradients equal the eager step's: AOT autograd's traced graphs run as they are
    (`aot_eager`), and inductor's code for them (the default backend). PhiMoE in eval mode: its
    training router samples."""
    _, model = make_pair(arch, tmp_path, seed=20)
    model.train(arch is not PHIMOE)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 9, "left", seed=21)
    labels = ids.masked_fill(mask == 0, -100)

    def grads(forward):
        model.zero_grad(set_to_none=True)
        out = forward(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        (out.loss + out.aux_loss).backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, want = grads(model)
    compiled_loss, got = grads(torch.compile(model, backend=backend, fullgraph=True))
    close(compiled_loss, loss, "loss")
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], name, ATOL, RTOL)


def test_while_compiling_the_torch_code_serves(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with fused.forced():
        assert not fused.serves(torch.device("cuda")) and not fused.serves(torch.device("cpu"))
    ids = torch.zeros(4, 2, dtype=torch.long)
    x, w = torch.ones(4, 64, dtype=torch.bfloat16), torch.ones(3, 32, 64, dtype=torch.bfloat16)
    assert moe.pick_backend(x, ids, w) == "grouped_mm"
    # grouped_mm's shape function takes bf16 only, and rows and strides of whole 16-byte units
    assert moe.pick_backend(x.float(), ids, w.float()) == "gather"
    assert moe.pick_backend(x[:, :60], ids, w[:, :, :60]) == "gather"
    assert moe.pick_backend(x, ids, w[:, :30]) == "gather"
    many = torch.zeros(64, 2, dtype=torch.long)  # past the gather bound: the loop (a graph break)
    assert moe.pick_backend(torch.ones(64, 64), many, w.float()) == "reference"


# ---- generate's graphed steps and a compiled forward ----------------------------------------------

class EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the step's forward again."""

    def __init__(self, step: GraphedDecodeStep, past: int) -> None:
        self.step = step
        step.cache._seen = past
        self.logits = step._run().clone()
        step.cache._seen = past  # as a capture leaves the host count

    def replay(self) -> None:
        self.logits.copy_(self.step._run())


class CpuGraphedStep(GraphedDecodeStep):
    """A GraphedDecodeStep that counts as enabled on the CPU, capturing EagerGraphs."""

    def __init__(self, model, cache, batch, enabled=None):
        super().__init__(model, cache, batch, enabled=True)

    def _capture(self, key, past):
        graph = EagerGraph(self, past)
        self.graphs[key] = graph, graph.logits


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_graphed_generate_sets_a_compiled_forward_aside(arch, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "GraphedDecodeStep", CpuGraphedStep)
    _, model = make_pair(arch, tmp_path, seed=17)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=18)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    want = model.generate(ids, **kw)
    assert model._held_decode().step.graphs  # the stand-in graphs replayed the steps
    backend, graphs = counting_backend()
    compiled = model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    assert compiled_own_forward(model)
    assert torch.equal(model.generate(ids, **kw), want)
    assert not graphs  # never called: the graphed steps and their prompt ran the model's own forward
    assert model.forward is compiled  # and it is back in place
    # a stopping rule that raises: the compiled forward is still put back
    def stop_here(*args, **kwargs):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        model.generate(ids, **kw, stopping_criteria=[stop_here])
    assert model.forward is compiled
    # without graphed steps, generate calls the compiled forward, as Transformers does
    model.decode_graphs = False
    assert torch.equal(model.generate(ids, **kw), want)
    assert graphs


def test_own_forward_leaves_other_forwards_alone(tmp_path):
    _, model = make_pair(PHIMOE, tmp_path, seed=19)
    assert not compiled_own_forward(model)  # the class's forward
    with own_forward(model):
        assert "forward" not in model.__dict__
    calls = []
    own = model.forward

    def logged(*args, **kwargs):  # a wrapper of the user's: kept
        calls.append(1)
        return own(*args, **kwargs)

    model.forward = logged
    assert not compiled_own_forward(model)
    with own_forward(model):
        model(torch.ones(1, 3, dtype=torch.long))
    assert calls == [1] and model.forward is logged
    model.forward = torch.compile(lambda *a, **k: own(*a, **k))  # a compile of something else: kept
    assert not compiled_own_forward(model)
    model.forward = torch.compile(own)
    assert compiled_own_forward(model)
    with own_forward(model):
        assert "forward" not in model.__dict__
    assert compiled_own_forward(model)
