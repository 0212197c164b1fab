"""lm-evaluation-harness as a client of converted models: the repo's tasks and the routing to evaluate.

lm-eval's own ``hf`` model loads a converted folder like any other (``trust_remote_code=True``), and
evaluates it in the routing mode its config was saved with. The tasks of this repo live in
`TASKS_DIR` (pass it as ``--include_path``)::

    lm_eval --model hf --model_args pretrained=out/,trust_remote_code=True,dtype=float32 \\
        --tasks ma_pydoc_cloze --include_path "$TASKS_DIR" --device cpu --batch_size 4

This module adds what the command line cannot say:

- `evaluate`: run lm-eval on a converted folder or model *forced to full attention* (which is the
  original model, exactly) or in another routing mode than the saved one, without touching the folder;
- `set_saved_routing`: change the routing a folder is loaded with (its config's ``meta_attention``
  block), so that the plain ``lm_eval`` command evaluates that.

lm-eval is optional (``pip install 'ma-convert[eval]'``); it is imported only when needed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASKS = ("ma_pydoc_cloze", "ma_pydoc_ppl")
ROUTINGS = ("full", "soft", "hard", "auto")


def task_manager(include_defaults: bool = True, **kwargs: Any):
    """An `lm_eval.tasks.TaskManager` that knows this repo's tasks, beside lm-eval's own unless
    `include_defaults` is False (which saves the seconds it takes to index those)."""
    from lm_eval.tasks import TaskManager

    if not any(TASKS_DIR.glob("*.yaml")):
        raise FileNotFoundError(f"no task files in {TASKS_DIR}: this install of ma_convert lacks its data files "
                                f"(install from the repository, e.g. pip install -e '.[eval]')")
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, **kwargs)


def set_saved_routing(
    folder: str | Path,
    routing: str,
    *,
    uncertainty_threshold: Optional[float] = None,
    dense_below: Optional[int] | str = "keep",
) -> dict:
    """Set the routing mode a converted folder loads with ("soft", "hard" or "auto", the last with an
    `uncertainty_threshold`), and optionally its `dense_below` (0: route short prompts on the GPU
    fast path too; None: the default). Rewrites ``config.json`` in place (an older format is
    migrated); returns the new ``meta_attention.policy`` mapping (validated before anything is written).
    """
    from ..core.policy import split_saved_block
    from ..modeling.base import current_block

    if routing not in ("soft", "hard", "auto"):
        raise ValueError(f"routing={routing!r} is invalid: a saved folder routes 'soft', 'hard' or 'auto' "
                         f"(forced full is not a saved mode: use evaluate(..., routing='full'))")
    if (routing == "auto") != (uncertainty_threshold is not None):
        raise ValueError("uncertainty_threshold is needed with routing='auto', and only then")
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    block = config.get("meta_attention")
    if not isinstance(block, dict) or not isinstance(block.get("attention"), dict):
        raise ValueError(f"{path} has no meta_attention block: {folder} is not a converted model")
    cfg, policy = split_saved_block(block)
    changes = dict(mode=routing, uncertainty_threshold=uncertainty_threshold)
    if dense_below != "keep":
        changes["dense_below"] = dense_below
    policy = policy.replace(**changes)  # a bad value fails here, before the file changes
    config["meta_attention"] = current_block(block, cfg, policy)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return policy.to_dict()


@contextlib.contextmanager
def routing_for_eval(
    model, routing: Optional[str] = None, *, uncertainty_threshold: Optional[float] = None,
    dense_below: Optional[int] | str = "keep",
) -> Iterator[Any]:
    """Inside the block, `model` (converted with ma_convert, or loaded with it imported) routes as
    asked: None keeps its mode, "full" forces every token to the full expert (the original
    model), "soft"/"hard"/"auto" switch the mode; `dense_below` overrides the GPU fast path's
    short-prompt threshold. Everything is restored on exit."""
    from ..core.control import force_expert, meta_attention_modules, routing_policy

    if routing is not None and routing not in ROUTINGS:
        raise ValueError(f"routing={routing!r} is invalid: must be None or one of {ROUTINGS}")
    if not meta_attention_modules(model):
        raise ValueError(
            f"{type(model).__name__} has no ma_convert Meta-Attention module (a model loaded as remote code "
            f"without ma_convert cannot be switched; pass the folder instead)"
        )
    changes = {} if dense_below == "keep" else {"dense_below": dense_below}
    if routing in ("soft", "hard", "auto"):
        changes["mode"] = routing
        if uncertainty_threshold is not None:  # a threshold not given is kept
            changes["uncertainty_threshold"] = uncertainty_threshold
    with routing_policy(model, **changes):
        with force_expert(model, "full") if routing == "full" else contextlib.nullcontext():
            yield model


def evaluate(
    model: Any,
    tasks: Sequence[str] = ("ma_pydoc_cloze",),
    *,
    routing: Optional[str] = None,
    uncertainty_threshold: Optional[float] = None,
    dense_below: Optional[int] | str = "keep",
    tokenizer: Any = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 4,
    limit: Optional[int | float] = None,
    **simple_evaluate_kwargs: Any,
) -> dict:
    """`lm_eval.simple_evaluate` on a converted model (a folder, or a model already loaded with
    ma_convert) with this repo's tasks available, in the routing asked for (see `routing_for_eval`).
    Returns lm-eval's results dict (``results["results"][task]["acc,none"]`` and so on)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, (str, Path)):  # ma_convert is imported, so the ma_* types load as its own classes
        folder = str(model)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer along with a loaded model")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = simple_evaluate_kwargs.pop("task_manager", None)
    if manager is None:  # indexing lm-eval's own few thousand task files takes seconds: only when asked for
        manager = task_manager(include_defaults=not set(tasks) <= set(TASKS))
    with routing_for_eval(model, routing, uncertainty_threshold=uncertainty_threshold, dense_below=dense_below):
        return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, **simple_evaluate_kwargs)
