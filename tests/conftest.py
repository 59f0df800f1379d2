import os
import sys

# Triton kernels run under its CPU interpreter in tests (tests/test_triton_moe.py). Triton picks
# interpreted or compiled as it defines its @jit functions, i.e. at its first import, which torch or
# transformers may trigger anywhere in the session: so it is set before anything else. Only Triton
# reads it, and no other test runs Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Hub names resolve through the Hugging Face cache alone: tests build their repositories in a
# cache directory (tests/test_hub.py) and reach no network. huggingface_hub reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture(scope="session")
def recorded_launches():
    """(module, kernel name, args, kwargs) of every Triton launch of tests/launches.py's run."""
    import warnings

    from launches import record_everything

    with warnings.catch_warnings():
        # The grouped GEMMs multiply the uninitialised padding rows of the padded sorted layout
        # (their results are never stored); numpy, running the interpreted kernels, warns of NaNs.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        return record_everything()


@pytest.fixture(params=[False, True], ids=["unpadded", "padded"])
def padded(request, monkeypatch):
    """Continuous batching's prefill unpadded, or padded to a shape as a CUDA graph replays it
    (`engine.cuda_graph.GraphedPackedPrefill`; eagerly off the GPU)."""
    from moetorch.engine import batching

    monkeypatch.setattr(batching, "PREFILL_GRAPHS", request.param)
    return request.param


@pytest.fixture(params=["static", "paged", "paged-rows-of-max-cache-len"])
def cache_layout(request, monkeypatch):
    """Runs a test on the continuous batch's static cache and on its paged one. Paged, on the CPU,
    a page is one slot (`engine.pages.HostPages`), and before every forward each page that no
    request holds is poisoned: a read of a slot that the manager did not hold shows as wrong
    tokens. Paged rows have twice `max_cache_len` slots, as on a GPU (`PAGED_ROW_SPAN`), or
    `max_cache_len` slots, as on the host by default."""
    from moetorch.engine import batching

    if request.param.startswith("paged"):
        monkeypatch.setattr(batching, "PAGED", True)
        monkeypatch.setattr(batching, "PAGE_SLOTS", 1)
        monkeypatch.setattr(batching, "PAGED_ROW_SPAN", 2 if request.param == "paged" else 1)
    return request.param


@pytest.fixture
def python_ctrl_c():
    """SIGINT as Python sets it up in a foreground process: a job started in the background (as CI
    may start the suite) ignores it, and moetorch then leaves it ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
