"""
walkthrough.py runs top to bottom at tiny size (its own cells assert what they print: the
complementary estimate within 4 standard errors of the exact enumeration, the forced answer scoring
1, the tree round's shapes, N counting every group member and the SFT rows, -J lowered by one step).

    python -m pytest tests/test_walkthrough.py -q
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_walkthrough_runs_at_tiny_size_and_its_checks_hold(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "walkthrough.py"), "--tiny"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for line in ("exact E[Eq. C]", "joined: True", "round 1:", "triplets kept:", "-J before", "walkthrough done"):
        assert line in out, line
