"""Model cards for converted folders: README.md with Hub metadata, origin, recipe, routing and perplexity.

The template is ``ma_convert/model_cards/template.md`` (a ``string.Template``), shipped with the package.
"""

from __future__ import annotations

import io
import platform
import re
import string
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from .hub import write_files
from .version import __version__

EXPERT_NAMES = ("full", "linear", "local")
NOT_MEASURED = "not measured"
TAGS = ["ma-convert", "meta-attention", "custom_code"]

TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "template.md"  # shipped in the wheel


def conversion_card_info(model, source) -> dict:
    """The card facts of a freshly converted model: its base, its license, and how its weights were obtained."""
    dtype = str(model.dtype).replace("torch.", "")
    origin = f"Converted from `{source.name}`, stored in {dtype}."
    if source.gguf_quantization:
        origin = (f"Converted from `{source.name}`. The weights were de-quantized to {dtype} from the GGUF file "
                  f"`{source.local_path.name}` ({source.gguf_quantization} quantization): they carry its rounding, "
                  "and are not the original full-precision weights.")
    return {"base_model": source.name, "license": source.license, "origin": origin}


def plot_routing(layer_stats: Sequence[Mapping], path: str | Path) -> Path:
    """Per-layer stacked bars of the full / linear / local expert fractions, written as a PNG."""
    # A Figure directly, not pyplot: no global backend switch and no GUI, whatever the caller uses.
    from matplotlib.figure import Figure

    fractions = [_fractions(row) for row in layer_stats]
    if not fractions or any(f is None for f in fractions):
        raise ValueError("plot_routing needs, for every layer, 'expert_fractions' with 3 numbers (full, linear, local)")
    path = Path(path)
    layers = list(range(len(fractions)))
    fig = Figure(figsize=(max(4.0, 0.3 * len(layers) + 2.0), 3.2), layout="constrained")
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    write_files({path: buffer.getvalue()})
    return path


def render_model_card(folder: str | Path, info: Mapping) -> str:
    """Write ``folder/README.md`` (and ``folder/routing.png`` when layer stats are given); return the card.

    ``info``: ``base_model`` (required: a Hub id, or the name of a local checkpoint) and, all optional,
    ``license``, ``origin`` (how the weights were obtained, e.g. de-quantized from a GGUF),
    ``recipe_yaml``, ``layer_stats``, ``perplexity``, ``perplexity_text`` (what it was measured on:
    text and block length), ``projected_cost``, ``repo_id`` (used in the load snippets), ``model_name``,
    ``tags``. What is missing renders as "not measured".
    """
    folder = Path(folder)
    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, got {type(info).__name__}")
    base_model = info.get("base_model")
    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError("info['base_model'] is required: the Hub id (or name) of the model that was converted")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; convert the model before writing its card")

    layer_stats = info.get("layer_stats") or []
    routing_plot = NOT_MEASURED if not layer_stats else _routing_plot(layer_stats, folder / "routing.png")
    values = {
        "front_matter": _front_matter(base_model, info),
        "title": info.get("model_name") or f"{base_model.rstrip('/').split('/')[-1]} (Meta-Attention)",
        "base_model": base_model,
        "origin": info.get("origin") or f"Converted from `{base_model}`.",
        "recipe": _recipe_block(info.get("recipe_yaml")),
        "routing_table": _routing_table(layer_stats),
        "routing_plot": routing_plot,
        "perplexity_table": _perplexity_table(info.get("perplexity"), info.get("perplexity_text")),
        "projected_cost": _number(info.get("projected_cost"), 3),
        "repo_id": info.get("repo_id") or "<repo_id or folder>",
        "python_version": platform.python_version(),
        "torch_version": installed_version("torch"),
        "transformers_version": installed_version("transformers"),
        "ma_convert_version": __version__,
    }
    text = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(values)
    write_files({folder / "README.md": text})
    return text


def check_card(folder: str | Path) -> Path:
    """The path of `folder`'s model card, which ma-convert wrote (else a clear error: it is not ours to change)."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no model card (README.md) to add the measurement to")
    from huggingface_hub import ModelCard

    if "ma-convert" not in (ModelCard.load(path).data.tags or []):
        raise ValueError(f"{path} is not a card ma-convert wrote (no 'ma-convert' tag): it is left as it is")
    return path


def add_measurement(folder: str | Path, key: str, markdown: str, images: Mapping[str, bytes] | None = None) -> Path:
    """Put a measurement (an `ma-convert eval` table, a frontier plot) into the card of a folder ma-convert
    wrote: a section marked by `key`, replaced when the same key comes again, placed before "## Usage".
    `images`: PNG files for the section, written into the folder beside the card. Returns the card's path."""
    folder = Path(folder)
    path = check_card(folder)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        raise ValueError(f"measurement key {key!r}: use letters, digits, '.', '_' and '-'")
    for name, data in (images or {}).items():
        image = folder / name
        if image.exists() and b"ma-convert" not in image.read_bytes()[:4096]:
            raise ValueError(f"{image} exists and ma-convert did not write it: it is left as it is")
    begin, end = f"<!-- ma-convert measurement: {key} -->", f"<!-- /ma-convert measurement: {key} -->"
    section = f"{begin}\n{markdown.strip()}\n{end}\n"
    text = path.read_text(encoding="utf-8")
    old = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if old.search(text):
        text = old.sub(lambda _: section, text, count=1)
    elif "\n## Usage" in text:
        text = text.replace("\n## Usage", f"\n{section}\n## Usage", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{section}"
    write_files({**{folder / name: data for name, data in (images or {}).items()}, path: text})
    return path


def _front_matter(base_model: str, info: Mapping) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        # The Hub links base_model to a repo: a local checkpoint's name is left to the card's text.
        base_model=base_model if is_hub_id(base_model) else None,
        license=info.get("license"),  # inherited from the base model; omitted rather than guessed
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=TAGS + [tag for tag in info.get("tags") or [] if tag not in TAGS],
    )
    return data.to_yaml()


def is_hub_id(name: str) -> bool:
    """Whether `name` has the shape of a Hub model id (owner/name)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return "/" in name


def _recipe_block(recipe: str | None) -> str:
    if not recipe or not recipe.strip():
        return NOT_MEASURED
    # A fence longer than any backtick run inside, so the recipe cannot close the block early.
    fence = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`+", recipe)])
    return f"{fence}yaml\n{recipe.strip()}\n{fence}"


def _fractions(row: Mapping) -> list[float] | None:
    fractions = row.get("expert_fractions")
    return [float(f) for f in fractions] if fractions is not None and len(fractions) == len(EXPERT_NAMES) else None


def _routing_table(layer_stats: Sequence[Mapping]) -> str:
    if not layer_stats:
        return NOT_MEASURED
    lines = ["| layer | full | linear | local | entropy | projected cost |", "|---|---|---|---|---|---|"]
    for index, row in enumerate(layer_stats):
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


def _perplexity_table(perplexity, measured_on) -> str:
    if not perplexity:
        return NOT_MEASURED
    lines = [f"Measured on {measured_on}." if measured_on else "Measured on: not recorded.", "",
             "| model | perplexity |", "|---|---|"]
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


def installed_version(distribution: str) -> str:
    # Read from the installed metadata: no need to import torch or transformers to write a card.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
