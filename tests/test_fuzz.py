"""
Fuzzing: the reward parsers and the JSONL loader meet random and adversarial input and never raise
out of their contract (parsers: never; the loader: only JSONLError in strict mode, nothing when
lenient). hypothesis generates the inputs (a test-only dependency).

    python -m pytest tests/test_fuzz.py -q
"""
import json
import math
import os

import pytest
from PIL import Image

pytest.importorskip("hypothesis", reason="fuzzing needs hypothesis (pip install -r requirements.txt)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import rewards as RW
import user_data as U
import world as W
from config import make_config

PIECES = ["<answer>", "</answer>", "<think>", "</think>", "[MASK]", "[UNK]", "-", ".", " ", "\n", "yes", "no",
          "3", "1e9", "nan", "inf", "-0", "0.5", "99999999999999999999", "é", "\x00", ",", "(", ")"]
answerish = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=20).map(" ".join)
texts = st.text(max_size=200) | answerish
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(texts, st.sampled_from(["3", "yes", "no", "0", "-1", "12"]))
def test_text_rewards_never_raise(text, truth):
    r, why = RW.vqa_reward(text, truth)
    assert r in (0.0, 1.0) and isinstance(why, str)
    box = RW.parse_box(text)[0]
    assert box is None or (len(box) == 4 and all(math.isfinite(v) for v in box))
    r, why = RW.ground_reward(text, (0, 0, 8, 8))
    assert 0.0 <= r <= 1.0 and isinstance(why, str)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
                           lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
                           max_leaves=15)
rows = st.one_of(
    st.text(max_size=80),                                           # any line at all
    json_values.map(json.dumps),                                    # any JSON value
    st.fixed_dictionaries({"task": st.sampled_from(["vqa", "ground", "edit", "t2i", "ocr", 3, None])},
                          optional={"image": st.sampled_from(["pic.png", "missing.png", "", 5, None, "../x.png"]),
                                    "target_image": st.sampled_from(["pic.png", "nope.png", [1]]),
                                    "prompt": st.text(max_size=20) | st.integers(),
                                    "response": texts | st.integers(),
                                    "answer": st.text(max_size=5) | st.floats(allow_nan=True),
                                    "box": st.lists(st.integers(-5, 70) | st.floats(allow_nan=True), max_size=5) | st.text(max_size=5),
                                    "split": st.sampled_from(["sft", "eval", "test", 1])}).map(json.dumps))


@FAST
@given(st.lists(rows, max_size=6))
def test_jsonl_loader_never_raises_unexpectedly(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("rows")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(os.path.join(folder, "pic.png"))
    path = os.path.join(folder, "rows.jsonl")
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write("\n".join(line.replace("\n", " ") for line in lines))
    dcfg = make_config("toy").data
    exs, skipped = U.load_jsonl(path, dcfg, strict=False)        # lenient: never raises
    assert len(exs) + len(skipped) == sum(1 for line in lines if line.replace("\n", " ").strip())
    try:
        U.load_jsonl(path, dcfg, strict=True)
    except U.JSONLError:
        pass                                                         # the only error strict mode may raise


@FAST
@given(st.lists(st.binary(max_size=60), max_size=6))
def test_jsonl_loader_on_raw_bytes(tmp_path_factory, blobs):
    """Not even UTF-8: a bad line is a counted row error, never a UnicodeDecodeError."""
    path = os.path.join(tmp_path_factory.mktemp("bytes"), "rows.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(b.replace(b"\n", b" ") for b in blobs))
    dcfg = make_config("toy").data
    exs, skipped = U.load_jsonl(path, dcfg, strict=False)
    assert exs == [] or all(isinstance(e, W.Example) for e in exs)
    try:
        U.load_jsonl(path, dcfg, strict=True)
    except U.JSONLError:
        pass
