"""`verify`: reload a converted folder and check it against itself, its remote code and its base model.

(a) loads it with ma_convert; (b) loads it as remote code in a fresh interpreter without ma_convert,
only when the user trusts the folder's code; (c) compares forced-full logits with the base model
when it is at hand; (d) checks that cached generation equals recomputation, token for token.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .sources import ModelSourceError, error_summary, read_json

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. Attention is routed per token, and the full expert is exact."
GENERATED_TOKENS = 16

# Runs in a fresh interpreter where `import ma_convert` fails: only the folder's remote code is used.
_REMOTE_LOAD = """
import sys
sys.modules["ma_convert"] = None
import torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.load(ids_file)).logits, out_file)
"""


def _sample_ids(folder: Path, vocab: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)(SAMPLE_TEXT, return_tensors="pt").input_ids
    except (OSError, ValueError, KeyError, TypeError):
        return torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))


def load_base(base: str, dtype: torch.dtype):
    """The base model from a folder, a .gguf file or a Hub id (already downloaded), in `dtype`."""
    from .convert import load_model
    from .sources import resolve_source

    return load_model(resolve_source(base), dtype=dtype).eval()


def _agree(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> tuple[float, bool]:
    """Max |a - b|, and whether it is within tolerance: absolute in float32; in 16-bit, where the
    same maths in another kernel order differs by rounding, relative to the logits' scale (1%)."""
    diff = (a.float() - b.float()).abs().max().item()
    if a.dtype == torch.float32:
        return diff, diff <= tolerance
    return diff, diff <= 1e-2 * b.float().abs().max().item()


def converted_config(folder: str | Path):
    """The config of a converted folder (no weights read), after checking that it is one."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelSourceError(f"{folder} is not a folder")
    config = read_json(folder / "config.json")
    if "meta_attention" not in config:
        raise ModelSourceError(f"{folder} is not a converted model (its config.json has no meta_attention block)")
    return AutoConfig.from_pretrained(folder)


def load_converted(folder: str | Path):
    """A converted folder loaded with ma_convert, after checking that it is one; one-line errors."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    converted_config(folder)
    try:
        return AutoModelForCausalLM.from_pretrained(folder).eval()
    except ValueError:
        raise
    except Exception as error:  # a damaged weights file fails in safetensors or torch terms: name the folder
        raise ModelSourceError(f"cannot load the weights in {folder}: {error_summary(error)}") from None


def verify(folder: str | Path, *, base: Optional[str] = None, trust_remote_code: bool = False,
           tolerance: float = 1e-5, say=print) -> bool:
    """Check a converted folder (see the module docstring). `base` is the original (folder, .gguf
    file or Hub id) for the forced-full comparison. True if every check that ran agrees."""
    from .core.control import force_expert
    from .remote_code import stale_remote_code_message

    folder = Path(folder)
    model = load_converted(folder)
    ids = _sample_ids(folder, model.config.vocab_size)
    with torch.no_grad():
        routed = model(ids).logits
        with force_expert(model, "full"):
            full = model(ids).logits
    say(f"(a) loaded with ma_convert: {type(model).__name__}, {ids.shape[1]} tokens")
    ok = _check_remote_code(folder, ids, routed, tolerance, trust_remote_code, say)
    stale = stale_remote_code_message(folder, model.config.model_type)
    if stale:
        say(f"    {stale}")
        ok = False
    ok &= _check_base(model, full, ids, base, tolerance, say)
    ok &= _check_cached_generation(model, ids, say)
    return ok


def _check_remote_code(folder: Path, ids, routed, tolerance: float, trusted: bool, say) -> bool:
    if not trusted:
        say("(b) remote code not run: it executes the folder's .py files; pass --trust-remote-code to check it")
        return True
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.pt", Path(tmp) / "logits.pt"
        torch.save(ids, ids_file)
        run = subprocess.run(
            [sys.executable, "-c", _REMOTE_LOAD, str(folder), str(ids_file), str(out_file)],
            capture_output=True, text=True,
        )
        if run.returncode != 0:
            say(f"(b) remote-code load FAILED:\n{run.stderr[-2000:]}")
            return False
        diff, good = _agree(torch.load(out_file, weights_only=True), routed, tolerance)
    say(f"(b) loaded as remote code without ma_convert: max |logit diff| vs (a) = {diff:.2e} {'ok' if good else 'FAILED'}")
    return good


def _check_base(model, full, ids, base: Optional[str], tolerance: float, say) -> bool:
    named = model.config.meta_attention.get("base_model")
    if base is None:
        say(f"(c) forced-full vs the base model skipped: pass --base with the original ({named or 'unnamed'}) to compare")
        return True
    with torch.no_grad():
        diff, good = _agree(full, load_base(base, model.dtype)(ids).logits, tolerance)
    say(f"(c) forced-full vs the base model ({str(model.dtype).replace('torch.', '')}): max |logit diff| = "
        f"{diff:.2e} {'ok' if good else 'FAILED'}")
    return good


def _check_cached_generation(model, ids, say) -> bool:
    """Greedy generation with the KV cache (and the linear state) equals generation that recomputes
    every step, in the saved routing mode and forced full."""
    from .core.control import force_expert

    settings = dict(max_new_tokens=GENERATED_TOKENS, do_sample=False, min_new_tokens=GENERATED_TOKENS,
                    pad_token_id=model.config.eos_token_id or 0)
    results = []
    with torch.no_grad():
        for label, context in (("routed", None), ("forced full", "full")):
            with force_expert(model, context) if context else contextlib.nullcontext():
                cached = model.generate(ids, use_cache=True, **settings)
                uncached = model.generate(ids, use_cache=False, **settings)
            same = torch.equal(cached, uncached)
            results.append(same)
            where = "" if same else f" (first difference at new token {_first_difference(cached, uncached, ids.shape[1])})"
            say(f"(d) cached generation = recomputation, {label}, {GENERATED_TOKENS} tokens: "
                f"{'ok' if same else 'FAILED' + where}")
    return all(results)


def _first_difference(a: torch.Tensor, b: torch.Tensor, prompt: int) -> int:
    n = min(a.shape[1], b.shape[1])
    differ = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return int(differ[0]) - prompt if len(differ) else n - prompt
