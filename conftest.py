"""Root conftest: loads the kvkata plugin and the hypothesis profiles.

Profiles (choose with HYPOTHESIS_PROFILE): "kata" (the default: few, derandomized
examples and no shrinking, so a card runs in seconds and the same way every time), "ci" (the same, a
few more examples), "deep" (many random examples, for maintainers hunting a bug).
"""

import gc
import os
import sys

import torch
from _pytest.assertion.rewrite import AssertionRewritingHook

# pytest rewrites the asserts of every package that ships a pytest plugin, hypothesis included.
# hypothesis does not need it, and where pytest cannot cache the rewritten bytecode (a read-only
# virtualenv, PYTHONDONTWRITEBYTECODE) every run re-parses all of hypothesis: 0.7 s of each
# `pytest -k cardNN`. Unmark it before it is first imported (below); nothing else changes.
for _finder in sys.meta_path:
    if isinstance(_finder, AssertionRewritingHook):
        getattr(_finder, "_must_rewrite", set()).discard("hypothesis")

# Triton kernels run on the CPU through Triton's interpreter. It must be chosen before
# triton is first imported, because kernels bind to a backend when they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The katas use tiny tensors: one thread is faster than several fighting over 2 cores.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

from hypothesis import HealthCheck, Phase, settings

pytest_plugins = ["kvkata.plugin"]

# Everything imported so far (torch, hypothesis, pytest) lives until the interpreter exits: move it
# out of the garbage collector's sight, so that no collection walks it again (pytest runs two full
# collections at exit, 0.2 s each with torch loaded, and hypothesis triggers more while it draws).
gc.freeze()

_common = dict(deadline=None, database=None, print_blob=False,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# No shrink phase for learners: a stub fails on its first example, and shrinking that
# failure would only cost seconds (derandomized generation starts from small examples).
settings.register_profile("kata", max_examples=15, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate], **_common)
settings.register_profile("ci", max_examples=30, derandomize=True, **_common)
settings.register_profile("deep", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kata"))
