import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from evomerge.toy import FIXTURES_V8, data_v8
from evomerge.toy.data import transform
from evomerge.toy.score import generate
from evomerge.toy.tokenizer import build_tokenizer
torch.set_num_threads(1)
tok = build_tokenizer()
F = FIXTURES_V8
words = [r.prompt.split(":")[1][:-1] for r in data_v8.eval_split("cipher2", "fitness")][:100]
def tv(p): 
    b = AutoModelForCausalLM.from_pretrained(F/"base").state_dict(); o = AutoModelForCausalLM.from_pretrained(p).state_dict()
    return {k: o[k]-b[k] for k in b}
base = AutoModelForCausalLM.from_pretrained(F/"base"); b = {k: v.clone() for k, v in base.state_dict().items()}
models = {"add": F/"expert_add", "cipher": Path(sys.argv[1]), "cipher2": Path(sys.argv[2])}
tvs = {n: tv(p) for n, p in models.items()}
def table(w): 
    base.load_state_dict({k: b[k] + sum(w[n]*tvs[n][k] for n in w) for k in b}); return base
for w in ({}, {"cipher": 1}, {"cipher2": 1}, {"cipher": 1, "cipher2": 1}, {"cipher": .5, "cipher2": .5}):
    m = table(w)
    for pre in ("sbx", "zkp", "qrt"):
        outs = generate(m, tok, [f"{pre}:{x}=" for x in words], max_new_tokens=8)
        ref = {k: [data_v8.letter_skill(k, x) for x in words] for k in ("sbx", "zkp", "qrt", "mvl", "cpy")}
        frac = {k: round(sum(sum(a == c for a, c in zip(o, r)) / max(1, len(r)) for o, r in zip(outs, ref[k])) / len(words), 2) for k in ref}
        print(w, pre, "per-letter agreement with each table:", frac, "e.g.", words[0], "->", outs[0])
