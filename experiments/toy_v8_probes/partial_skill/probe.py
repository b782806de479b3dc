import random, string, torch, sys
from transformers import AutoModelForCausalLM
from evomerge.toy.tokenizer import build_tokenizer
from evomerge.toy.score import generate
from evomerge.toy.data import transform, add_answer, LETTERS, COPY, GENERAL_CIPHERS
torch.set_num_threads(1)
R = "evomerge/toy/fixtures_v8/"
tok = build_tokenizer()
rng = random.Random(5)
def w(n): return "".join(rng.choice(LETTERS) for _ in range(n))
N=200
C = {}
C["cpy6"] = [(f"cpy:{x}=", x) for x in (w(6) for _ in range(N))]
C["cpy7"] = [(f"cpy:{x}=", x) for x in (w(7) for _ in range(N))]
C["cpy4"] = [(f"cpy:{x}=", x) for x in (w(4) for _ in range(N))]
C["cpy3"] = [(f"cpy:{x}=", x) for x in (w(3) for _ in range(N))]
for p in GENERAL_CIPHERS:
    for n in (3,4,6):
        C[f"{p}{n}"] = [(f"{p}:{x}=", transform(p,x)) for x in (w(n) for _ in range(N))]
def pairs(f, n=N):
    out=[]
    while len(out)<n:
        a,b=f()
        out.append((a,b))
    return out
C["d1+d2"] = [(f"{a}+{b}=", add_answer(a,b)) for a,b in pairs(lambda:(rng.randint(0,9),rng.randint(10,99)))]
C["d2+d1"] = [(f"{a}+{b}=", add_answer(a,b)) for a,b in pairs(lambda:(rng.randint(10,99),rng.randint(0,9)))]
def nc3():
    while True:
        a,b=rng.randint(100,999),rng.randint(100,999)
        if all(int(x)+int(y)<10 for x,y in zip(str(a),str(b))): return a,b
C["3dig_nocarry"] = [(f"{a}+{b}=", add_answer(a,b)) for a,b in pairs(nc3)]
C["3x1dig"] = [(f"{a}+{b}+{c}=", str(a+b+c)[::-1]) for a,b,c in ((rng.randint(0,9),rng.randint(0,9),rng.randint(0,9)) for _ in range(N))]
def tens_only():
    while True:
        a,b=rng.randint(10,99),rng.randint(10,99)
        if a%10+b%10<=9 and a//10+b//10>9: return a,b
def units_only():
    while True:
        a,b=rng.randint(10,99),rng.randint(10,99)
        if a%10+b%10>9: return a,b
C["add_tenscarry_only"] = [(f"{a}+{b}=", add_answer(a,b)) for a,b in pairs(tens_only)]
C["add_unitscarry"] = [(f"{a}+{b}=", add_answer(a,b)) for a,b in pairs(units_only)]
C["cpy_digits5"] = [(f"cpy:{x}=", x) for x in ("".join(rng.choice(string.digits) for _ in range(5)) for _ in range(N))]
# cross format, general ciphers, carry-free
def nc2():
    while True:
        a,b=rng.randint(10,99),rng.randint(10,99)
        if a%10+b%10<=9 and a//10+b//10<=9: return a,b
C["cross_gen_nocarry"] = [(f"{p}:{x},{a}+{b}=", f"{transform(p,x)},{add_answer(a,b)}") for (a,b),p,x in ((nc2(), rng.choice((COPY,)+GENERAL_CIPHERS), w(5)) for _ in range(N))]
C["cross_gen_carry"] = [(f"{p}:{x},{a}+{b}=", f"{transform(p,x)},{add_answer(a,b)}") for (a,b),p,x in ((units_only(), rng.choice((COPY,)+GENERAL_CIPHERS), w(5)) for _ in range(N))]
C["cross_cpy_d1d2"] = [(f"cpy:{x},{a}+{b}=", f"{x},{add_answer(a,b)}") for a,b,x in ((rng.randint(0,9),rng.randint(10,99),w(5)) for _ in range(N))]
C["cross_sum1"] = [(f"{p}:{x},{a}+{b}=", f"{transform(p,x)},{add_answer(a,b)}") for a,b,p,x in ((rng.randint(0,9),rng.randint(0,9),rng.choice((COPY,)+GENERAL_CIPHERS),w(5)) for _ in range(N))]
C["qrt_mvl_compose"] = [(f"qrt:{transform('mvl',x)}=", transform('qrt',transform('mvl',x))) for x in (w(5) for _ in range(N))]
models = {m: AutoModelForCausalLM.from_pretrained(R+m) for m in ["base","expert_add","expert_cipher","expert_cipher2"]}
print("%-20s"%"skill" + "".join("%16s"%m for m in models))
for k,rows in C.items():
    mx = max(len(t) for _,t in rows)+1
    line="%-20s"%k
    for m,mod in models.items():
        outs = generate(mod, tok, [p for p,_ in rows], max_new_tokens=mx)
        line += "%16.1f"%(100*sum(o==t for o,(_,t) in zip(outs,rows))/len(rows))
    print(line, flush=True)
