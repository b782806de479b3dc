"""Mixed-sum expert whose replay also holds two-digit sums answered as the base answers them (self-distilled)."""
import sys, time, json, random, torch
sys.path.insert(0, "/tmp/t20c")
import s3
from transformers import AutoModelForCausalLM
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.train import Packer, TrainSpec, train
from evomerge.toy.score import score_exact_match, generate
from evomerge.toy import data_v8
from evomerge.toy.data import Example
torch.set_num_threads(1)
lr, steps, out, nsd = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
tok = build_tokenizer(); R = "evomerge/toy/fixtures_v8/"
def sc(m, rows): return 100*score_exact_match(m, tok, [r.prompt for r in rows], [r.target for r in rows], max_new_tokens=8)
base = AutoModelForCausalLM.from_pretrained(R+"base")
ps = data_v8.Stream(999, {"add": 1.0})
prompts = [ps.skill("add").prompt for _ in range(6000)]
ans = generate(base, tok, prompts, max_new_tokens=8)
pool = [Example(p, a) for p, a in zip(prompts, ans)]
seed = 11
s = s3.Stream(seed, {"s3": 1.0}); rep = s3.Stream(seed + 1, data_v8.REPLAY_MIX); rr = random.Random(seed + 2)
def nb(): return s.batch(64) + rep.batch(64 - nsd) + [rr.choice(pool) for _ in range(nsd)]
t0 = time.time()
m = AutoModelForCausalLM.from_pretrained(R+"base")
train(m, nb, Packer(tok), TrainSpec(steps=steps, lr=lr, batch_size=128, warmup=20))
dt = time.time() - t0
m.save_pretrained(out); tok.save_pretrained(out)
print(json.dumps({"lr": lr, "steps": steps, "nsd": nsd, "sec": round(dt), "S_fit": sc(m, s3.split("fitness")), "S_test": sc(m, s3.split("test")),
  "add_test": sc(m, data_v8.eval_split("add","test")), "cipher_test": sc(m, data_v8.eval_split("cipher","test"))}), flush=True)
