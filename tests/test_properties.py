"""
Property tests: the reward parsers and the likelihood estimators at their edges, each against an
independent reference (hypothesis draws the cases).

  rewards     vqa_reward against the answer contract written as one regular expression plus exact
              Decimal arithmetic (answers of every size and form); ground_reward against IoU by
              counting pixels; trace_answer against the lists the trace was written from;
              edit_score against the values its definition fixes (a perfect edit, a copy).
  likelihood  every estimator on rows of every response length, from all padding (L = 0) to the full
              width: unscored slots carry weight 0, weights follow each estimator's definition, and
              every scored log-prob equals a hand-masked full forward of the same row.

    python -m pytest tests/test_properties.py -q
"""
import re
from decimal import Decimal

import pytest
import torch

pytest.importorskip("hypothesis", reason="property tests need hypothesis (pip install -r requirements.txt)")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import likelihood as LK  # noqa: E402
import rewards as RW  # noqa: E402
from tokens import Layout, make_batch  # noqa: E402
from world import COLOURS, KINDS, SIZES, Shape  # noqa: E402
from test_likelihood import mask_by_hand, tiny_model  # noqa: E402
from tiny_vocab import EOS, PAD, TOK, code  # noqa: E402

FAST = settings(max_examples=200, deadline=None)
SLOW = settings(max_examples=25, deadline=None)          # each case runs a few forward passes

# ----------------------------------------------------------------------------------------------
# rewards

NUM = re.compile(r"-?\d+(\.\d+)?")
TAGGED = re.compile(r"(?s)(?:(?!</?answer>).)*<answer>((?:(?!</?answer>).)*)</answer>(?:(?!</?answer>).)*")


def ref_vqa(text: str, truth: str) -> float:
    """The answer contract, independently: exactly one <answer> ... </answer> block in that order.
    A truth that is yes/no (any case) or a decimal number is matched by value; any other truth (a
    user's word answer, e.g. "red" or "1e3") by its words, case and spacing aside."""
    m = TAGGED.fullmatch(text)
    if not m:
        return 0.0
    a, t = m.group(1).strip().lower(), truth.strip().lower()
    if not (t in ("yes", "no") or NUM.fullmatch(t)):                   # a word truth
        return float(a != "" and a.split() == t.split())
    if a in ("yes", "no"):
        return float(a == t)
    if NUM.fullmatch(a) and NUM.fullmatch(t):
        return float(Decimal(a) == Decimal(t))
    return 0.0


big = st.integers(-10**30, 10**30)
numbers = st.one_of(big.map(str), big.map(lambda n: f"{n}.0"), big.map(lambda n: f"{n}.50"),
                    st.integers(0, 999).map(lambda n: f"00{n}"), st.just("-0"), st.just("1e3"),
                    st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str))
answers = numbers | st.sampled_from(["yes", "No", " YES ", "maybe", "", "3 4", "three"])
wrap = st.sampled_from(["<answer> {} </answer>", "<think> x . </think> <answer>{}</answer>", "{}",
                        "<answer> {}", "<answer> {} </answer> <answer> 1 </answer>", "</answer> {} <answer>",
                        "<think> count 2 . </think>\n<answer>\n{}\n</answer> trailing"])


@FAST
@given(answers, wrap, numbers | st.sampled_from(["yes", "no", "red", " Dark  Blue", "three"]))
@example("99999999999999999999", "<answer> {} </answer>", "100000000000000000000")   # equal as floats
@example("1000000000000000000000000000.50", "<answer>{}</answer>", "1000000000000000000000000000")  # 28 digits
def test_vqa_reward_matches_the_contract_at_every_size_and_form(ans, form, truth):
    text = form.format(ans)
    assert RW.vqa_reward(text, truth)[0] == ref_vqa(text, truth), (text, truth)
    if TAGGED.fullmatch(text) and ans.strip():
        assert RW.vqa_reward(text, ans)[0] == 1.0    # an answer equals itself, a number or words


def pixels(box) -> set:
    x0, y0, x1, y1 = box
    return {(x, y) for x in range(x0, x1) for y in range(y0, y1)}


coord = st.integers(0, 12)


@FAST
@given(coord, coord, coord, coord, coord, coord, coord, coord, st.sampled_from(["{}", "{}.0", "0{}"]))
def test_ground_reward_is_iou_by_counting_pixels(a0, a1, b0, b1, c0, c1, d0, d1, fmt):
    pred, truth = (min(a0, a1), min(b0, b1), max(a0, a1), max(b0, b1)), (min(c0, c1), min(d0, d1), max(c0, c1), max(d0, d1))
    text = "<answer> " + " ".join(fmt.format(v) for v in pred) + " </answer>"
    r, why = RW.ground_reward(text, truth)
    P, T = pixels(pred), pixels(truth)
    if not P:                                   # zero width or height: not a box
        assert (r, why) == (0.0, "bad_box")
    else:
        assert r == pytest.approx(len(P & T) / len(P | T), abs=1e-12) and why == "ok"


cells = st.lists(st.sampled_from([f"r{i}c{j}" for i in range(4) for j in range(4)]), max_size=4, unique=True)


@FAST
@given(cells, cells, st.sampled_from(["count", "compare", "add", "diff"]), st.lists(st.integers(0, 9), max_size=4))
def test_trace_answer_recomputes_the_answer_from_the_lists_written(first, second, qtype, sides):
    say = lambda lst: " ".join(lst) or "none"
    text = f"red shapes : {say(first)} . count {len(first)} . blue shapes : {say(second)} . count {len(second)} ."
    a, b = len(first), len(second)
    want = {"count": str(a), "compare": "yes" if a > b else "no", "add": str(a + b), "diff": str(abs(a - b))}[qtype]
    assert RW.trace_answer(text, qtype) == want
    listed = " ".join(f"r0c{i} {n}" for i, n in enumerate(sides)) or "none"
    got = RW.trace_answer(f"sides : {listed} . total {sum(sides)} .", "sides")
    assert got == (str(sum(sides)) if sides else None)        # "none" is a list of one word: no counts


shapes = st.none() | st.builds(Shape, st.sampled_from(KINDS), st.sampled_from(list(COLOURS)), st.sampled_from(SIZES))
scenes = st.lists(shapes, min_size=4, max_size=4).map(tuple)


@FAST
@given(scenes, scenes, scenes)
def test_edit_score_at_its_fixed_points(source, target, pred):
    changed = [i for i in range(4) if source[i] != target[i]]
    assert RW.edit_score(source, target, target) == 1.0                    # a perfect edit
    copy = sum(RW.cell_similarity(source[i], target[i]) for i in changed) / len(changed) if changed else 1.0
    assert RW.edit_score(source, target, source) == pytest.approx(0.5 * copy + 0.5)   # the copy baseline
    s = RW.edit_score(source, target, pred)
    assert 0.0 <= s <= 1.0
    for i in range(4):                   # fixing any one cell of a prediction never lowers its score
        fixed = pred[:i] + (target[i],) + pred[i + 1:]
        assert RW.edit_score(source, target, fixed) >= s - 1e-12


# ----------------------------------------------------------------------------------------------
# likelihood estimators

R_TEXT, R_IMG = 5, 3


def rows_of_lengths(lengths: list[tuple[int, int]]):
    """One row per (text length, image length): text words then EOS-free image codes, PAD after."""
    words = [TOK.stoi[w] for w in "abcd"]
    prompts, resps, lays = [], [], []
    for b, (lt, li) in enumerate(lengths):
        prompts.append([TOK.TASK["edit"], words[b % 4], PAD, PAD])
        r = [words[(b + i) % 4] for i in range(lt - 1)] + ([EOS] if lt else []) + [code((b + i) % 8) for i in range(li)]
        resps.append(r + [PAD] * (R_TEXT + R_IMG - len(r)))
        lays.append(Layout(lt, li, 0))
    return make_batch(torch.tensor(prompts), torch.tensor(resps), lays, ["edit"] * len(lengths), TOK)


def hand_logp(model, batch, b: int, masked_cols: list[int]) -> torch.Tensor:
    """(R,) log p(y_k | row b with masked_cols masked by hand) from one full forward of that row."""
    inp = mask_by_hand(batch.tokens[b], masked_cols, batch.is_image[b])
    with torch.no_grad():
        logits = model(inp[None], batch.valid[b:b + 1], batch.is_prompt[b:b + 1])[0, batch.P:]
    return torch.log_softmax(logits.float(), -1).gather(-1, batch.tokens[b, batch.P:, None])[:, 0]


lengths = st.lists(st.tuples(st.integers(0, R_TEXT), st.integers(0, R_IMG)), min_size=1, max_size=4)


@SLOW
@given(lengths, st.sampled_from(sorted(LK.ESTIMATORS)), st.sampled_from(["sum", "mean"]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_every_estimator_on_every_response_length_matches_hand_masked_forwards(lens, name, norm, prefix, seed):
    model = tiny_model(seed % 7, prefix_dlm=prefix)
    batch = rows_of_lengths(lens)
    P = batch.P
    with torch.no_grad():
        terms = LK.estimate(name, model, batch, TOK, n=2, generator=torch.Generator().manual_seed(seed), norm=norm)
    resp = batch.is_resp[:, P:]                                                     # (B, R)
    L = resp.sum(1).float()
    assert torch.isfinite(terms.logp).all() and torch.isfinite(terms.weight).all()
    assert not (terms.scored & ~resp[None]).any()             # never a PAD slot; an empty row scores nothing
    assert (terms.logp <= 1e-6).all()
    scale = torch.where(L > 0, 1 / L.clamp(min=1), 0.0) if norm == "mean" else torch.ones_like(L)
    for b in range(len(lens)):
        for d in range(terms.weight.shape[0]):
            cols = [P + k for k in range(resp.shape[1]) if terms.scored[d, b, k]]
            k = len(cols)
            w = terms.weight[d, b, terms.scored[d, b]]
            if name in ("complementary", "one_step"):             # every token once, weight 1
                assert k == L[b] and torch.allclose(w, scale[b].expand_as(w))
            elif name == "elbo_mc":                                # k ~ U{1..L}, weight L / (k n)
                assert (1 <= k <= L[b]) if L[b] else k == 0
                assert torch.allclose(w, (L[b] / max(k, 1) / 2 * scale[b]).expand_as(w))
            else:                                                  # mc_unweighted: weight 2 / n
                assert (1 <= k <= L[b]) if L[b] else k == 0
                assert torch.allclose(w, (scale[b]).expand_as(w))
            if k and name != "complementary":                      # the scored set is the mask
                want = hand_logp(model, batch, b, cols)[terms.scored[d, b]]
                assert torch.allclose(terms.logp[d, b, terms.scored[d, b]], want, atol=1e-5)
    assert torch.allclose(terms.seq()[L == 0], torch.zeros(int((L == 0).sum())))


@SLOW
@given(lengths, st.sampled_from([0.0, 1.0]), st.booleans())
def test_complementary_at_t_0_and_1_is_the_fully_masked_forward(lens, t1, prefix):
    """t1 = 0 (M1 empty) and t1 = 1 (M1 everything) both score every token with the whole response
    masked: the hand-masked full forward, row by row."""
    model = tiny_model(3, prefix_dlm=prefix)
    batch = rows_of_lengths(lens)
    with torch.no_grad():
        terms = LK.complementary(model, batch, TOK, t1=torch.full((len(lens),), t1))
    for b in range(len(lens)):
        cols = [batch.P + k for k in range(batch.tokens.shape[1] - batch.P) if batch.is_resp[b, batch.P + k]]
        if cols:
            sc = terms.scored[0, b]
            assert torch.allclose(terms.logp[0, b, sc], hand_logp(model, batch, b, cols)[sc], atol=1e-5)
