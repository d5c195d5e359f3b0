"""
Tokens and batches: the unified vocabulary of LaViDa-R1's model, the fixed sequence layout every task
shares, and the padded batches that every method module passes around (METHOD.md §1).

LaViDa-R1 (arXiv 2602.14147), like LaViDa-O (arXiv 2509.19244), reads and writes text AND pictures as
tokens of one vocabulary: special tokens, then words, then the image tokenizer's VQ codes at an
offset. Understanding and generation are then the same thing, predicting tokens.

Sequence layout (every task family shares it, so positions mean the same thing in every batch):
    [task tag] [<boi> image codes <eoi>] prompt words [PAD ...] | response (R positions) [PAD ...]
    |<-------------------- P = fixed prompt width -------------->|
  vqa/ground response: <think> trace </think> [EOS ...] <answer> z </answer>     (answer at the END,
                       so answer-forcing's canvas "[M] ... [M] <answer> z </answer>" is in-distribution)
  edit response:       <think> plan </think> [EOS ...] then n_img image codes
  t2i response:        n_img image codes
Text positions are masked with [MASK], image positions with [IMASK] (LaViDa-O also keeps a separate
VQ mask id), so the model always knows which modality a masked slot holds.

This module knows nothing of pictures or scenes: examples (world.Example, user_data rows) come in
with their prompt, trace and answer texts, pictures come in as VQ codes.

Simplified (METHOD.md §9): a word-level tokenizer instead of a BPE one.

Exercise it: python -m pytest tests/test_data.py -q -k "tokeniz or layout or batch"
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TASKS = ("vqa", "ground", "edit", "t2i")   # the task families, each with a tag token <vqa> ...
RL_TASKS = ("vqa", "ground", "edit")       # those with a verifiable reward on a generated answer
ANSWER_TASKS = ("vqa", "ground")           # those whose text response ends in an answer block

def parse_task_values(text: str, where: str, allowed: tuple = TASKS, default: float | None = None) -> dict[str, float]:
    """'vqa:1,ground:0.5' -> {'vqa': 1.0, 'ground': 0.5}: one number per task, as written. A task
    without a value takes `default` (an error when there is none). ValueError (one line, naming the
    key `where`) for an unknown task or a value that is not a number."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, v = part.partition(":")
        if name not in allowed:
            raise ValueError(f"--{where}: unknown task {name!r}; tasks are {', '.join(allowed)}")
        try:
            out[name] = default if (not v and default is not None) else float(v)
        except ValueError:
            raise ValueError(f"--{where}: value {v!r} of {name!r} is not a number (write task:value)") from None
    return out


def parse_mix(text: str, where: str = "task_mix", allowed: tuple = TASKS) -> dict[str, float]:
    """'vqa:4,ground:3' -> {'vqa': 4/7, 'ground': 3/7}: sampling weights (a bare name weighs 1),
    normalised, zero weights dropped. ValueError for unknown tasks or bad weights."""
    out = parse_task_values(text, where, allowed, default=1.0)
    for name, w in out.items():
        if w < 0:
            raise ValueError(f"--{where}: weight of {name!r} is negative")
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"--{where}={text!r}: needs at least one positive weight, e.g. vqa:1")
    return {k: v / total for k, v in out.items() if v > 0}


# ----------------------------------------------------------------------------------------------
# the unified vocabulary

SPECIALS = ["[PAD]", "[MASK]", "[IMASK]", "[EOS]", "[UNK]", "<boi>", "<eoi>", "<think>", "</think>",
            "<answer>", "</answer>", "<vqa>", "<ground>", "<edit>", "<t2i>"]


class Tokenizer:
    """Word-level tokenizer over the task language plus VQ codes at an offset.

    ids: [0, n_special) special tokens | [n_special, img_offset) words | [img_offset, +n_codes) VQ codes.
    Unknown words map to [UNK] and are counted in `self.n_unknown`, never silently dropped.
    """

    def __init__(self, words: list[str], n_codes: int):
        self.itos = SPECIALS + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.n_special = len(SPECIALS)                  # ids below this are special tokens
        self.img_offset = len(self.itos)
        self.n_codes = n_codes
        self.vocab_size = self.img_offset + n_codes
        self.n_unknown = 0
        self.PAD, self.MASK, self.IMASK, self.EOS, self.UNK = range(5)   # SPECIALS[:5]
        # readable aliases for the tags above
        self.BOI, self.EOI = self.stoi["<boi>"], self.stoi["<eoi>"]
        self.THINK, self.ETHINK = self.stoi["<think>"], self.stoi["</think>"]
        self.ANS, self.EANS = self.stoi["<answer>"], self.stoi["</answer>"]
        self.TASK = {t: self.stoi[f"<{t}>"] for t in TASKS}

    @classmethod
    def fit(cls, texts: list[str], n_codes: int, max_number: int = 64, extra_words=()) -> "Tokenizer":
        """Vocabulary = every word in `texts`, the numbers 0..max_number (answers, box coords) and
        `extra_words` (the world's cell names r0c0.., so that every cell can be named in a trace, plan
        or prompt even when the pools happen never to mention it)."""
        words = {w for t in texts for w in t.split()}
        words |= {str(i) for i in range(max_number + 1)}
        words |= set(extra_words)
        return cls(sorted(words - set(SPECIALS)), n_codes)

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            i = self.stoi.get(w)
            if i is None:
                self.n_unknown += 1
                i = self.UNK
            ids.append(i)
        return ids

    def decode(self, ids, skip: tuple[str, ...] = ("[PAD]", "[EOS]")) -> str:
        """ids -> text; VQ codes print as <img:k>, masks as [MASK]/[IMASK]."""
        out = []
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i >= self.img_offset:
                out.append(f"<img:{i - self.img_offset}>")
            elif self.itos[i] not in skip:
                out.append(self.itos[i])
        return " ".join(out)

    def state(self) -> dict:
        return {"words": self.itos[len(SPECIALS):self.img_offset], "n_codes": self.n_codes}

    @classmethod
    def from_state(cls, st: dict) -> "Tokenizer":
        return cls(st["words"], st["n_codes"])


def all_texts(pools) -> list[str]:
    """Every prompt, trace and answer text of the pools: the corpus Tokenizer.fit reads."""
    return [t for task in pools.values() for exs in task.values() for ex in exs
            for t in (ex.prompt, ex.trace or "", ex.answer_text or "")]


# ----------------------------------------------------------------------------------------------
# layouts and tokenized sets: fixed-width tensors per family, built once (data.get_bundle caches them
# with the VQ codes, so no picture is encoded twice)

@dataclass
class Layout:
    """Per-family response layout: R_text text positions then n_img image positions."""
    R_text: int
    n_img: int
    ans_len: int      # length of the '<answer> z </answer>' block at the end of the text region

    @property
    def R(self) -> int:
        return self.R_text + self.n_img


@dataclass
class TaskSet:
    """One family x split, tokenized. prompt: (N, P) PAD-padded; response: (N, R) or None."""
    task: str
    examples: list
    prompt: torch.Tensor
    response: torch.Tensor | None
    layout: Layout

    def __len__(self):
        return len(self.examples)


def response_ids(ex, tok: Tokenizer, lay: Layout, target_codes=None) -> list[int]:
    """The SFT target as lay.R ids: <think> trace </think> [EOS...] <answer> z </answer> | image
    codes. target_codes: the target picture's n_img VQ codes (edit/t2i), else None."""
    text = []
    if lay.R_text:
        think = [tok.THINK] + tok.encode(ex.trace or "") + [tok.ETHINK]
        ans = [tok.ANS] + tok.encode(ex.answer_text) + [tok.EANS] if lay.ans_len else []
        if len(think) + len(ans) > lay.R_text:      # user data longer than the canvas: clip the trace
            think = think[:lay.R_text - len(ans) - 1] + [tok.ETHINK]
        text = think + [tok.EOS] * (lay.R_text - len(think) - len(ans)) + ans
    img = [] if lay.n_img == 0 else [tok.img_offset + int(c) for c in target_codes]
    return text + img


def prompt_ids(ex, tok: Tokenizer, codes=None) -> list[int]:
    """[task tag] [<boi> code ... code <eoi>] prompt words, as a list of vocabulary ids.
    codes: the input picture's n_img VQ codes in [0, n_codes), row-major (None: no picture, t2i)."""
    ids = [tok.TASK[ex.task]]
    if codes is not None:
        ids += [tok.BOI] + [tok.img_offset + int(c) for c in codes] + [tok.EOI]
    return ids + tok.encode(ex.prompt)


def box_text(box) -> str:
    """A box (x0, y0, x1, y1) as the words of an answer: "3 5 12 14"."""
    return " ".join(str(int(v)) for v in box)


def answer_ids(ex, tok: Tokenizer) -> list[int]:
    """The '<answer> z </answer>' block of the ground truth: what answer-forcing writes in clear."""
    z = box_text(ex.answer) if ex.task == "ground" else ex.answer
    return [tok.ANS] + tok.encode(z) + [tok.EANS]


def layouts_for(pools, tok: Tokenizer, n_img: int) -> dict[str, Layout]:
    """Fixed response widths per family: the longest traced response over every pool + 2 spare."""
    lay = {}
    for task, splits in pools.items():
        exs = [e for s in splits.values() for e in s]
        ans = max((max(len(answer_ids(e, tok)), len(tok.encode(e.answer_text or "")) + 2) for e in exs),
                  default=0) if task in ANSWER_TASKS else 0
        think = max((len(tok.encode(e.trace)) + 2 for e in exs if e.trace), default=2) if task != "t2i" else 0
        R_text = 0 if task == "t2i" else think + ans + 2
        lay[task] = Layout(R_text, n_img if task in ("edit", "t2i") else 0, ans)
    return lay


def prompt_width(pools, tok: Tokenizer, n_img: int) -> int:
    """The fixed prompt width P: the longest prompt of any family (tag + picture + words), in tokens."""
    per_img = n_img + 2                                 # <boi> codes <eoi>
    return max(1 + (0 if task == "t2i" else per_img) + len(e.prompt.split())
               for task, splits in pools.items() for s in splits.values() for e in s)


def tokenize_split(task: str, examples: list, tok: Tokenizer, lay: Layout, P: int,
                   codes: torch.Tensor | None, target_codes: torch.Tensor | None) -> TaskSet:
    """One family x split as fixed-width tensors. codes: (N, n_img) VQ codes of the input pictures
    (None for t2i); target_codes: (N, n_img) of the target pictures (edit/t2i, else None).
    Returns a TaskSet: prompt (N, P) PAD-padded; response (N, lay.R), or None unless every example
    carries a trace (the answer-only rl pool). ValueError if a prompt is longer than P."""
    N = len(examples)
    prompt = torch.full((N, P), tok.PAD, dtype=torch.long)
    traced = all(e.trace is not None for e in examples) and N > 0
    response = torch.full((N, lay.R), tok.PAD, dtype=torch.long) if traced else None
    for n, ex in enumerate(examples):
        p = prompt_ids(ex, tok, None if codes is None else codes[n])
        if len(p) > P:
            raise ValueError(f"{task} prompt of {len(p)} tokens exceeds the prompt width P={P}: "
                             f"shorten it or raise the width (it is computed from the pools)")
        prompt[n, :len(p)] = torch.tensor(p)
        if response is not None:
            response[n] = torch.tensor(response_ids(ex, tok, lay, None if target_codes is None else target_codes[n]))
    return TaskSet(task, examples, prompt, response, lay)


# ----------------------------------------------------------------------------------------------
# batches

@dataclass
class Batch:
    """A padded batch in the shared layout. All tensors (B, T) with T = P + R.

    tokens     token ids; the response part may hold [MASK]/[IMASK]
    valid      False at [PAD] (attention ignores those keys)
    is_prompt  the prompt part (never masked, never scored)
    is_resp    the response canvas (what diffusion masks, predicts and scores)
    is_image   response positions that hold VQ codes (masked with [IMASK], sampled from codes only)
    P          the prompt width: the response starts at column P for every row
    """
    tokens: torch.Tensor
    valid: torch.Tensor
    is_prompt: torch.Tensor
    is_resp: torch.Tensor
    is_image: torch.Tensor
    P: int
    tasks: list[str] = field(default_factory=list)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.tokens, self.valid, self.is_prompt, self.is_resp,
                                              self.is_image)), self.P, self.tasks)

    def with_tokens(self, tokens: torch.Tensor) -> "Batch":
        return Batch(tokens, self.valid, self.is_prompt, self.is_resp, self.is_image, self.P, self.tasks)

    def rows(self, idx: torch.Tensor) -> "Batch":
        """The rows idx (B',) of this batch, in that order; a row may appear several times."""
        return Batch(*(t[idx] for t in (self.tokens, self.valid, self.is_prompt, self.is_resp, self.is_image)),
                     self.P, [self.tasks[i] for i in idx.tolist()])

    def repeat(self, n: int) -> "Batch":
        """Each row n times in a row (rows 0..n-1 = copies of row 0): a rollout group per prompt."""
        return self.rows(torch.arange(self.tokens.shape[0], device=self.tokens.device).repeat_interleave(n))


def make_batch(prompts: torch.Tensor, responses: torch.Tensor, layouts: list[Layout], tasks: list[str],
               tok: Tokenizer) -> Batch:
    """prompts: (B, P) long; responses: (B, R_max) long, row b padded with [PAD] after its
    layouts[b].R slots (text first, then image). Returns the Batch, T = P + R_max."""
    B, P = prompts.shape
    R = responses.shape[1]
    tokens = torch.cat([prompts, responses], 1)                      # (B, P + R)
    col = torch.arange(P + R)
    is_resp = torch.zeros(B, P + R, dtype=torch.bool)
    is_image = torch.zeros_like(is_resp)
    for b, lay in enumerate(layouts):
        is_resp[b, P:P + lay.R] = True
        is_image[b, P + lay.R_text:P + lay.R] = True
    valid = (tokens != tok.PAD) | is_resp        # a response slot is valid even while masked
    is_prompt = (col < P)[None] & valid
    return Batch(tokens, valid, is_prompt, is_resp, is_image, P, list(tasks))


def cat_batches(batches: list[Batch], tok: Tokenizer) -> Batch:
    """Stack batches row-wise (e.g. SFT rows + several tasks' rollouts); responses of different
    widths are right-padded with [PAD] (not valid, not response)."""
    R = max(b.tokens.shape[1] - b.P for b in batches)
    P = batches[0].P
    assert all(b.P == P for b in batches), "cat_batches: all batches must share the prompt width"

    def pad(x, value):
        return torch.cat([x, x.new_full((x.shape[0], P + R - x.shape[1]), value)], 1)
    parts = [(pad(b.tokens, tok.PAD), pad(b.valid, False), pad(b.is_prompt, False), pad(b.is_resp, False),
              pad(b.is_image, False)) for b in batches]
    return Batch(*(torch.cat(col) for col in zip(*parts)), P, [t for b in batches for t in b.tasks])


def collate(sets: dict[str, TaskSet], items: list[tuple[str, int]], tok: Tokenizer,
            responses: bool = True) -> Batch:
    """items: (task, index) pairs -> one Batch. responses=False leaves an all-mask canvas."""
    prompts = torch.stack([sets[t].prompt[i] for t, i in items])
    lays = [sets[t].layout for t, _ in items]
    R = max(l.R for l in lays)
    resp = torch.full((len(items), R), tok.PAD, dtype=torch.long)
    for b, ((t, i), lay) in enumerate(zip(items, lays)):
        if responses:
            resp[b, :lay.R] = sets[t].response[i]
        else:
            resp[b, :lay.R_text] = tok.MASK
            resp[b, lay.R_text:lay.R] = tok.IMASK
    return make_batch(prompts, resp, lays, [t for t, _ in items], tok)

