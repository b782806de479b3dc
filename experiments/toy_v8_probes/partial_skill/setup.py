import sys, os, json, shutil
sys.path.insert(0, "/tmp/t20c")
import s3
from evomerge.toy.data import UTILS_PY, _task_yaml
kind, expert, tag = os.environ["S3KIND"], sys.argv[1], sys.argv[2]
W = f"/tmp/t20c/world_{tag}"
shutil.rmtree(W, ignore_errors=True)
shutil.copytree("/work/t20c/evomerge/toy/fixtures_v8", W)
shutil.rmtree(f"{W}/expert_cipher2"); shutil.copytree(expert, f"{W}/expert_cipher2")
T = f"/tmp/t20c/tasks_{tag}"; os.makedirs(f"{T}/data", exist_ok=True)
open(f"{T}/utils.py", "w").write(UTILS_PY)
for split in ("fitness", "test"):
    y = _task_yaml("s3", split, 8).replace("toy_s3", f"toy_s3{tag}")
    name = f"toy_s3{tag}" + ("" if split == "fitness" else "_test")
    open(f"{T}/{name}.yaml", "w").write(y)
    open(f"{T}/data/s3_{split}.jsonl", "w").write("".join(json.dumps({"prompt": e.prompt, "target": e.target}) + "\n" for e in s3.split(split)))
y = open("/work/t20c/experiments/toy_three.yaml").read()
y = y.replace("../search_spaces/", "/work/t20c/search_spaces/").replace("include: [../evaluators/toy_v8]", f"include: [/work/t20c/evaluators/toy_v8, {T}]")
y = y.replace("task: toy_cipher2, test: toy_cipher2_test", f"task: toy_s3{tag}, test: toy_s3{tag}_test").replace("name: toy_three", f"name: toy_three_{tag}")
open(f"/tmp/t20c/toy_three_{tag}.yaml", "w").write(y)
print(W, T)
