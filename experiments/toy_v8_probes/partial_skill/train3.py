import sys, time, torch, json
sys.path.insert(0, "/tmp/t20c")
import s3
from transformers import AutoModelForCausalLM
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.train import Packer, TrainSpec, train
from evomerge.toy.score import score_exact_match
from evomerge.toy import data_v8
torch.set_num_threads(1)
lr, steps, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
tok = build_tokenizer()
R = "evomerge/toy/fixtures_v8/"
def sc(m, rows): return 100*score_exact_match(m, tok, [r.prompt for r in rows], [r.target for r in rows], max_new_tokens=8)
base = AutoModelForCausalLM.from_pretrained(R+"base")
print("base S test", sc(base, s3.split("test")))
t0 = time.time()
m = AutoModelForCausalLM.from_pretrained(R+"base")
train(m, s3.expert_batches(0*1000+7+2*2, 128), Packer(tok), TrainSpec(steps=steps, lr=lr, batch_size=128, warmup=20))
dt = time.time()-t0
m.save_pretrained(out); tok.save_pretrained(out)
print(json.dumps({"lr": lr, "steps": steps, "sec": round(dt), "S_fit": sc(m, s3.split("fitness")), "S_test": sc(m, s3.split("test")),
  "add_test": sc(m, data_v8.eval_split("add","test")), "cipher_test": sc(m, data_v8.eval_split("cipher","test"))}), flush=True)
