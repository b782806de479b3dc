"""Model construction and the training loops of the toy world (base pre-training, expert fine-tuning)."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .data import BASE_MIX, REPLAY_MIX, Example, Stream

IGNORE = -100


@dataclass(frozen=True)
class TrainSpec:
    """One training run: AdamW with linear warm-up then cosine decay to `final_lr_frac * lr`."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 50
    final_lr_frac: float = 0.05
    weight_decay: float = 0.0
    clip: float = 1.0
    # Sparse fine-tuning: `density < 1` trains only a fixed, seeded random subset of each
    # parameter tensor's entries (slot `mask_slot` of a shared partition, so experts with
    # different slots move disjoint entries and their task vectors are exactly orthogonal), a
    # stand-in for the near-orthogonal task vectors of large models. No shipped world uses it:
    # in v8 it did not let a merge keep both ciphers (README, "Sparse fine-tunes").
    density: float = 1.0
    mask_slot: int = 0

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.final_lr_frac + (1 - self.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def model_config(tokenizer) -> LlamaConfig:
    """DESIGN's tiny Llama: 4 layers, hidden 128, 4 heads, intermediate 256, untied (0.67M params)."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def new_model(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=12)
    return model


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # additive, (rows, 1, width, width)
    position_ids: torch.Tensor
    labels: torch.Tensor


class Packer:
    """Packs `<s>text</s>` examples into rows with a block-diagonal causal mask and positions
    restarting at each example, so each example sees only itself, exactly as if alone in a row.

    Examples span 5 to 17 tokens: padding every row to the longest wastes ~40% of the compute;
    rows of 34 tokens (two letter-skill examples of 17) pack the toy mix with almost no padding.
    """

    def __init__(self, tokenizer, width: int = 34):
        self.width = width
        self.vocab = tokenizer.get_vocab()  # one id per character; much faster than the tokenizer
        self.bos, self.eos, self.pad = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                        tokenizer.pad_token_id)

    def _rows(self, examples: list[Example]) -> list[list[list[int]]]:
        seqs = [[self.bos, *(self.vocab[c] for c in e.text), self.eos] for e in examples]
        width = max(self.width, *map(len, seqs))
        rows: list[list[list[int]]] = []
        fill: list[int] = []
        for seq in sorted(seqs, key=len, reverse=True):  # first-fit decreasing
            for i, used in enumerate(fill):
                if used + len(seq) <= width:
                    rows[i].append(seq)
                    fill[i] += len(seq)
                    break
            else:
                rows.append([seq])
                fill.append(len(seq))
        return rows

    def __call__(self, examples: list[Example]) -> Batch:
        rows = self._rows(examples)
        width = max(sum(map(len, r)) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            at = 0
            for j, seq in enumerate(row):
                ids[i, at:at + len(seq)] = torch.tensor(seq)
                seg[i, at:at + len(seq)] = j
                pos[i, at:at + len(seq)] = torch.arange(len(seq))
                at += len(seq)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        labels = ids.masked_fill((seg < 0) | (ids == self.bos), IGNORE)  # nothing predicts <s>
        return Batch(ids, mask[:, None], pos, labels)


MASK_SEED = 4242


def sparse_masks(model, density: float, slot: int, seed: int = MASK_SEED) -> dict[str, torch.Tensor]:
    """Boolean masks, one per parameter: entry e is in slot `slot` iff its seeded uniform draw
    u(e) lies in [slot * density, (slot + 1) * density). The draw depends only on `seed` and the
    parameter names and shapes, so masks of different slots (same density) are disjoint."""
    if not 0 < density <= 1 or (slot + 1) * density > 1 + 1e-9:
        raise ValueError(f"slot {slot} at density {density} does not fit in [0, 1)")
    masks = {}
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
        u = torch.rand(p.shape, generator=g)
        masks[name] = (u >= slot * density) & (u < (slot + 1) * density)
    return masks


def train(model, next_batch: Callable[[], list[Example]], pack: Packer, spec: TrainSpec,
          log: Callable[[str], None] | None = None) -> list[float]:
    """Training on `next_batch()` (every parameter, or the `spec.density` slice of each tensor);
    returns the loss of every step."""
    torch.set_flush_denormal(True)  # denormals slow CPU training 2-8x
    model.train()
    masks = None
    if spec.density < 1:
        masks = sparse_masks(model, spec.density, spec.mask_slot)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98),
                            weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, spec.lr_factor)
    losses, t0 = [], time.time()
    for step in range(spec.steps):
        b = pack(next_batch())
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=b.position_ids, labels=b.labels).loss
        loss.backward()
        if masks is not None:  # off-mask gradients are zero before clipping and the step
            for n, m in masks.items():
                if params[n].grad is not None:
                    params[n].grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        if masks is not None:  # and off-mask entries stay the start's (weight decay included)
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].copy_(torch.where(m, params[n], frozen[n]))
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step + 1) % max(1, spec.steps // 10) == 0:
            recent = losses[-max(1, spec.steps // 10):]
            log(f"  step {step + 1}/{spec.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    torch.set_flush_denormal(False)
    return losses


def base_batches(seed: int, batch_size: int) -> Callable[[], list[Example]]:
    stream = Stream(seed, BASE_MIX)
    return lambda: stream.batch(batch_size)


EXPERT_MIXES = {"add": {"add": 1.0}, "cipher": {"target_cipher": 1.0}}


def expert_batches(seed: int, skill: str, batch_size: int) -> Callable[[], list[Example]]:
    """Half of each batch the expert's skill, half replay of general data only.

    Replay keeps the shared skills alive; leaving the other expert's skill out of it keeps the
    two task vectors apart.
    """
    mix = EXPERT_MIXES[skill]
    skill_stream, replay = Stream(seed, mix), Stream(seed + 1, REPLAY_MIX)
    half = batch_size // 2
    return lambda: skill_stream.batch(half) + replay.batch(batch_size - half)
