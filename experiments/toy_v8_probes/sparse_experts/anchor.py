"""Diagnostic (not the brief's sparse idea): experts whose replay also holds novel-prefix prompts
answered as the base answers them (self-distillation), so each expert's change is gated on its own prefix."""
import sys, time, json, random, string
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from evomerge.toy import FIXTURES_V8, data_v8
from evomerge.toy.data import Example
from evomerge.toy.build_v8 import score_model
from evomerge.toy.score import generate
from evomerge.toy.train import Packer, TrainSpec, train
from evomerge.toy.tokenizer import build_tokenizer
torch.set_num_threads(1)
tok = build_tokenizer()
RESERVED = {"cpy", "qrt", "mvl", "sbx", "zkp"}
pool_path = Path("/tmp/t20b/anchor_pool.json")
if not pool_path.exists():
    rng = random.Random(777); s = data_v8.Stream(778, {"copy": 1.0})
    prompts = []
    while len(prompts) < 6000:
        p = "".join(rng.choice(string.ascii_lowercase) for _ in range(3))
        if p not in RESERVED:
            prompts.append(f"{p}:{s.word()}=")
    base = AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / "base")
    t0 = time.time(); outs = generate(base, tok, prompts, max_new_tokens=8); print("pool gen s", round(time.time()-t0))
    pool_path.write_text(json.dumps([[p, o] for p, o in zip(prompts, outs)]))
pool = [Example(p, o) for p, o in json.loads(pool_path.read_text())]
skill, idx, name, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
for spec_s in sys.argv[5:]:
    density, lr, steps, slot, n_anchor = spec_s.split(",")
    n_anchor = int(n_anchor)
    spec = TrainSpec(steps=int(steps), lr=float(lr), batch_size=128, warmup=20, density=float(density), mask_slot=int(slot))
    seed = 7 + 2 * idx
    sk, rp = data_v8.Stream(seed, data_v8.EXPERT_MIXES[skill]), data_v8.Stream(seed + 1, data_v8.REPLAY_MIX)
    arng = random.Random(seed + 100)
    nb = lambda: sk.batch(64) + rp.batch(64 - n_anchor) + [arng.choice(pool) for _ in range(n_anchor)]
    tag = f"{name}_anchor{n_anchor}_d{density}_lr{lr}_s{steps}_slot{slot}"
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / "base")
    train(model, nb, Packer(tok), spec)
    t1 = time.time() - t0
    s = score_model(model, tok)
    d = out / tag; d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d); tok.save_pretrained(d)
    print(json.dumps({"tag": tag, "train_s": round(t1, 1), **{k: v for k, v in s.items() if k.endswith("_test")}}), flush=True)
