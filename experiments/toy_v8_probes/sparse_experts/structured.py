"""Structured disjoint masks: slot k trains only its own third of each layer's MLP neurons and
attention head k (q/k/v rows, o_proj columns); embeddings, norms and head frozen. Optional anchor pool."""
import sys, time, json, random
from pathlib import Path
import torch
import evomerge.toy.train as T
from transformers import AutoModelForCausalLM
from evomerge.toy import FIXTURES_V8, data_v8
from evomerge.toy.data import Example
from evomerge.toy.build_v8 import score_model
from evomerge.toy.tokenizer import build_tokenizer
torch.set_num_threads(1)
tok = build_tokenizer()

def structured(model, density, slot, seed=0):
    g = torch.Generator().manual_seed(99)
    perm = torch.randperm(256, generator=g)
    neurons = torch.zeros(256, dtype=torch.bool); neurons[perm[slot * 85:(slot + 1) * 85]] = True
    head = torch.zeros(128, dtype=torch.bool); head[slot * 32:(slot + 1) * 32] = True
    masks = {}
    for n, p in model.named_parameters():
        m = torch.zeros(p.shape, dtype=torch.bool)
        if "gate_proj" in n or "up_proj" in n: m[neurons, :] = True
        elif "down_proj" in n: m[:, neurons] = True
        elif any(k in n for k in ("q_proj", "k_proj", "v_proj")): m[head, :] = True
        elif "o_proj" in n: m[:, head] = True
        masks[n] = m
    return masks
T.sparse_masks = structured
pool = [Example(p, o) for p, o in json.loads(Path("/tmp/t20b/anchor_pool.json").read_text())]
skill, idx, name, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
for spec_s in sys.argv[5:]:
    lr, steps, slot, n_anchor = spec_s.split(","); n_anchor = int(n_anchor)
    spec = T.TrainSpec(steps=int(steps), lr=float(lr), batch_size=128, warmup=20, density=0.5, mask_slot=int(slot))
    seed = 7 + 2 * idx
    sk, rp = data_v8.Stream(seed, data_v8.EXPERT_MIXES[skill]), data_v8.Stream(seed + 1, data_v8.REPLAY_MIX)
    arng = random.Random(seed + 100)
    nb = lambda: sk.batch(64) + rp.batch(64 - n_anchor) + [arng.choice(pool) for _ in range(n_anchor)]
    tag = f"{name}_struct_anchor{n_anchor}_lr{lr}_s{steps}_slot{slot}"
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(FIXTURES_V8 / "base")
    T.train(model, nb, T.Packer(tok), spec)
    t1 = time.time() - t0
    s = score_model(model, tok)
    d = out / tag; d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d); tok.save_pretrained(d)
    print(json.dumps({"tag": tag, "train_s": round(t1, 1), **{k: v for k, v in s.items() if k.endswith("_test")}}), flush=True)
