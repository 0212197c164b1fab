"""`verify`: reload a converted folder both ways and check it against itself and its base model."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. Attention is routed per token, and the full expert is exact."

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
print(type(model).__module__)
"""


def _sample_ids(folder: Path, vocab: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)(SAMPLE_TEXT, return_tensors="pt").input_ids
    except (OSError, ValueError, KeyError, TypeError):
        return torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))


def _load_base(base: Optional[str], dtype: torch.dtype):
    """The base model named in the config, if it is on this machine (folder or .gguf file), in `dtype`."""
    if not base:
        return None
    from transformers import AutoModelForCausalLM

    path = Path(base)
    if path.suffix == ".gguf" and path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return None


def _agree(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> tuple[float, bool]:
    """Max |a - b|, and whether it is within tolerance: absolute in float32; in 16-bit, where the
    same maths in another kernel order differs by rounding, relative to the logits' scale (1%)."""
    diff = (a.float() - b.float()).abs().max().item()
    if a.dtype == torch.float32:
        return diff, diff <= tolerance
    return diff, diff <= 1e-2 * b.float().abs().max().item()


def verify(folder: str | Path, tolerance: float = 1e-5, say=print) -> bool:
    """Reload `folder` (a) with ma_convert and (b) as remote code without it; compare their logits,
    and compare forced-full logits with the base model when it is available. True if all agree."""
    from transformers import AutoModelForCausalLM

    from .core.control import force_expert

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if "meta_attention" not in config:
        raise ValueError(f"{folder} is not a converted model (its config.json has no meta_attention block)")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _sample_ids(folder, model.config.vocab_size)
    with torch.no_grad():
        routed = model(ids).logits
        with force_expert(model, "full"):
            full = model(ids).logits
    say(f"(a) loaded with ma_convert: {type(model).__name__}, {ids.shape[1]} tokens")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = Path(tmp) / "ids.pt", Path(tmp) / "logits.pt"
        torch.save(ids, ids_file)
        run = subprocess.run(
            [sys.executable, "-c", _REMOTE_LOAD, str(folder), str(ids_file), str(out_file)],
            capture_output=True, text=True,
        )
        if run.returncode != 0:
            say(f"(b) remote-code load FAILED:\n{run.stderr[-2000:]}")
            ok = False
        else:
            diff, good = _agree(torch.load(out_file), routed, tolerance)
            ok &= good
            say(f"(b) loaded as remote code without ma_convert: max |logit diff| vs (a) = {diff:.2e} {'ok' if good else 'FAILED'}")
    base = _load_base(config["meta_attention"].get("base_model"), model.dtype)
    if base is None:
        say("(c) base model not available here: forced-full comparison skipped")
    else:
        with torch.no_grad():
            diff, good = _agree(full, base(ids).logits, tolerance)
        ok &= good
        say(f"(c) forced-full vs the base model ({str(model.dtype).replace('torch.', '')}): max |logit diff| = "
            f"{diff:.2e} {'ok' if good else 'FAILED'}")
    return ok
