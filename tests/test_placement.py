"""`device_map` and `max_memory`: the plans for each strategy, the dict form, and the errors.

Placing layers on two devices and running them is checked on a GPU (`moetorch.gpu_check`,
`check_device_map`: the GPU and the CPU against the GPU alone); CI has one device, the CPU.
"""

from __future__ import annotations

import random

import pytest
import torch
from archs import ARCH_IDS, ARCHS, JETMOE, PHIMOE, randomize_
from parity import close, make_inputs

from moetorch import placement
from moetorch.modeling_utils import check_fits

GPU = [torch.device("cuda", i) for i in range(4)]
CPU = torch.device("cpu")
GiB = 2**30


def sizes(layers=6, layer=10, embed=4, head=4):
    """A decoder's units in forward order, in bytes."""
    return ([("model.embed_tokens", embed), ("model.rotary_emb", 0)]
            + [(f"model.layers.{i}", layer) for i in range(layers)] + [("model.norm", 1), ("lm_head", head)])


PIN = {"model.rotary_emb": "model.embed_tokens"}


def per_device(plan, units):
    used = {}
    for name, n in units:
        used[plan[name]] = used.get(plan[name], 0) + (0 if name in PIN else n)
    return used


def test_auto_keeps_a_model_that_fits_on_the_first_gpu():
    plan = placement.plan(sizes(), {GPU[0]: 100, GPU[1]: 100, CPU: None}, "auto", PIN)
    assert set(plan.values()) == {GPU[0]} and len(plan) == len(sizes())


def test_auto_and_balanced_spread_what_does_not_fit_evenly_over_the_gpus():
    units = sizes(layers=8)  # 4 + 80 + 1 + 4 = 89 bytes
    budgets = {GPU[0]: 60, GPU[1]: 60, CPU: None}
    for strategy in ("auto", "balanced"):
        plan = placement.plan(units, budgets, strategy, PIN)
        used = per_device(plan, units)
        assert set(used) == {GPU[0], GPU[1]}  # no CPU: the GPUs hold it
        assert abs(used[GPU[0]] - used[GPU[1]]) <= 10 + 1  # within one layer (and the norm)
        assert plan["model.rotary_emb"] == plan["model.embed_tokens"] == GPU[0] and plan["lm_head"] == GPU[1]
    # balanced spreads even a model that would fit on one GPU
    plan = placement.plan(units, {GPU[0]: 1000, GPU[1]: 1000}, "balanced", PIN)
    assert plan["model.layers.0"] == GPU[0] and plan["model.layers.7"] == GPU[1]


def test_balanced_low_0_leaves_gpu_0_the_smaller_share():
    units = sizes(layers=12)
    used = per_device(placement.plan(units, {GPU[0]: 1000, GPU[1]: 1000}, "balanced_low_0", PIN), units)
    assert 0 < used[GPU[0]] < used[GPU[1]] / 1.5


def test_sequential_fills_each_gpu_then_the_cpu():
    units = sizes(layers=6)
    plan = placement.plan(units, {GPU[0]: 25, GPU[1]: 20, CPU: None}, "sequential", PIN)
    assert [plan[f"model.layers.{i}"] for i in range(6)] == [GPU[0]] * 2 + [GPU[1]] * 2 + [CPU] * 2
    assert plan["model.norm"] == plan["lm_head"] == CPU


def test_no_gpus_means_the_cpu():
    assert set(placement.plan(sizes(), {CPU: None}, "auto", PIN).values()) == {CPU}


def test_random_plans_keep_order_and_budgets():
    rng = random.Random(0)
    order = GPU[:3] + [CPU]
    for _ in range(300):
        units = [(f"u{i}", rng.randint(1, 30)) for i in range(rng.randint(1, 20))]
        budgets = {d: rng.randint(10, 200) for d in order}
        if rng.random() < 0.5:
            budgets[CPU] = None
        strategy = rng.choice(placement.STRATEGIES)
        try:
            plan = placement.plan(units, budgets, strategy)
        except torch.OutOfMemoryError as e:
            # only when the units cannot go in order within the budgets
            assert "fits on no device that remains" in str(e)
            continue
        assert list(plan) == [n for n, _ in units] or set(plan) == {n for n, _ in units}
        ranks = [order.index(plan[n]) for n, _ in units]
        assert ranks == sorted(ranks), "units go to devices in the forward's order"
        for d, n in per_device(plan, units).items():
            assert budgets[d] is None or n <= budgets[d]


def test_plans_leave_a_gpu_room_for_the_units_it_runs_from_the_cpu():
    # layers placed on the CPU run on the GPU, which holds their non-expert part (2 of 10 bytes), and
    # the norm and head whole: the plan spills one more layer to make room for them
    units = sizes(layers=6)
    resident = {n: 2 if ".layers." in n else b for n, b in units}
    budgets = {GPU[0]: 50, CPU: None}
    naive = placement.plan(units, budgets, "sequential", PIN)
    plan = placement.plan(units, budgets, "sequential", PIN, resident)
    def gpu_bytes(p):
        return per_device(p, units)[GPU[0]] + sum(resident[n] for n, _ in units if p[n] == CPU)
    assert gpu_bytes(naive) > 50 >= gpu_bytes(plan)
    assert [plan[f"model.layers.{i}"] for i in range(6)] == [GPU[0]] * 3 + [CPU] * 3


def test_random_plans_with_resident_parts_keep_each_gpu_within_budget():
    rng = random.Random(1)
    for _ in range(300):
        units = [(f"u{i}", rng.randint(1, 30)) for i in range(rng.randint(2, 20))]
        resident = {n: rng.randint(0, b // 4) for n, b in units}
        gpus = GPU[: rng.randint(1, 3)]
        budgets = {**{d: rng.randint(2 * sum(resident.values()) + 30, 300) for d in gpus}, CPU: None}
        strategy = rng.choice(placement.STRATEGIES)
        plan = placement.plan(units, budgets, strategy, None, resident)
        runs, held = placement.run_on_gpus(plan, [n for n, _ in units])
        for d in gpus:
            used = sum(b for n, b in units if plan[n] == d) + sum(resident[n] for n in held if runs[n] == d)
            assert used <= budgets[d], (d, used, budgets[d], strategy)


def test_a_unit_that_fits_nowhere_is_named():
    with pytest.raises(torch.OutOfMemoryError, match=r"model.layers.4 \(10.0 MiB\) fits on no device"):
        placement.plan(sizes(layer=10 * 2**20), {GPU[0]: 25 * 2**20, GPU[1]: 25 * 2**20}, "sequential", PIN)
    with pytest.raises(ValueError, match="device_map must be one of"):
        placement.plan(sizes(), {CPU: None}, "fastest")


NAMES = [n for n, _ in sizes(layers=3)]


def test_dict_maps_prefixes_and_inner_keys_to_whole_units():
    assert set(placement.from_dict({"": "cpu"}, NAMES).values()) == {CPU}
    got = placement.from_dict({"model": 0, "model.layers.2": 1, "lm_head": "cuda:1"}, NAMES)
    assert got["model.layers.1"] == GPU[0] and got["model.layers.2"] == got["lm_head"] == GPU[1]
    # keys inside a unit place the unit
    got = placement.from_dict({"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.mlp": 0,
                               "model.layers.1.self_attn": 0, "model.layers.2": "cpu", "model.norm": "cpu",
                               "lm_head": "cpu"}, NAMES, optional=PIN)
    assert got["model.layers.1"] == GPU[0] and got["model.layers.0"] == CPU and "model.rotary_emb" not in got
    # a unit that may go unnamed may be named
    assert placement.from_dict({"": 1, "model.rotary_emb": 1}, NAMES, optional=PIN)["model.rotary_emb"] == GPU[1]


def test_dict_errors_name_the_module():
    with pytest.raises(ValueError, match=r"parts of model.layers.1 on \['cpu', 'cuda:1'\]"):
        placement.from_dict({"": "cpu", "model.layers.1.mlp": 1}, NAMES)
    with pytest.raises(ValueError, match="gives no device for lm_head"):
        placement.from_dict({"model": 0}, NAMES)
    with pytest.raises(ValueError, match="names 'model.layer.0', which is no module"):
        placement.from_dict({"model.layer.0": 0, "": 0}, NAMES)
    with pytest.raises(ValueError, match="does not offload modules to disk"):
        placement.from_dict({"model": 0, "lm_head": "disk"}, NAMES)
    with pytest.raises(ValueError, match=r"device_map\['lm_head'\]: 'gpu' is not a device"):
        placement.from_dict({"model": 0, "lm_head": "gpu"}, NAMES)
    with pytest.raises(ValueError, match="CUDA device index must be >= 0"):
        placement.from_dict({"": -1}, NAMES)


def test_what_is_no_device_or_no_module_name():
    with pytest.raises(ValueError, match=r"device_map\[''\]: True is not a device"):
        placement.from_dict({"": True}, NAMES)
    with pytest.raises(ValueError, match="'meta' holds no weights"):
        placement.from_dict({"": "meta"}, NAMES)
    with pytest.raises(ValueError, match="device_map keys are module names, got 0"):
        placement.from_dict({0: "cpu"}, NAMES)
    with pytest.raises(ValueError, match="max_memory must be a dict"):
        placement.gpu_budgets({})


def test_a_built_model_goes_to_one_device():
    # pipeline(model=<a model>, device_map=...) moves a built model: one device only
    from moetorch.modeling_utils import resolve_device

    assert resolve_device(None, {"model": "cpu", "lm_head": "cpu"}) == CPU
    assert resolve_device(None, "cpu") == CPU and resolve_device("cpu", "balanced") == CPU
    with pytest.raises(ValueError, match="a device_map over several devices places a model loaded by from_pretrained"):
        resolve_device(None, {"model": "cpu", "lm_head": 0})


def test_max_memory_is_parsed_and_ordered():
    budgets = placement.gpu_budgets({"cpu": "1GiB", 1: "2GB", 0: 5 * GiB})
    assert list(budgets.items()) == [(GPU[0], 5 * GiB), (GPU[1], 2 * 10**9), (CPU, GiB)]
    assert placement.gpu_budgets({0: 0, "cpu": "1MB"})[GPU[0]] == 0
    with pytest.raises(ValueError, match=r"max_memory\[0\] must be a positive size"):
        placement.gpu_budgets({0: "lots"})
    with pytest.raises(ValueError, match="max_memory must be a dict"):
        placement.gpu_budgets("10GiB")


def test_hf_device_map_as_transformers_writes_it():
    assert placement.hf_device_map({"a": CPU, "b": CPU}) == {"": "cpu"}
    assert placement.hf_device_map({"a": GPU[0], "b": CPU}) == {"a": 0, "b": "cpu"}


@pytest.fixture
def saved(tmp_path):
    def save(arch, **overrides):
        model = arch.ours["causal_lm"](arch.our_config(**overrides))
        randomize_(model, 3)
        model.eval().save_pretrained(tmp_path)
        return model

    return save


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("device_map", ["auto", "balanced", "sequential", "cpu", {"": "cpu"},
                                        {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                         "lm_head": "cpu"}])
def test_from_pretrained_with_a_device_map(arch, device_map, saved, tmp_path):
    model = saved(arch)
    loaded = arch.ours["causal_lm"].from_pretrained(tmp_path, device_map=device_map)
    assert loaded.hf_device_map == {"": "cpu"} and not loaded.spans_devices
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 7, "left")
    with torch.no_grad():
        close(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, "device_map load")
    assert not hasattr(arch.ours["causal_lm"].from_pretrained(tmp_path), "hf_device_map")


def test_max_memory_too_small_for_the_cpu_is_an_error(saved, tmp_path):
    saved(PHIMOE)
    with pytest.raises(torch.OutOfMemoryError, match="model.embed_tokens .* fits on no device"):
        PHIMOE.ours["causal_lm"].from_pretrained(tmp_path, device_map="sequential", max_memory={"cpu": "1KB"})
    # the whole model within the CPU's budget
    PHIMOE.ours["causal_lm"].from_pretrained(tmp_path, device_map="sequential", max_memory={"cpu": "1GiB"})


def test_device_map_argument_errors(saved, tmp_path):
    saved(JETMOE)
    cls = JETMOE.ours["causal_lm"]
    with pytest.raises(ValueError, match="max_memory applies to a device_map strategy"):
        cls.from_pretrained(tmp_path, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="not to a device_map dict"):
        cls.from_pretrained(tmp_path, device_map={"": "cpu"}, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match=r"places model.layers.1 on cuda:99, but \d+ CUDA device\(s\) are visible"):
        cls.from_pretrained(tmp_path, device_map={"": "cpu", "model.layers.1": 99})
    with pytest.raises(ValueError, match="gives no device for model.norm"):
        cls.from_pretrained(tmp_path, device_map={"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                  "lm_head": "cpu"})  # the rotary tables go with the embeddings
    with pytest.raises(ValueError, match="device_map must be one of"):
        cls.from_pretrained(tmp_path, device_map="fastest")
    # disk offload's options are accepted: nothing is offloaded
    cls.from_pretrained(tmp_path, device_map="auto", offload_folder=str(tmp_path / "offload"))


def test_tied_head_goes_with_the_embeddings(saved, tmp_path):
    saved(PHIMOE, tie_word_embeddings=True)
    model = PHIMOE.ours["causal_lm"].from_pretrained(tmp_path, device_map="auto")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.device("meta"):
        meta = PHIMOE.ours["causal_lm"](PHIMOE.our_config(tie_word_embeddings=True))
    units = dict(placement.units(meta))
    assert list(units)[0] == "model.embed_tokens" and list(units)[-1] == "lm_head" and "model.rotary_emb" in units


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_a_base_model_places_each_module_once(arch, saved, tmp_path):
    """A base model (no head) is placed by its own children, each once (they were counted twice:
    a plan read its embeddings' bytes twice, an error listed its modules twice)."""
    with torch.device("meta"):
        meta = arch.ours["model"](arch.our_config())
    names = [n for n, _ in placement.units(meta)]
    L = meta.config.num_hidden_layers
    assert names == ["embed_tokens", *(f"layers.{i}" for i in range(L)), "norm", "rotary_emb"]
    saved(arch)
    with pytest.raises(ValueError, match=r"device_map gives no device for embed_tokens, layers.1, norm$"):
        arch.ours["model"].from_pretrained(tmp_path, device_map={"layers.0": "cpu"})
    model = arch.ours["model"].from_pretrained(tmp_path, device_map={"": "cpu"})
    assert model.device.type == "cpu"


def test_memory_check_per_device(monkeypatch):
    with torch.device("meta"):
        meta = PHIMOE.ours["causal_lm"](PHIMOE.our_config()).to(torch.bfloat16)
    names = [n for n, _ in placement.units(meta)]
    where = {n: GPU[0] if i < 3 else GPU[1] for i, n in enumerate(names)}
    layer = sum(p.numel() * 2 for p in meta.model.layers[0].parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (layer, 8 * layer))
    with pytest.raises(torch.OutOfMemoryError, match=r"the \d+ module\(s\) that device_map places on cuda:0 "
                                                     r"\(model.embed_tokens to model.layers.1\) need"):
        check_fits(meta, where, "ckpt")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * layer, 100 * layer))
    check_fits(meta, where, "ckpt")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_the_spread_path_on_one_device_changes_nothing(arch, saved, tmp_path):
    # a model placed over several devices runs `run_layers`' spread path; on one device its moves are
    # no-ops, so its outputs (hidden states, router logits, loss) are those of the plain path, bit for bit
    saved(arch)
    model = arch.ours["causal_lm"].from_pretrained(tmp_path)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 9, "left")
    kw = dict(attention_mask=mask, labels=ids, output_hidden_states=True, output_router_logits=True)
    with torch.no_grad():
        want = model(ids, **kw)
        model.model.spread_over_devices = True
        got = model(ids, **kw)
    for field in ("logits", "loss", "aux_loss"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))


def test_generate_on_a_model_over_several_devices(saved, tmp_path, monkeypatch, caplog):
    saved(PHIMOE)
    model = PHIMOE.ours["causal_lm"].from_pretrained(tmp_path)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 2, 6, None)
    want = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    # as if placed over two devices: a static cache asked for is a dynamic one, with the same tokens
    monkeypatch.setattr(type(model), "spans_devices", property(lambda self: True))
    monkeypatch.setattr(type(model), "parameter_devices", lambda self: [torch.device("cuda", 0), CPU])
    caplog.set_level("WARNING", logger="moetorch")
    got = model.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want) and "placed over cuda:0, cpu, so generate uses a dynamic cache" in caplog.text
    from moetorch import StaticCache

    with pytest.raises(ValueError, match="a StaticCache holds every layer's keys on one device"):
        model.generate(ids, max_new_tokens=5, past_key_values=StaticCache(model.config, max_cache_len=16))


def test_to_device_keeps_the_structure_of_a_layers_inputs():
    from moetorch.modeling_utils import module_device, to_device
    from moetorch.ops.norms import Residual

    x, d = torch.ones(2, 3), torch.zeros(2, 3)
    moved = to_device((Residual(x, d, None), (x, d), None, x), CPU)
    assert isinstance(moved[0], Residual) and moved[0].bias is None and moved[0].x is x  # the same device: as is
    assert type(moved[1]) is tuple and moved[2] is None and moved[3] is x
    assert module_device(torch.nn.ReLU()) is None
    assert module_device(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(2, 2))) == CPU


def test_the_cpu_units_of_a_plan_with_a_gpu_run_on_the_gpu_before_them():
    order = [n for n, _ in sizes(layers=4)]
    plan = dict(zip(order, [CPU, CPU, GPU[0], CPU, GPU[1], CPU, CPU, GPU[1]]))
    runs, held = placement.run_on_gpus(plan, order)
    # the units before any GPU's run on the first; later ones on the GPU of the unit before them
    assert [runs[n] for n in order] == [GPU[0], GPU[0], GPU[0], GPU[0], GPU[1], GPU[1], GPU[1], GPU[1]]
    assert held == ["model.embed_tokens", "model.rotary_emb", "model.layers.1", "model.layers.3", "model.norm"]
    assert runs["model.layers.3"] == GPU[1] and plan["model.layers.3"] == CPU  # the plan itself is kept
    for alone in ({n: CPU for n in order}, {n: GPU[1] for n in order}):
        assert placement.run_on_gpus(alone, order) == (alone, [])


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_host_mappable_names_the_mlp_experts_of_each_layer(arch):
    from moetorch.modeling_utils import host_mappable

    model = arch.ours["causal_lm"](arch.our_config())
    names = host_mappable(model, ["model.layers.1", "model.norm"])
    params = dict(model.named_parameters())
    assert len(names) == 2 and all(n.startswith("model.layers.1.mlp.") and params[n].dim() == 3 for n in names)
    experts = {n for n, p in params.items() if p.dim() == 3 and ".layers.1.mlp." in n}
    assert set(names) == experts  # every stacked MLP expert weight, nothing of the attention


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_weights_held_in_host_memory_load_and_compute(arch, saved, tmp_path, monkeypatch):
    """from_pretrained's path for layers placed on the CPU of a model that runs on a GPU, run on the
    CPU: the held expert weights are new parameters, marked, that the checkpoint loads into. (On a
    GPU they are pinned and read by the GPU's kernels: `gpu_check`'s `check_device_map`.)"""
    from moetorch import modeling_utils
    from moetorch.ops import host

    def unpinned(like):
        p = torch.nn.Parameter(torch.empty(like.shape, dtype=like.dtype), like.requires_grad)
        setattr(p, host._MAPPED, p.data_ptr())
        return p

    saved(arch)
    want = arch.ours["causal_lm"].from_pretrained(tmp_path)
    monkeypatch.setattr(modeling_utils, "host_mapped_parameter", unpinned)
    held_units = ["model.layers.0", "model.layers.1"]
    monkeypatch.setattr(placement, "run_on_gpus", lambda planned, order: (dict(planned), held_units))
    model = arch.ours["causal_lm"].from_pretrained(tmp_path)
    mapped = [n for n, p in model.named_parameters() if host.is_host_mapped(p)]
    assert mapped == modeling_utils.host_mappable(model, held_units)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 9, "left")
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, want(ids, attention_mask=mask).logits)
    layer = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in mapped and ".1." in n)
    assert host.host_copy_bytes(model) == layer > 0 and host.host_copy_bytes(want) == 0  # one layer's, not both
    held = dict(model.named_parameters())[mapped[0]]
    held.data = held.data.clone()  # new storage (as model.to(dtype) makes): no longer read in place
    assert not host.is_host_mapped(held) and host.marked_host_mapped(held)
    assert model.parameter_devices() == [CPU]
    # a conversion pins the weights again (on a GPU machine; pinning here is a copy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t.clone())
    model.to(torch.float64)
    assert all(host.is_host_mapped(p) and p.dtype == torch.float64 for n, p in model.named_parameters() if n in mapped)
    assert not any(host.marked_host_mapped(p) for n, p in model.named_parameters() if n not in mapped)


class _FakeStream:
    """Stands for a CUDA stream on the CPU: records what it was made to wait for."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append((self.name, "waits for", other.name))

    def wait_event(self, event):
        self.log.append((self.name, "waits for", event.name))


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_host_experts_copied_ahead_one_layer_at_a_time(arch, saved, tmp_path, monkeypatch):
    """A forward of many tokens starts the copy of the next layer placed on the CPU on a side stream
    (`ops.moe.CopiesAhead`), one at a time; the layer's `host_weights` takes it, after its stream
    waits for the copy. Streams and events are stand-ins here (on a GPU: `gpu_check`'s
    `check_device_map`, bit-equal logits, graphed steps)."""
    import contextlib

    from moetorch import modeling_utils
    from moetorch.ops import host, moe

    def unpinned(like):
        p = torch.nn.Parameter(torch.empty(like.shape, dtype=like.dtype), like.requires_grad)
        setattr(p, host._MAPPED, p.data_ptr())
        return p

    saved(arch)
    monkeypatch.setattr(modeling_utils, "host_mapped_parameter", unpinned)
    held_units = ["model.layers.0", "model.layers.1"]
    monkeypatch.setattr(placement, "run_on_gpus", lambda planned, order: (dict(planned), held_units))
    model = arch.ours["causal_lm"].from_pretrained(tmp_path)
    layers = model.model.layers
    E = layers[0].get_parameter(layers[0].host_mappable[0]).shape[0]
    K = layers[0].experts_per_token
    many = next(T for T in range(1, 100) if not moe.reads_host_in_place(T, E, K))
    with torch.no_grad():
        held = moe.held_copied(layers, many)
        assert [w for w, _ in held] == [tuple(lay.get_parameter(n) for n in lay.host_mappable) for lay in layers[:2]]
        assert [d for _, d in held] == [CPU, CPU]
        assert moe.held_copied(layers, many - 1) == []  # read in place: nothing to copy
    assert moe.held_copied(layers, many) == []  # gradients flow to them: autograd copies them
    log = []
    main = _FakeStream(log, "main")
    event = type("Event", (), {"record": lambda self, stream: setattr(self, "name", f"copy {len(log)}")})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(log, "side"))
    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(moe, "_COPY_STREAMS", {})
    ahead = moe.CopiesAhead(held)
    ahead.before_layer()
    ahead.before_layer()  # the first copy not taken yet: no second one
    assert log == [("side", "waits for", "main")]
    first, second = (w for w, _ in held)
    assert ahead.take(second) is None
    x, ids = torch.randn(many, first[0].shape[-1]).to("meta"), torch.zeros(many, K, dtype=torch.long)
    token = moe._AHEAD.set(ahead)
    try:
        copies = moe.host_weights(x, ids, "triton", None, *first)  # the layer takes the copy started ahead
    finally:
        moe._AHEAD.reset(token)
    assert [c.data_ptr() != w.data_ptr() and torch.equal(c, w) for c, w in zip(copies, first)] == [True, True]
    assert log[-1] == ("main", "waits for", "copy 1")
    ahead.before_layer()  # the next layer starts: the second layer's copy
    assert log[-1] == ("side", "waits for", "main") and ahead.pending is not None
    ahead.close()  # not taken: the reading stream waits for it all the same
    assert log[-1][:2] == ("main", "waits for") and ahead.pending is None
    ahead.before_layer()
    assert ahead.pending is None  # no host layer left


def test_host_weights_read_in_place_for_few_tokens_else_copied():
    from moetorch.ops import moe

    # the rule: in place while the tokens are expected to route to at most 60% of the experts
    assert [T for T in range(1, 20) if moe.reads_host_in_place(T, 16, 2)] == list(range(1, 7))  # PhiMoE
    assert [T for T in range(1, 20) if moe.reads_host_in_place(T, 8, 2)] == [1, 2, 3]  # JetMoE
    w13, w2 = torch.randn(4, 6, 3), torch.randn(4, 3, 3)
    ids = torch.zeros(5, 2, dtype=torch.long)
    x = torch.randn(5, 3)
    assert all(a is b for a, b in zip(moe.host_weights(x, ids, "triton", None, w13, w2), (w13, w2)))
    # weights on another device than x (here x on meta): copied there; on a GPU, pinned host weights
    # stay where they are for the fused kernels (gpu_check's check_device_map)
    got = moe.host_weights(x.to("meta"), ids, "reference", None, w13, w2)
    assert [t.device.type for t in got] == ["meta", "meta"] and [t.shape for t in got] == [w13.shape, w2.shape]
