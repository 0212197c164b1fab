"""Model cards for converted folders: README.md with Hub metadata, the recipe, routing and perplexity.

The template is ``model_cards/template.md`` at the repository root (a ``string.Template``). It is found
next to the package (source checkout, editable install, or a wheel that ships it as package data);
only if it is absent does the compact copy embedded below stand in, so a card can always be written.
"""

from __future__ import annotations

import os
import platform
import re
import string
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import yaml

from .version import __version__

EXPERT_NAMES = ("full", "linear", "local")
NOT_MEASURED = "not measured"
TAGS = ["ma-convert", "meta-attention", "custom_code"]

_PACKAGE_DIR = Path(__file__).resolve().parent
# Source checkout / editable install: <repo>/model_cards beside <repo>/ma_convert. Installed wheel: the
# same relative path from site-packages/ma_convert, once pyproject ships model_cards/template.md as data.
TEMPLATE_CANDIDATES = (
    _PACKAGE_DIR.parent / "model_cards" / "template.md",
    _PACKAGE_DIR / "model_cards" / "template.md",
)

# Used only when no template file is found; tests check it has the same placeholders as the file.
_EMBEDDED_TEMPLATE = """\
---
${front_matter}
---

# ${title}

`${base_model}` converted to **Meta-Attention** with ma-convert: in every attention layer a per-token
router sends each query token to one of three experts sharing the layer's Q/K/V/O projections:
`full` (the original softmax attention, exactly), `linear` (kernel attention) and `local`
(sliding-window attention).

## Conversion recipe

${recipe}

## Routing

${routing_table}

${routing_plot}

## Perplexity

${perplexity_table}

## Projected cost

${projected_cost}

## Usage

```python
import ma_convert  # registers the Meta-Attention model types with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("${repo_id}")
```

Without ma-convert:

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("${repo_id}", trust_remote_code=True)
```

## Framework versions

- Python ${python_version}
- PyTorch ${torch_version}
- Transformers ${transformers_version}
- ma-convert ${ma_convert_version}
"""


def load_template() -> str:
    """The card template's text: the shipped file, or the embedded copy if the file is absent."""
    for candidate in TEMPLATE_CANDIDATES:
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    return _EMBEDDED_TEMPLATE


def plot_routing(layer_stats: Sequence[Mapping], path: str | Path) -> Path:
    """Per-layer stacked bars of the full / linear / local expert fractions, written as a PNG."""
    # Figure + Agg canvas directly, not pyplot: no global backend switch and no GUI, whatever the caller uses.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fractions = [_fractions(row) for row in layer_stats]
    if not fractions or any(f is None for f in fractions):
        raise ValueError("plot_routing needs, for every layer, 'expert_fractions' with 3 numbers (full, linear, local)")
    path = Path(path)
    layers = list(range(len(fractions)))
    fig = Figure(figsize=(max(4.0, 0.3 * len(layers) + 2.0), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bottom = [0.0] * len(layers)
    for k, (name, color) in enumerate(zip(EXPERT_NAMES, ("#4c72b0", "#55a868", "#dd8452"))):
        heights = [f[k] for f in fractions]
        ax.bar(layers, heights, bottom=bottom, color=color, label=name, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens")
    ax.set_xticks(layers)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title("Routing per layer")
    _atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    return path


def render_model_card(folder: str | Path, info: Mapping) -> str:
    """Write ``folder/README.md`` (and ``folder/routing.png`` when layer stats are given); return the card.

    ``info``: ``base_model`` (required) and, all optional, ``license``, ``recipe_yaml``, ``layer_stats``,
    ``perplexity``, ``projected_cost``, ``repo_id`` (used in the load snippets), ``model_name``, ``tags``.
    What is missing renders as "not measured".
    """
    folder = Path(folder)
    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, got {type(info).__name__}")
    base_model = info.get("base_model")
    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError("info['base_model'] is required: the Hub id (or path) of the model that was converted")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; convert the model before writing its card")

    layer_stats = info.get("layer_stats") or []
    routing_plot = NOT_MEASURED if not layer_stats else _routing_plot(layer_stats, folder / "routing.png")
    values = {
        "front_matter": _front_matter(base_model, info),
        "title": info.get("model_name") or f"{base_model.rstrip('/').split('/')[-1]} (Meta-Attention)",
        "base_model": base_model,
        "recipe": _recipe_block(info.get("recipe_yaml")),
        "routing_table": _routing_table(layer_stats),
        "routing_plot": routing_plot,
        "perplexity_table": _perplexity_table(info.get("perplexity")),
        "projected_cost": _number(info.get("projected_cost"), 3),
        "repo_id": info.get("repo_id") or "<repo_id or folder>",
        "python_version": platform.python_version(),
        "torch_version": _installed_version("torch"),
        "transformers_version": _installed_version("transformers"),
        "ma_convert_version": __version__,
    }
    try:
        text = string.Template(load_template()).substitute(values)
    except (KeyError, ValueError) as error:  # a placeholder the renderer does not know: a template bug
        raise ValueError(f"model card template has an unknown or malformed placeholder: {error}") from error
    _atomic_write(folder / "README.md", lambda handle: handle.write(text.encode("utf-8")))
    return text


def _front_matter(base_model: str, info: Mapping) -> str:
    meta = {"base_model": base_model}
    if info.get("license") is not None:  # inherited from the base model; omitted rather than guessed
        meta["license"] = info["license"]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = TAGS + [tag for tag in info.get("tags") or [] if tag not in TAGS]
    # safe_dump quotes whatever needs quoting (ids with ':' etc.), so the Hub parses it as written.
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def _recipe_block(recipe) -> str:
    if recipe is None or (isinstance(recipe, str) and not recipe.strip()):
        return NOT_MEASURED
    if not isinstance(recipe, str):
        recipe = yaml.safe_dump(recipe, sort_keys=False)
    # A fence longer than any backtick run inside, so the recipe cannot close the block early.
    fence = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`+", recipe)])
    return f"{fence}yaml\n{recipe.strip()}\n{fence}"


def _fractions(row: Mapping) -> list[float] | None:
    fractions = row.get("expert_fractions") if isinstance(row, Mapping) else None
    if fractions is None or len(fractions) != len(EXPERT_NAMES):
        return None
    try:
        return [float(f) for f in fractions]
    except (TypeError, ValueError):
        return None


def _routing_table(layer_stats: Sequence[Mapping]) -> str:
    if not layer_stats:
        return NOT_MEASURED
    lines = ["| layer | full | linear | local | entropy | projected cost |", "|---|---|---|---|---|---|"]
    for index, row in enumerate(layer_stats):
        row = row if isinstance(row, Mapping) else {}
        fractions = _fractions(row)
        cells = [_number(f, 3) for f in fractions] if fractions else [NOT_MEASURED] * len(EXPERT_NAMES)
        cells += [_number(row.get("entropy"), 3), _number(row.get("projected_cost"), 3)]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _routing_plot(layer_stats: Sequence[Mapping], path: Path) -> str:
    try:
        plot_routing(layer_stats, path)
    except ImportError:
        return "Routing plot not generated: matplotlib is not installed (`pip install ma-convert[train]`)."
    except ValueError:
        return "Routing plot not generated: some layers have no expert fractions."
    return "![Share of tokens per expert, per layer](routing.png)"


def _perplexity_table(perplexity) -> str:
    if not perplexity:
        return NOT_MEASURED
    lines = ["| model | perplexity |", "|---|---|"]
    # A "|" in a label would split the Markdown cell.
    lines += [
        "| " + str(label).replace("|", "\\|") + f" | {_number(value, 2)} |" for label, value in perplexity.items()
    ]
    return "\n".join(lines)


def _number(value, digits: int) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return NOT_MEASURED


def _installed_version(distribution: str) -> str:
    # Read from the installed metadata: no need to import torch or transformers to write a card.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary sibling and rename it into place, so a reader never sees half a file."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as handle:
            tmp = Path(handle.name)
            write(handle)
        os.chmod(tmp, 0o644)  # NamedTemporaryFile makes 0600 files; a card is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
