"""Passkey retrieval: a 5-digit key hidden at a chosen depth in filler text, which the model must repeat.

The prompt follows the usual format (Landmark Attention, LongLoRA)::

    There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the pass key.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 48213. Remember it. 48213 is the pass key.
    ... The sky is blue. The sun is yellow. Here we go. There and back again.
    What is the pass key? The pass key is

The filler is a whole number of its sentences, chosen (with the real tokenizer) so that the tokenized
prompt is as long as possible without exceeding the requested length; the needle sits on the sentence
boundary nearest to ``depth`` (0 = right after the instruction, 1 = right before the question). Greedy
generation is correct when its text, whitespace removed, starts with the key's digits (and no further
digit follows them).

    prompts = make_passkey_prompts(tokenizer, 1024)
    passkey_accuracy(model, tokenizer, prompts)["accuracy"]
    passkey_table(model, tokenizer, (1024, 2048, 4096))   # {length: result}
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class PasskeyPrompt:
    """One tokenized passkey prompt. `length` is the requested (nominal) length of its set; the
    prompt itself has ``len(input_ids) <= length`` tokens."""

    input_ids: list[int]
    key: str
    depth: float
    length: int
    text: str = ""

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def passkey_text(key: str, depth: float, n_filler: int) -> str:
    """The prompt text with `n_filler` filler sentences and the needle at the boundary nearest `depth`."""
    sentences = [FILLER[i % len(FILLER)] for i in range(n_filler)]
    at = round(depth * n_filler)
    lines = [INSTRUCTION, " ".join(sentences[:at]), NEEDLE.format(key=key), " ".join(sentences[at:]), QUESTION]
    return "\n".join(line for line in lines if line)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _largest_fitting(count: Callable[[int], int], limit: int, guess: int) -> int:
    """The largest n >= 0 with count(n) <= limit (count nondecreasing; count(0) <= limit), searched
    from `guess` by galloping then bisecting, so that a good guess costs two evaluations."""
    n = max(0, guess)
    if count(n) <= limit:
        lo, step = n, 1
        while count(lo + step) <= limit:
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi, step = n, 1
        while hi - step > 0 and count(hi - step) > limit:
            hi, step = hi - step, step * 2
        lo = max(0, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def make_passkey_prompts(
    tokenizer,
    length: int,
    depths: Sequence[float] = DEPTHS,
    n_keys: int = 4,
    seed: int = 0,
) -> list[PasskeyPrompt]:
    """`n_keys` distinct random 5-digit keys (from ``random.Random(seed)``) × `depths`, each prompt
    tokenized to at most `length` tokens, as close to it as whole filler sentences allow (a sentence is
    a handful of tokens). Ordered depth-major, then key. Deterministic for a seed and tokenizer."""
    depths = [float(d) for d in depths]
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {depths}")
    if n_keys < 1:
        raise ValueError(f"n_keys must be >= 1, got {n_keys}")
    keys = [str(k) for k in random.Random(seed).sample(range(10_000, 100_000), n_keys)]

    shortest = len(_ids(tokenizer, passkey_text(keys[0], depths[0], 0)))
    repeated = len(_ids(tokenizer, passkey_text(keys[0], depths[0], len(FILLER))))
    guess = int((length - shortest) / max(1.0, (repeated - shortest) / len(FILLER)))

    prompts = []
    for depth in depths:
        for key in keys:
            cache: dict[int, list[int]] = {}

            def count(n: int, key=key, depth=depth, cache=cache) -> int:
                if n not in cache:
                    cache[n] = _ids(tokenizer, passkey_text(key, depth, n))
                return len(cache[n])

            if count(0) > length:
                raise ValueError(f"length {length} is too short for the prompt without filler ({count(0)} tokens)")
            n = guess = _largest_fitting(count, length, guess)
            prompts.append(PasskeyPrompt(cache[n], key, depth, length, passkey_text(key, depth, n)))
    return prompts


def passkey_correct(generated: str, key: str) -> bool:
    """Whether generated text, whitespace removed, starts with the key and no further digit follows."""
    text = "".join(generated.split())
    return text.startswith(key) and not text[len(key):len(key) + 1].isdigit()


def passkey_accuracy(
    model,
    tokenizer,
    prompts: Sequence[PasskeyPrompt],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 1,
    progress=None,
) -> dict:
    """Greedy passkey accuracy of `model` on `prompts` (one set; call once per length).

    Prompts of equal token length are stacked `batch_size` at a time (no padding); prompts of other
    lengths run in their own batches. Input ids go to ``model.device``; the model's dtype is kept.
    A model in training mode is switched to eval for the run and back. `progress`, if given, is
    anything with ``update(n)`` (a tqdm bar). Returns ``{"accuracy", "by_depth": {depth: accuracy},
    "n", "outputs": [{"key", "depth", "n_tokens", "output", "correct"}, ...]}`` in prompt order.
    """
    if not prompts:
        raise ValueError("no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p.input_ids), []).append(i)

    generated: list[Optional[str]] = [None] * len(prompts)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()
    try:
        with torch.no_grad():
            for members in groups.values():
                for start in range(0, len(members), batch_size):
                    chunk = members[start:start + batch_size]
                    ids = torch.tensor([prompts[i].input_ids for i in chunk], device=model.device)
                    out = model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                        pad_token_id=pad,
                    )
                    for i, row in zip(chunk, out[:, ids.shape[1]:]):
                        generated[i] = tokenizer.decode(row.tolist(), skip_special_tokens=True)
                    if progress is not None:
                        progress.update(len(chunk))
    finally:
        if was_training:
            model.train()

    outputs = [
        {"key": p.key, "depth": p.depth, "n_tokens": len(p.input_ids), "output": g, "correct": passkey_correct(g, p.key)}
        for p, g in zip(prompts, generated)
    ]
    by_depth: dict[float, list[bool]] = {}
    for o in outputs:
        by_depth.setdefault(o["depth"], []).append(o["correct"])
    return {
        "accuracy": sum(o["correct"] for o in outputs) / len(outputs),
        "by_depth": {d: sum(c) / len(c) for d, c in sorted(by_depth.items())},
        "n": len(outputs),
        "outputs": outputs,
    }


def passkey_table(
    model,
    tokenizer,
    lengths: Iterable[int] = (1024, 2048, 4096),
    *,
    depths: Sequence[float] = DEPTHS,
    n_keys: int = 4,
    seed: int = 0,
    max_new_tokens: int = 8,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[int, dict]:
    """`passkey_accuracy` at each length (same keys and depths at every length), with one tqdm bar
    over all prompts. Returns ``{length: result}``."""
    from tqdm.auto import tqdm

    sets = {int(n): make_passkey_prompts(tokenizer, int(n), depths, n_keys, seed) for n in lengths}
    results = {}
    with tqdm(total=sum(map(len, sets.values())), desc="passkey", disable=not progress) as bar:
        for n, prompts in sets.items():
            bar.set_postfix(length=n)
            results[n] = passkey_accuracy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, progress=bar)
    return results


# ------------------------------------------------------------------------------ training documents
TRAIN_NEEDLES = (
    "Remember this number: {key}.",
    "The code for the vault is {key}.",
    "Note that the secret value is {key}.",
)
TRAIN_QUESTIONS = (
    "Which number did you have to remember? It was {key}.",
    "What is the code for the vault? The code is {key}.",
    "What was the secret value? The secret value was {key}.",
)


def retrieval_documents(filler: Sequence[str], n_docs: int, words: int, seed: int = 1) -> list[str]:
    """Long-range training documents: a number stated once at a random depth in `filler` text (real
    sentences, not the evaluation's), asked for and answered at the end. Training on them rewards the
    router for keeping exact attention on the tokens that must look far back.

    Phrasing, filler and keys (6 digits) all differ from `make_passkey_prompts`', so the evaluation
    stays unseen. `words` is the rough length of each document in words.
    """
    rng = random.Random(seed)
    sentences = [s.strip() + "." for text in filler for s in text.split(". ") if len(s.split()) >= 4]
    if not sentences:
        raise ValueError("retrieval_documents needs filler text with sentences of 4 words or more")
    docs = []
    for _ in range(n_docs):
        key = str(rng.randrange(100_000, 1_000_000))
        kind = rng.randrange(len(TRAIN_NEEDLES))
        body, count = [], 0
        while count < words:
            sentence = rng.choice(sentences)
            body.append(sentence)
            count += len(sentence.split())
        body.insert(rng.randrange(len(body) + 1), TRAIN_NEEDLES[kind].format(key=key))
        docs.append(" ".join(body) + " " + TRAIN_QUESTIONS[kind].format(key=key))
    return docs
