"""Shared pytest setup for every test file.

* The repo is a flat set of modules (no package), so put its root on sys.path.
* One intra-op thread: the tests use tiny tensors, where extra threads only add spin-wait
  contention (measured on the 2-core CI box: a test file took 20 s with 2 threads, 3 s with 1).
* hypothesis (test_properties.py, test_fuzz.py): with the environment variable CI=true (.ci/run
  sets it) the "ci" profile draws the same cases on every run (derandomize, no example database),
  so a CI failure reproduces; elsewhere the "dev" profile draws new cases each run and replays the
  failures it saved. Loaded here, before the test files build their settings from it.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "studies"))       # the experiment scripts, tested beside the core
torch.set_num_threads(1)

try:
    from hypothesis import settings
except ImportError:            # the two hypothesis files skip themselves without it
    settings = None
if settings is not None:
    # both from hypothesis's own defaults (not from whatever profile it loaded itself on import:
    # it picks its built-in CI profile whenever a CI variable is set, even an empty one)
    base = settings.get_profile("default")
    settings.register_profile("ci", parent=base, derandomize=True, database=None)
    settings.register_profile("dev", parent=base)
    settings.load_profile("ci" if os.environ.get("CI", "").lower() == "true" else "dev")
