"""A fast batched greedy exact-match scorer, an oracle for the lm-eval based evaluator.

Semantics match lm-eval's `generate_until` with HF `generate` and `until: ["</s>"]`: the prompt
is encoded with the tokenizer's BOS, left padded; each row is greedy-decoded for at most
`max_new_tokens` tokens and ends at its first EOS; the continuation is decoded with special
tokens skipped, cut at the first stop string, and compared to the target exactly (no strip).
"""

from __future__ import annotations

import torch

from .data import STOP


def _continuations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding="longest")
    finally:
        tokenizer.padding_side = side
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos = tokenizer.eos_token_id
    n = ids.shape[0]
    done = torch.zeros(n, dtype=torch.bool)
    out = torch.full((n, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate derives positions under left padding
    cache = None
    step_ids, step_pos = ids, pos
    for t in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                    past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        nxt = res.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
        out[:, t] = nxt
        done |= nxt == eos
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], dim=1)
    texts = tokenizer.batch_decode(out.tolist(), skip_special_tokens=True)
    return [t.split(STOP)[0] for t in texts]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int = 256,
             max_new_tokens: int = 8) -> list[str]:
    """Greedy continuations of `prompts`, in order."""
    was_training = model.training
    model.eval()
    try:
        res: list[str] = []
        for i in range(0, len(prompts), batch_size):
            res += _continuations(model, tokenizer, prompts[i:i + batch_size], max_new_tokens)
        return res
    finally:
        model.train(was_training)


def score_exact_match(model, tokenizer, prompts: list[str], targets: list[str],
                      batch_size: int = 256, max_new_tokens: int | None = None) -> float:
    """Fraction of prompts whose greedy continuation equals the target exactly.

    `max_new_tokens` should be the task's `max_gen_toks`; by default it is 8, or more when a
    target needs it (one token per character, plus EOS).
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    if not prompts:
        return 0.0
    if max_new_tokens is None:
        max_new_tokens = max(8, 1 + max(len(t) for t in targets))
    outs = generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    return sum(o == t for o, t in zip(outs, targets)) / len(prompts)
