"""Programmatic dependent launch (ops.triton_moe: `pdl_enabled`, `pdl_meta`, `_pdl_start`).

With PDL a kernel may start while the one before it is finishing, so each kernel must wait for it
before touching memory. These tests check that rule where it can fail: in the PTX Triton compiles
for Hopper (sm_90, no GPU needed) from the launches of real decode and prefill steps, every global
load, store and atomic comes after `griddepcontrol.wait`.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from launches import kernels
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from moetorch.ops import triton_fused, triton_moe

MODULES = (triton_fused, triton_moe)
KERNELS = kernels(MODULES)


def test_every_kernel_is_listed():
    names = {n for _, n in KERNELS}
    assert {"_moe_small_kernel", "_moe_gemm_kernel", "_decode_attn_kernel", "_add_norm_route_kernel",
            "_linear_small_kernel", "_gather_rows_kernel", "_moe_gemv_kernel", "_rope_tables_kernel",
            "_causal_mask_kernel"} <= names


@pytest.mark.parametrize("module,name", KERNELS, ids=[n for _, n in KERNELS])
def test_kernel_source_starts_with_the_wait(module, name):
    fn = getattr(module, name).fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    func = tree.body[0]
    assert func.args.args[-1].arg == "PDL", f"{name}: PDL is the last parameter"
    first = func.body[0]
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Call), f"{name}: first statement"
    call = first.value
    assert isinstance(call.func, ast.Name) and call.func.id == "_pdl_start", f"{name} must begin with _pdl_start"
    assert [a.id for a in call.args] == ["PDL"]


def test_pdl_off_on_cpu_under_the_interpreter_and_by_env(monkeypatch):
    assert triton_moe.pdl_meta(torch.device("cpu"), 4) == {"PDL": 0}
    monkeypatch.setattr(triton_moe, "_pdl_capable", lambda index: True)
    monkeypatch.setattr(triton_moe, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_moe, "INTERPRET", True)
    assert not triton_moe.pdl_enabled(cuda), "the interpreter takes no launch_pdl"
    monkeypatch.setattr(triton_moe, "INTERPRET", False)
    # GEMMs (no program count) release the next kernel after their main loop; grids of at most one
    # program per 8 SMs at their start; larger grids at their end
    assert triton_moe.pdl_meta(cuda) == {"PDL": 1, "launch_pdl": True}
    assert triton_moe.pdl_meta(cuda, 1) == {"PDL": 2, "launch_pdl": True}
    assert triton_moe.pdl_meta(cuda, 16) == {"PDL": 2, "launch_pdl": True}
    assert triton_moe.pdl_meta(cuda, 17) == {"PDL": 1, "launch_pdl": True}
    # serving one token (batch-1 decode): at its start up to one program per SM
    assert triton_moe.pdl_meta(cuda, 132, tokens=1) == {"PDL": 2, "launch_pdl": True}
    assert triton_moe.pdl_meta(cuda, 133, tokens=1) == {"PDL": 1, "launch_pdl": True}
    assert triton_moe.pdl_meta(cuda, 56, tokens=2) == {"PDL": 1, "launch_pdl": True}
    assert triton_moe.pdl_meta(cuda, 0, tokens=1) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setattr(triton_moe, "PDL", False)
    assert triton_moe.pdl_meta(cuda, 16) == {"PDL": 0}
    monkeypatch.setattr(triton_moe, "PDL", True)
    monkeypatch.setattr(triton_moe, "_pdl_capable", lambda index: False)
    assert triton_moe.pdl_meta(cuda, 16) == {"PDL": 0}


def test_switches_read_the_environment_at_import():
    # MOETORCH_PDL / MOETORCH_TMA / TRITON_INTERPRET set the module's switches once, at import
    root = str(Path(__file__).resolve().parents[1])
    code = "import moetorch.ops.triton_moe as t; print(t.PDL, t.TMA, t.INTERPRET)"
    for values, want in (({"MOETORCH_PDL": "0", "TRITON_INTERPRET": "1"}, "False True True"),
                         ({"MOETORCH_TMA": "0", "TRITON_INTERPRET": "0"}, "True False False"),
                         ({"MOETORCH_PDL": "1", "MOETORCH_TMA": "1", "TRITON_INTERPRET": "1"}, "True True True")):
        env = {k: v for k, v in os.environ.items() if k not in ("MOETORCH_PDL", "MOETORCH_TMA")}
        env.update(values, PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == want.split(), values


@pytest.mark.parametrize("capability,want", [((8, 0), False), ((9, 0), True), ((10, 0), True)])
def test_pdl_needs_hopper(capability, want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert triton_moe._pdl_capable.__wrapped__(0) is want


_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.int64: "i64",
           torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "maxnreg")


def _launch_specs(calls) -> dict[str, dict]:
    """A compile spec (kernel, argument types, constexprs, options) per kernel and variant."""
    specs = {}
    for module, name, args, kwargs in calls:
        sig = []
        for a in args:
            if isinstance(a, TensorDescriptor):
                sig.append(mangle_type(a))  # tensordesc<dtype[tile]>
            elif isinstance(a, torch.Tensor):
                sig.append("*" + _DTYPES[a.dtype])
            elif isinstance(a, bool):
                sig.append("i1")
            elif isinstance(a, int):
                sig.append("i32" if -2**31 <= a < 2**31 else "i64")
            else:
                sig.append("fp32")
        const = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
        opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg") and v is not None}
        spec = {"module": module.__name__, "kernel": name, "sig": sig, "const": const, "opts": opts}
        # one compile per kernel (the rule is at its start), one for the decode attention
        # reading a beam-search cache through its slot_rows (a load more, after the wait), and
        # one for a persistent grouped GEMM splitting its last round (atomics after the wait)
        variant = "[ROWS]" if const.get("ROWS") else "[TAIL]" if const.get("TAIL_SPLIT") else ""
        specs.setdefault(name + variant, spec)
    return specs


# Run without the interpreter, so the kernels are JIT functions that compile.
_COMPILE = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

MEMORY = re.compile(r"^\s*(?:@%p\d+\s+)?(ld\.global|st\.global|atom\.|red\.|cp\.async|ld\.volatile)", re.M)
import triton.language as tl
from moetorch.ops.triton_moe import _pdl_start


@triton.jit
def _control_kernel(x_ptr, y_ptr, PDL: tl.constexpr):
    x = tl.load(x_ptr)  # read before the wait: what the check must catch
    _pdl_start(PDL)
    tl.store(y_ptr, x)


control = {"module": "__main__", "kernel": "_control_kernel", "sig": ["*fp32", "*fp32"], "const": {},
           "opts": {"num_warps": 1}}
failures = []
for spec in json.load(open(sys.argv[1])) + [control]:
    kernel = getattr(sys.modules[spec["module"]] if spec["module"] == "__main__"
                     else importlib.import_module(spec["module"]), spec["kernel"])
    kernel = getattr(kernel, "jit", kernel)  # the triton.jit function inside moetorch's launcher
    names = kernel.arg_names
    const = dict(spec["const"], PDL=2)  # wait, and release the next kernel (at the start or later)
    if "LIBDEVICE" in const:  # libdevice's cos / sin, as on a GPU (the interpreter that ran the launches has none)
        const["LIBDEVICE"] = True
    sig, it = {}, iter(spec["sig"])
    for n in names:
        sig[n] = "constexpr" if n in const else next(it)
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(spec["opts"], launch_pdl=True)).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    wait = body.find("griddepcontrol.wait")
    first = MEMORY.search(body)
    if wait < 0 or "griddepcontrol.launch_dependents" not in body:
        failures.append(f"{spec['kernel']}: no griddepcontrol")
    elif first is not None and first.start() < wait:
        failures.append(f"{spec['kernel']}: {first.group(1)} before griddepcontrol.wait")
print(json.dumps({"compiled": len(json.load(open(sys.argv[1]))) + 1, "failures": failures}))
"""


def test_compiled_kernels_wait_before_touching_memory(recorded_launches, tmp_path):
    specs = _launch_specs([call for call in recorded_launches if call[0] in MODULES])
    assert "_decode_attn_kernel[ROWS]" in specs, "beam search reads its cache through slot_rows"
    assert "_moe_gemm_kernel[TAIL]" in specs, "a persistent grid that may split its last round"
    seen = {name.removesuffix("[ROWS]").removesuffix("[TAIL]") for name in specs}
    assert any(t.startswith("tensordesc") for t in specs["_moe_gemm_kernel"]["sig"]), "the descriptor variant"
    assert seen == {n for _, n in KERNELS}, f"not launched: {sorted({n for _, n in KERNELS} - seen)}"
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(list(specs.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])  # this checkout's moetorch, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    script = tmp_path / "compile_ptx.py"  # a file: Triton reads a @jit function's source from it
    script.write_text(_COMPILE)
    done = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["compiled"] == len(specs) + 1, report
    # the control kernel (a load before the wait) must be caught, and only it
    assert report["failures"] == ["_control_kernel: ld.global before griddepcontrol.wait"], report
