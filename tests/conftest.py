"""Shared pytest setup for every test file.

* The repo is a flat set of modules (no package), so put its root on sys.path.
* One intra-op thread: the tests use tiny tensors, where extra threads only add spin-wait
  contention (measured on the 2-core CI box: a test file took 20 s with 2 threads, 3 s with 1).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "studies"))       # the experiment scripts, tested beside the core
torch.set_num_threads(1)
