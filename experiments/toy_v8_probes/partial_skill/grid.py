import sys, itertools, torch, json
sys.path.insert(0, "/tmp/t20c")
import s3
from transformers import AutoModelForCausalLM
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.score import score_exact_match
from evomerge.toy import data_v8
torch.set_num_threads(1)
R = "evomerge/toy/fixtures_v8/"; tok = build_tokenizer()
third = sys.argv[1]; split = sys.argv[2] if len(sys.argv) > 2 else "fitness"
ld = lambda p: AutoModelForCausalLM.from_pretrained(p)
base = ld(R+"base"); bsd = {k: v.clone() for k, v in base.state_dict().items()}
tv = [{k: v - bsd[k] for k, v in ld(p).state_dict().items()} for p in (R+"expert_add", R+"expert_cipher", third)]
tasks = {"add": data_v8.eval_split("add", split), "cipher": data_v8.eval_split("cipher", split), "S": s3.split(split)}
W = [0, 0.5, 0.75, 1, 1.25, 1.5]
res = []
for w in itertools.product(W, W, W):
    base.load_state_dict({k: bsd[k] + sum(wi * t[k] for wi, t in zip(w, tv)) for k in bsd})
    s = {n: 100*score_exact_match(base, tok, [r.prompt for r in rows], [r.target for r in rows], max_new_tokens=8) for n, rows in tasks.items()}
    res.append((w, s)); print(w, s, flush=True)
json.dump(res, open(third.rstrip("/") + f"_grid_{split}.json", "w"))
print("top by mean:")
for w, s in sorted(res, key=lambda r: -sum(r[1].values()))[:8]: print(w, s, round(sum(s.values())/3, 1))
print("top by min:")
for w, s in sorted(res, key=lambda r: -min(r[1].values()))[:8]: print(w, s, round(sum(s.values())/3, 1))
