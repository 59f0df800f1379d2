import os
import sys

# Triton kernels run under its CPU interpreter in tests (tests/test_triton_moe.py). Triton picks
# interpreted or compiled as it defines its @jit functions, i.e. at its first import, which torch or
# transformers may trigger anywhere in the session: so it is set before anything else. Only Triton
# reads it, and no other test runs Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield
