"""Task arithmetic, one weight per model, on the fitness splits of add/cipher/cipher2."""
import sys, itertools, json, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from evomerge.toy import FIXTURES_V8
from evomerge.toy import data_v8
from evomerge.toy.score import score_exact_match
from evomerge.toy.tokenizer import build_tokenizer
torch.set_num_threads(1)
tok = build_tokenizer()
paths = {"add": Path(sys.argv[1]), "cipher": Path(sys.argv[2]), "cipher2": Path(sys.argv[3])}
split = sys.argv[4] if len(sys.argv) > 4 else "fitness"
ws = [float(x) for x in (sys.argv[5] if len(sys.argv) > 5 else "0.5,0.75,1.0,1.25").split(",")]
base = AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / "base")
b = {k: v.clone() for k, v in base.state_dict().items()}
tv = {n: {k: v - b[k] for k, v in AutoModelForCausalLM.from_pretrained(p).state_dict().items()} for n, p in paths.items()}
for n in tv:
    print(n, "tv norm", round(sum(v.pow(2).sum().item() for v in tv[n].values()) ** .5, 3))
names = list(tv)
for i in range(3):
    for j in range(i+1, 3):
        a, c = tv[names[i]], tv[names[j]]
        dot = sum((a[k]*c[k]).sum().item() for k in a)
        na = sum(a[k].pow(2).sum().item() for k in a) ** .5; nc = sum(c[k].pow(2).sum().item() for k in c) ** .5
        print("cos", names[i], names[j], round(dot/na/nc, 4))
rows = {s: data_v8.eval_split(s, split) for s in ("add", "cipher", "cipher2")}
def score(w):
    sd = {k: b[k] + sum(w[n] * tv[n][k] for n in tv) for k in b}
    base.load_state_dict(sd)
    return {s: score_exact_match(base, tok, [r.prompt for r in rows[s]], [r.target for r in rows[s]], max_new_tokens=8) for s in rows}
t0 = time.time()
res = []
for wa, wc, wc2 in itertools.product(ws, ws, ws):
    s = score({"add": wa, "cipher": wc, "cipher2": wc2})
    m = sum(s.values()) / 3
    res.append((m, wa, wc, wc2, s))
    print(f"add {wa:4} cipher {wc:4} cipher2 {wc2:4}  add {s['add']*100:5.1f} cipher {s['cipher']*100:5.1f} cipher2 {s['cipher2']*100:5.1f}  mean {m*100:5.1f}", flush=True)
res.sort(key=lambda r: -r[0])
print("best", [(round(r[0]*100,1), r[1:4]) for r in res[:5]])
print("min-skill best", sorted(res, key=lambda r: -min(r[4].values()))[0])
print("grid s", round(time.time()-t0))
