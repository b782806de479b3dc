"""Scratch third skills; S3KIND selects one."""
import os, random, string
from evomerge.toy import data_v8
from evomerge.toy.data import Example, add_answer
KIND = os.environ.get("S3KIND", "mixed")
_r = random.Random(777)
if KIND == "mixed":
    ALL = [(a, b) for a in range(10) for b in range(10, 100)] + [(b, a) for a in range(10) for b in range(10, 100)]
    def ex(p): return Example(f"{p[0]}+{p[1]}=", add_answer(*p))
    def gen(rng):
        a, b = rng.randint(0, 9), rng.randint(10, 99)
        return (b, a) if rng.random() < 0.5 else (a, b)
elif KIND == "three1":
    ALL = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    def ex(p): return Example(f"{p[0]}+{p[1]}+{p[2]}=", str(sum(p))[::-1])
    def gen(rng): return tuple(rng.randint(0, 9) for _ in range(3))
elif KIND == "cpydig":
    ALL = None
    def ex(p): return Example(f"cpy:{p}=", p)
    def gen(rng): return "".join(rng.choice(string.digits) for _ in range(5))
if ALL is None:
    HELD = []
    while len(HELD) < 300:
        g = gen(_r)
        if g not in HELD: HELD.append(g)
else:
    HELD = _r.sample(ALL, 300)
HELD_SET = frozenset(HELD)
def split(name):
    return [ex(p) for p in (HELD[:100] if name == "fitness" else HELD[100:])]
class Stream(data_v8.Stream):
    def skill(self, name):
        if name == "s3":
            while True:
                p = gen(self.rng)
                if p not in HELD_SET: return ex(p)
        return super().skill(name)
def expert_batches(seed, batch_size, mix={"s3": 1.0}, replay=None):
    s = Stream(seed, mix); rep = Stream(seed + 1, replay or data_v8.REPLAY_MIX); h = batch_size // 2
    return lambda: s.batch(h) + rep.batch(batch_size - h)
