"""The GPU checks (moetorch/gpu_check.py), which `moetorch bench` also runs first.

    PYTHONPATH=. python bench/gpu_check.py --out results.json
"""

import sys

from moetorch.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
