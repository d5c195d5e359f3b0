"""The tiny hand-made vocabulary and mixed-layout batch that the diffusion and likelihood tests share
(four words, eight VQ codes), so both files check their math on the very same rows."""
import torch

from tokens import Layout, Tokenizer, make_batch

TOK = Tokenizer(["a", "b", "c", "d"], n_codes=8)
V = TOK.vocab_size
WA, WB, WC, WD = (TOK.stoi[w] for w in "abcd")
PAD, MASK, IMASK, EOS = TOK.PAD, TOK.MASK, TOK.IMASK, TOK.EOS


def code(k: int) -> int:
    return TOK.img_offset + k


def mixed_batch():
    """3 rows, prompt width 4 with PAD in the prompt; rows 0 and 2 edit (5 text + 3 image slots),
    row 1 vqa (4 text slots, then PAD in the response)."""
    prompts = torch.tensor([[TOK.TASK["edit"], WA, WB, PAD],
                            [TOK.TASK["vqa"], WC, PAD, PAD],
                            [TOK.TASK["edit"], WD, WA, WB]])
    responses = torch.tensor([[WA, WB, WC, WD, EOS, code(1), code(2), code(3)],
                              [WA, WB, WC, EOS, PAD, PAD, PAD, PAD],
                              [WD, WC, WB, WA, EOS, code(7), code(0), code(5)]])
    lays = [Layout(5, 3, 0), Layout(4, 0, 0), Layout(5, 3, 0)]
    return make_batch(prompts, responses, lays, ["edit", "vqa", "edit"], TOK)
