import sys, time, shutil, json
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from evomerge.toy import FIXTURES_V8
from evomerge.toy.build_v8 import expert_batches, score_model
from evomerge.toy.train import Packer, TrainSpec, train
from evomerge.toy.tokenizer import build_tokenizer
torch.set_num_threads(1)
tok = build_tokenizer()
skill, idx, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = Path(sys.argv[4])
for spec_s in sys.argv[5:]:
    density, lr, steps, slot = spec_s.split(",")
    spec = TrainSpec(steps=int(steps), lr=float(lr), batch_size=128, warmup=20, density=float(density), mask_slot=int(slot))
    tag = f"{name}_d{density}_lr{lr}_s{steps}_slot{slot}"
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / "base")
    train(model, expert_batches(0 * 1000 + 7 + 2 * idx, skill, 128), Packer(tok), spec)
    t1 = time.time() - t0
    base = AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / "base").state_dict()
    sd = model.state_dict()
    moved = sum((sd[k] != base[k]).sum().item() for k in sd); total = sum(v.numel() for v in sd.values())
    s = score_model(model, tok)
    d = out / tag; d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d); tok.save_pretrained(d)
    print(json.dumps({"tag": tag, "train_s": round(t1,1), "moved_frac": round(moved/total,3),
                      **{k: v for k, v in s.items() if k.endswith("_test")}}), flush=True)
