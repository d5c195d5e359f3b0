import sys, torch, train, eval as E, config as C, data as D
from diffusion import sample, apply_mask
out_dir = sys.argv[1]; extra = dict(a.split("=") for a in sys.argv[2:])
cfg = C.make_config("toy", {"train.out_dir": out_dir, **extra})
ctx = train.setup(cfg)
model, bundle, vq = train.load_for_eval(cfg, ctx); model.eval()
tok = bundle.tok
for split in ["sft", "eval"]:
    ts = bundle.sets["ground"][split]
    n = min(200, len(ts))
    b = D.collate({"ground": ts}, [("ground", i) for i in range(n)], tok, responses=True) if ts.response is not None else None
    if b is None: continue
    P = b.P; resp = b.tokens[:, P:]
    pos = (resp == tok.stoi[":"]).float().argmax(1) + 1
    for what, extra_mask in [("cell only", None), ("cell+box", "box")]:
        mask = torch.zeros_like(b.tokens, dtype=torch.bool)
        mask[torch.arange(n), P + pos] = True
        if extra_mask:
            mask[:, P + b.tokens.shape[1]-P-5:P + b.tokens.shape[1]-P-1] = True
        inp = apply_mask(b.tokens, mask, b.is_image, tok)
        with torch.no_grad(): logits = model(inp, b.valid, b.is_prompt)
        acc = (logits.argmax(-1)[:, :][torch.arange(n), P+pos] == b.tokens[torch.arange(n), P+pos]).float().mean()
        print(split, what, "cell acc", round(acc.item(), 3))
