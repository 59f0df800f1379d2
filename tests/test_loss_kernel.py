"""The causal-LM loss kernels (ops/triton_loss.py, under Triton's CPU interpreter) against
`F.cross_entropy` over a float32 copy of the logits, and a tiny model's loss and gradients through
them against Transformers'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from archs import ARCH_IDS, ARCHS
from parity import close, make_pair

from moetorch.ops import fused, losses, triton_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# One rounding step of each dtype (relative), where the two paths' float32 sums differ in their last bits.
STEP = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # rows of a few hundred values then span several blocks of each pass
    monkeypatch.setattr(triton_loss, "BLOCK", 64)


def reference(logits, target, grad, ignore_index=-100):
    """torch's per-row losses and the logits' gradient, as Transformers computes them (float32 copy)."""
    x = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(x.float(), target, ignore_index=ignore_index, reduction="none")
    loss.backward(grad)
    return loss.detach(), x.grad


def kernel(logits, target, grad, ignore_index=-100):
    x = logits.detach().clone().requires_grad_()
    loss = triton_loss.row_losses(x, target, ignore_index)
    loss.backward(grad)
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [64, 300, 37])
def test_row_losses_and_gradient_equal_torch(dtype, V):
    g = torch.Generator().manual_seed(V)
    N = 29
    logits = (torch.randn(N, V, generator=g) * 4).to(dtype)
    logits[3, 5] = 30.0  # a row with one dominant word
    target = torch.randint(0, V, (N,), generator=g)
    target[::4] = -100
    grad = torch.randn(N, generator=g)
    got_loss, got_grad = kernel(logits, target, grad)
    want_loss, want_grad = reference(logits, target, grad)
    close(got_loss, want_loss, "loss", atol=1e-6, rtol=1e-6)
    assert got_grad.dtype == dtype
    close(got_grad.float(), want_grad.float(), "gradient", atol=1e-6, rtol=STEP[dtype])
    assert (got_loss[::4] == 0).all() and (got_grad[::4] == 0).all()  # ignored rows
    if dtype != torch.float32:
        # the rounding to the logits' dtype is torch's (to nearest even): the same bits but for the
        # elements whose float32 values sit within a last-bit difference of a rounding boundary
        assert (got_grad != want_grad).float().mean() < 0.01


def test_a_custom_ignore_index_inside_the_vocabulary_and_a_strided_row():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 160, generator=g).to(torch.bfloat16)
    logits = wide[:, :150]  # rows 160 apart
    target = torch.randint(0, 150, (9,), generator=g)
    target[[1, 4]] = 7
    grad = torch.rand(9, generator=g)
    got_loss, got_grad = kernel(logits, target, grad, ignore_index=7)
    want_loss, want_grad = reference(logits, target, grad, ignore_index=7)
    close(got_loss, want_loss, "loss", atol=1e-6, rtol=1e-6)
    close(got_grad.float(), want_grad.float(), "gradient", atol=1e-6, rtol=STEP[torch.bfloat16])
    assert (got_loss[[1, 4]] == 0).all()


def test_a_target_outside_the_vocabulary_gives_nan_in_its_row_alone():
    logits = torch.randn(4, 50)
    target = torch.tensor([3, 50, -1, -100])
    loss, _ = kernel(logits, target, torch.ones(4))
    assert loss[1].isnan() and loss[2].isnan()
    assert loss[0].isfinite() and loss[3] == 0


def test_infinite_and_nan_logits_propagate_as_torch_does():
    logits = torch.randn(3, 70)
    logits[0, 10] = float("-inf")  # a masked word: the loss is finite
    logits[1, 20] = float("nan")
    target = torch.tensor([4, 4, 10])
    got, _ = kernel(logits, target, torch.ones(3))
    want, _ = reference(logits, target, torch.ones(3))
    assert got[0].isfinite() and got[1].isnan()
    close(got[0], want[0], "loss with a -inf logit")


def test_a_second_derivative_is_refused_not_wrong():
    x = torch.randn(4, 70, requires_grad=True)
    loss = triton_loss.row_losses(x, torch.tensor([1, 2, -100, 3])).sum()
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        dx.sum().backward()


@pytest.fixture
def on_kernel(monkeypatch):
    """`causal_lm_loss` through the kernels on the CPU (they serve GPUs)."""
    calls = []

    def serves(logits, target):
        calls.append(logits.shape)
        return True

    monkeypatch.setattr(losses, "_kernel_serves", serves)
    return calls


@pytest.mark.parametrize("how", ["mean", "num_items", "num_items_tensor", "shift_labels", "all_ignored"])
def test_causal_lm_loss_through_the_kernels_equals_the_float32_path(on_kernel, how):
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 11, 90
    logits = torch.randn(B, T, V, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    kwargs = {}
    if how.startswith("num_items"):
        kwargs["num_items_in_batch"] = torch.tensor(40) if how == "num_items_tensor" else 40
    if how == "shift_labels":
        kwargs["shift_labels"] = torch.randint(0, V, (B, T), generator=g).masked_fill(labels < 0, -100)
    if how == "all_ignored":
        labels[:] = -100

    def run():
        x = logits.clone().requires_grad_()
        loss = losses.causal_lm_loss(x, labels, **kwargs)
        loss.backward()
        return loss.detach(), x.grad

    got_loss, got_grad = run()
    assert on_kernel, "the loss did not take the kernels"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(losses, "_kernel_serves", lambda logits, target: False)
        want_loss, want_grad = run()
    if how == "all_ignored":  # torch: nan for the mean of nothing
        assert got_loss.isnan() and want_loss.isnan()
        assert (got_grad == 0).all()
        return
    close(got_loss, want_loss, "loss", atol=1e-6, rtol=1e-6)
    close(got_grad.float(), want_grad.float(), "gradient", atol=1e-7, rtol=STEP[torch.bfloat16])


def test_the_kernels_serve_gpus_alone_and_not_while_switched_off(monkeypatch):
    logits, target = torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long)
    assert not losses._kernel_serves(logits, target)  # the CPU
    with fused.forced():
        assert losses._kernel_serves(logits, target)
        assert not losses._kernel_serves(logits.double(), target)  # float64 takes torch
        assert not losses._kernel_serves(logits, target[:0])  # no rows
        monkeypatch.setattr(fused, "LOSS_KERNEL", 0)
        assert not losses._kernel_serves(logits, target)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_a_models_loss_and_gradients_through_the_kernels_equal_transformers(on_kernel, tmp_path, arch):
    hf, ours = make_pair(arch, tmp_path)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, arch.base["vocab_size"], (2, 9), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    hf_out = hf(ids, labels=labels)
    our_out = ours(ids, labels=labels, use_cache=False)
    assert on_kernel
    close(our_out.loss, hf_out.loss, "loss")
    hf_out.loss.backward()
    our_out.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        close(p.grad, hf_grads[n].grad, f"{n}.grad")
