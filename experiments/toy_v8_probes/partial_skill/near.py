exec(open('/tmp/t20c/probe.py').read().split("models = ")[0])
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(R+"base")
for k in ["cpy6","cpy4","qrt4","qrt6","d1+d2","d2+d1","3dig_nocarry","3x1dig","cpy_digits5","cross_cpy_d1d2","cross_sum1"]:
    rows=C[k]; outs=generate(base,tok,[p for p,_ in rows],max_new_tokens=max(len(t) for _,t in rows)+2)
    # prefix char accuracy
    ca = sum(sum(a==b for a,b in zip(o,t))/len(t) for o,(_,t) in zip(outs,rows))/len(rows)
    print(k, "characc %.2f"%ca, [(p,t,o) for (p,t),o in list(zip(rows,outs))[:3]])
