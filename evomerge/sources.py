"""Source checkpoints: locate, check that they can be merged, and keep them resident.

A worker loads its sources once per study, in the study's dtype and on the worker's device, in
one of two forms (nothing is reloaded per candidate):

- task vectors: the base weights and one task vector per source (source - base), for the
  methods that work on task vectors (task arithmetic, TIES, DARE, breadcrumbs, DELLA);
- whole sources: each source's own tensors and nothing else, when none of the methods that will
  run uses a base (linear, slerp), so that they merge exactly the tensors mergekit reads (base +
  (source - base) can differ from the source in the last bit). This keeps n tensors per weight
  where task vectors keep n + 1.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from evomerge.hf_config import config_value, num_layers
from evomerge.refs import SourceRef

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config fields that change what the tensors mean; a mismatch makes a merge meaningless.
_STRUCTURAL_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                      "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
                      "tie_word_embeddings", "hidden_act")


class SourceError(ValueError):
    """A source cannot be found, read or merged; the message says which and how to fix it."""


def is_local(path: str) -> bool:
    """A toy model or a path on this machine (not a hub id): its errors are final, no hub fallback."""
    return path.startswith("toy:") or Path(path).expanduser().exists()


def resolve_path(ref: SourceRef, *, allow_pickle: bool = False) -> Path:
    """A local directory for `ref`; hub ids are downloaded only when the hub is reachable."""
    if ref.path.startswith("toy:"):
        from evomerge.toy import ToyWorldError, toy_model_path

        try:
            return toy_model_path(ref.path[4:])
        except ToyWorldError as exc:
            raise SourceError(f"source {ref.name!r}: {exc}") from exc
    local = Path(ref.path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"source {ref.name!r}: {local} is a file; give the checkpoint's directory")
        return local
    looks_like_hub_id = ref.path.count("/") == 1 and not ref.path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise SourceError(f"source {ref.name!r}: no directory at {ref.path!r}; check the path "
                          "(relative paths are relative to the experiment file)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise SourceError(f"source {ref.name!r}: {ref.path!r} is not a local directory and the hub is "
                          "offline (HF_HUB_OFFLINE is set); download it first or give a local path")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(ref.path, revision=ref.revision, allow_patterns=patterns))
    except Exception as exc:  # network errors, missing repos, gated models
        raise SourceError(f"source {ref.name!r}: could not download {ref.path!r} from the hub: {exc}") from exc


def read_config(path: Path, name: str) -> dict:
    """The raw config.json: a dict compares field by field and needs no model code."""
    cfg = path / "config.json"
    if not cfg.exists():
        raise SourceError(f"source {name!r}: {path} has no config.json; is it a Hugging Face checkpoint?")
    return json.loads(cfg.read_text())


# Files a Hugging Face tokenizer is read from (any one is enough to try loading it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt")


def check_tokenizer(ref: SourceRef, *, trust_remote_code: bool = False, load: bool = True) -> None:
    """Raise a SourceError naming `ref` when its checkpoint has no tokenizer that loads.

    evomerge takes the tokenizer of one model (the base; the first source without a base; model A
    of a DFS search) to score candidates and to write the exported checkpoint; a fine-tuned
    checkpoint saved without its tokenizer would otherwise fail deep inside transformers.
    `load`: also load it with AutoTokenizer (catches broken files; about a second for large
    vocabularies), not only look for its files.
    """
    path = resolve_path(ref)
    present = [f for f in TOKENIZER_FILES if (path / f).is_file()] + [p.name for p in path.glob("*.tiktoken")]
    where = f"source {ref.name!r} ({ref.path}" + (f", at {path}" if str(path) != ref.path else "") + ")"
    fix = ("copy the tokenizer files from the model it was fine-tuned from into that directory (for example "
           "with `AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)`)")
    if not present:
        raise SourceError(f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); evomerge "
                          f"uses this model's tokenizer to evaluate and export merges. Fix: {fix}")
    if not load:
        return
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # broken or partial tokenizer files, remote code not trusted, ...
        detail = "".join(str(exc).splitlines()[:3])[:400]
        raise SourceError(f"{where}: its tokenizer ({', '.join(present)}) does not load: "
                          f"{type(exc).__name__}: {detail}. Fix: {fix}") from exc


def weight_files(path: Path, name: str, allow_pickle: bool) -> list[Path]:
    """Safetensors shards of a checkpoint; pickled .bin files only when explicitly allowed."""
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        raise SourceError(
            f"source {name!r}: {path} has only pickled .bin weights; loading them can run arbitrary "
            "code. Convert the checkpoint to safetensors, or set `allow_pickle: true` in the "
            "experiment if you trust it")
    if bins:
        return bins
    raise SourceError(f"source {name!r}: {path} has no weights (*.safetensors or pytorch_model*.bin)")


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Names and shapes from safetensors headers, without reading the data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix != ".safetensors":
            for k, v in torch.load(f, map_location="meta", weights_only=True).items():
                shapes[k] = tuple(v.shape)
            continue
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def load_tensors(files: list[Path], dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    out[k] = sf.get_tensor(k).to(device=device, dtype=dtype)
        else:
            for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
                out[k] = v.to(device=device, dtype=dtype)
    return out


def check_compatible(configs: dict[str, dict], shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Raise a SourceError naming the first mismatching config field or tensor and both models."""
    names = list(configs)
    ref = names[0]
    for other in names[1:]:
        for key in _STRUCTURAL_FIELDS:
            a, b = config_value(configs[ref], key), config_value(configs[other], key)
            if a != b:
                raise SourceError(
                    f"sources {ref!r} and {other!r} cannot be merged: config field {key!r} is {a!r} "
                    f"in {ref!r} but {b!r} in {other!r}; merge only models fine-tuned from one base")
        sa, sb = shapes[ref], shapes[other]
        for t in sorted(set(sa) | set(sb)):
            if t not in sa or t not in sb:
                has, lacks = (ref, other) if t in sa else (other, ref)
                raise SourceError(f"sources {ref!r} and {other!r} cannot be merged: tensor {t!r} is in "
                                  f"{has!r} but not in {lacks!r}")
            if sa[t] != sb[t]:
                raise SourceError(f"sources {ref!r} and {other!r} cannot be merged: tensor {t!r} has "
                                  f"shape {sa[t]} in {ref!r} but {sb[t]} in {other!r}")


@dataclass
class CheckpointInfo:
    """What is known about a source without loading its weights."""

    ref: SourceRef
    path: Path
    config: dict
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]


def inspect(ref: SourceRef, *, allow_pickle: bool = False) -> CheckpointInfo:
    path = resolve_path(ref, allow_pickle=allow_pickle)
    config = read_config(path, ref.name)
    files = weight_files(path, ref.name, allow_pickle)
    return CheckpointInfo(ref, path, config, files, tensor_shapes(files))


@dataclass
class SourceSet:
    """The resident weights for the life of a worker: base and task vectors, or whole sources.

    Task-vector form: `base_weights` and `deltas` (one per source); `weights` is None. Without a
    base the first source plays the base and its task vector is zero.
    Whole-source form (`weights` set: one tensor per source, in source order): `deltas` is empty
    and `base_weights` holds source 0's tensors (the same objects as `weights[name][0]`), which
    give every tensor's name, shape and dtype; the base, if any, is not resident.
    """

    base: CheckpointInfo
    sources: list[CheckpointInfo]
    base_weights: dict[str, torch.Tensor]
    deltas: dict[str, list[torch.Tensor]]
    dtype: torch.dtype
    device: torch.device
    has_base: bool = True
    compute_device: torch.device | None = None  # where merges run; differs from `device` when streamed
    weights: dict[str, list[torch.Tensor]] | None = None

    @property
    def whole(self) -> bool:
        """Whether the sources are resident as whole tensors (no task vectors)."""
        return self.weights is not None

    @property
    def streamed(self) -> bool:
        return self.compute_device is not None and self.compute_device != self.device

    @property
    def names(self) -> list[str]:
        return [s.ref.name for s in self.sources]

    @property
    def num_layers(self) -> int:
        n = num_layers(self.base.config)
        if n is None:
            raise SourceError(f"source {self.base.ref.name!r}: its config.json gives no decoder depth "
                              "(num_hidden_layers); evomerge merges decoder-only language models")
        return n

    @property
    def resident_bytes(self) -> int:
        tensors = list(self.base_weights.values()) + [d for ds in self.deltas.values() for d in ds]
        tensors += [w for ws in (self.weights or {}).values() for w in ws]
        unique = {(t.data_ptr(), t.numel() * t.element_size()) for t in tensors}  # aliases count once
        return sum(size for _, size in unique)


def open_sources(
    sources: list[SourceRef],
    base: SourceRef | None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    allow_pickle: bool = False,
    placement: str = "auto",
    methods: Iterable[str] | None = None,
) -> SourceSet:
    """Inspect, check and load every source once; task vectors are computed here, not per merge.

    placement: "device" keeps the weights on `device`; "host" keeps them in (pinned) CPU memory
    and streams each tensor to `device` when a candidate is merged; "auto" picks "device" when
    they fit in the device's free memory.
    methods: the merge methods that will run on these sources (an experiment's search space names
    one). When none of them uses a base (linear, slerp) the sources stay whole (see the module
    docstring), else base and task vectors are kept. None: whole without a base (only linear and
    slerp can run then), task vectors with one.
    """
    if dtype not in DTYPES:
        raise SourceError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    if not sources:
        raise SourceError("no sources given; an experiment needs at least one source model")
    names = [s.name for s in sources] + ([base.name] if base else [])
    if len(set(names)) != len(names):
        raise SourceError(f"source names must be unique, got {names}")
    whole = keeps_whole_sources(methods, base is not None)
    infos = [inspect(s, allow_pickle=allow_pickle) for s in sources]
    base_info = inspect(base, allow_pickle=allow_pickle) if base else infos[0]
    everyone = {i.ref.name: i for i in [base_info, *infos]}
    check_compatible({n: i.config for n, i in everyone.items()}, {n: i.shapes for n, i in everyone.items()})
    torch_dtype, compute = DTYPES[dtype], torch.device(device)
    copies = len(infos) if whole else 1 + len(infos)
    resident = sum(math.prod(shape) for shape in base_info.shapes.values()) * copies
    dev, pin = choose_placement(compute, resident * torch.finfo(torch_dtype).bits // 8, placement)
    if whole:
        loaded = [load_tensors(info.files, torch_dtype, dev) for info in infos]
        if pin:
            loaded = [{k: v.pin_memory() for k, v in w.items()} for w in loaded]
        weights = {k: [w[k] for w in loaded] for k in loaded[0]}
        return SourceSet(base_info, infos, dict(loaded[0]), {}, torch_dtype, dev, has_base=base is not None,
                         compute_device=compute, weights=weights)
    base_weights = load_tensors(base_info.files, torch_dtype, dev)
    deltas: dict[str, list[torch.Tensor]] = {k: [] for k in base_weights}
    for info in infos:
        loaded_k = base_weights if info is base_info else load_tensors(info.files, torch_dtype, dev)
        for k, b in base_weights.items():
            deltas[k].append(loaded_k[k] - b)
        del loaded_k
    if pin:
        base_weights = {k: v.pin_memory() for k, v in base_weights.items()}
        deltas = {k: [d.pin_memory() for d in ds] for k, ds in deltas.items()}
    return SourceSet(base_info, infos, base_weights, deltas, torch_dtype, dev, has_base=base is not None,
                     compute_device=compute)


def keeps_whole_sources(methods: Iterable[str] | None, has_base: bool) -> bool:
    """Whether `open_sources` keeps whole sources (True) or base and task vectors (False) for
    these methods; `evomerge plan` counts memory by the same rule."""
    if methods is None:
        return not has_base
    from evomerge.methods import get_method

    names = list(methods)
    return bool(names) and not any(get_method(m).uses_base for m in names)


PLACEMENTS = ("auto", "device", "host")


def choose_placement(compute: torch.device, resident_bytes: int, placement: str) -> tuple[torch.device, bool]:
    """Where the resident weights live, and whether to pin them (host memory feeding a GPU)."""
    if placement not in PLACEMENTS:
        raise SourceError(f"placement {placement!r} is unknown; use one of {PLACEMENTS}")
    if compute.type == "cpu" or placement == "device":
        return compute, False
    if placement == "auto":
        free, _total = torch.cuda.mem_get_info(compute)
        # Leave room for the output model (one more copy) and evaluation activations.
        if resident_bytes * 1.5 <= free:
            return compute, False
    return torch.device("cpu"), torch.cuda.is_available()
