"""render_model_card: front matter the Hub can parse, the routing / perplexity tables, the plot, the snippets."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import yaml

from ma_convert import card
from ma_convert.card import plot_routing, render_model_card
from ma_convert.version import __version__

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYER_STATS = [
    {"expert_fractions": [0.5, 0.25, 0.25], "entropy": 0.4, "projected_cost": 0.6125},
    {"expert_fractions": [0.125, 0.625, 0.25], "entropy": 0.3, "projected_cost": 0.30625, "n_tokens": 64},
    {"expert_fractions": [1.0, 0.0, 0.0], "entropy": 0.05, "projected_cost": 1.0},
]
PERPLEXITY = {
    "original": 15.1,
    "converted, forced full": 15.1,
    "routed, before finetune": 300.0,
    "routed, after finetune": 16.04,
}
RECIPE = "window_size: 256\nrouter: dirichlet\nfeature_map: hedgehog\n"


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "ma_llama"}))
    (out / "model.safetensors").write_bytes(b"\0" * 32)
    return out


def full_info(**changes) -> dict:
    info = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "apache-2.0",
        "recipe_yaml": RECIPE,
        "layer_stats": LAYER_STATS,
        "perplexity": PERPLEXITY,
        "projected_cost": 0.6396,
        "repo_id": "tester/smollm2-ma",
    }
    info.update(changes)
    return info


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "the card must start with YAML front matter between --- lines"
    return yaml.safe_load(match[1])


def table_rows(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:  # skip the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_card_written_and_returned(folder):
    text = render_model_card(folder, full_info())
    assert (folder / "README.md").read_text(encoding="utf-8") == text
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_front_matter(folder):
    meta = front_matter(render_model_card(folder, full_info()))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"ma-convert", "meta-attention", "custom_code"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"


def test_license_omitted_when_unknown(folder):
    assert "license" not in front_matter(render_model_card(folder, full_info(license=None)))
    info = full_info()
    del info["license"]
    assert "license" not in front_matter(render_model_card(folder, info))


def test_recipe_in_code_block(folder):
    text = render_model_card(folder, full_info())
    block = re.search(r"```yaml\n(.*?)\n```", text, re.DOTALL)
    assert block and yaml.safe_load(block[1]) == yaml.safe_load(RECIPE)


def test_routing_table_rows(folder):
    rows = table_rows(render_model_card(folder, full_info()), "| layer |")
    assert rows == [
        ["0", "0.500", "0.250", "0.250", "0.400", "0.613"],
        ["1", "0.125", "0.625", "0.250", "0.300", "0.306"],
        ["2", "1.000", "0.000", "0.000", "0.050", "1.000"],
    ]


def test_perplexity_rows_and_projected_cost(folder):
    text = render_model_card(folder, full_info())
    rows = table_rows(text, "| model | perplexity |")
    assert rows == [
        ["original", "15.10"],
        ["converted, forced full", "15.10"],
        ["routed, before finetune", "300.00"],
        ["routed, after finetune", "16.04"],
    ]
    assert "0.640" in text.split("## Projected cost", 1)[1].split("##", 1)[0]


def test_routing_plot_is_png_and_embedded(folder):
    text = render_model_card(folder, full_info())
    png = folder / "routing.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 1000
    assert re.search(r"!\[[^\]]*\]\(routing\.png\)", text)


def test_plot_routing_alone(tmp_path):
    path = plot_routing(LAYER_STATS, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="expert_fractions"):
        plot_routing([{"entropy": 0.1}], tmp_path / "bad.png")


def test_load_snippets_and_versions(folder):
    text = render_model_card(folder, full_info())
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    with_package = next(b for b in blocks if "import ma_convert" in b)
    assert 'AutoModelForCausalLM.from_pretrained("tester/smollm2-ma")' in with_package
    remote = next(b for b in blocks if "trust_remote_code=True" in b)
    assert "import ma_convert" not in remote
    assert 'from_pretrained("tester/smollm2-ma", trust_remote_code=True)' in remote
    for block in blocks:
        compile(block, "<snippet>", "exec")  # the snippets are valid Python
    versions = text.split("## Framework versions", 1)[1]
    assert f"ma-convert {__version__}" in versions
    for name in ("Python", "PyTorch", "Transformers"):
        assert re.search(rf"- {name} \d", versions), name


def test_missing_optional_keys_render_not_measured(folder):
    text = render_model_card(folder, {"base_model": "org/base"})
    for section in ("## Conversion recipe", "## Routing", "## Perplexity", "## Projected cost"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        assert "not measured" in body, section
    assert not (folder / "routing.png").exists()
    assert front_matter(text)["base_model"] == "org/base"


def test_partial_layer_stats_do_not_crash(folder):
    stats = [{"expert_fractions": [0.2, 0.3, 0.5]}, {"entropy": 0.1}]
    text = render_model_card(folder, full_info(layer_stats=stats, perplexity={"original": None}))
    rows = table_rows(text, "| layer |")
    assert rows[0][:4] == ["0", "0.200", "0.300", "0.500"] and rows[0][4] == "not measured"
    assert rows[1][1] == "not measured" and rows[1][4] == "0.100"
    assert table_rows(text, "| model | perplexity |") == [["original", "not measured"]]
    assert "![" not in text  # no plot without fractions for every layer


@pytest.mark.parametrize("info", [{}, {"base_model": ""}, {"base_model": None, "license": "mit"}])
def test_missing_base_model_raises(folder, info):
    with pytest.raises(ValueError, match="base_model"):
        render_model_card(folder, info)
    assert not (folder / "README.md").exists()


def test_template_ships_inside_the_package():
    """The wheel carries the template as package data: it lives under ma_convert/ and pyproject ships it."""
    import importlib.resources

    import tomllib

    assert card.TEMPLATE.is_file() and card.TEMPLATE.parent.parent == Path(card.__file__).parent
    shipped = importlib.resources.files("ma_convert").joinpath("model_cards/template.md").read_text(encoding="utf-8")
    assert card.TEMPLATE.read_text(encoding="utf-8") == shipped
    pyproject = tomllib.loads((Path(card.__file__).parents[1] / "pyproject.toml").read_text())
    assert "model_cards/*.md" in pyproject["tool"]["setuptools"]["package-data"]["ma_convert"]
    placeholders = {m["named"] or m["braced"] for m in string.Template.pattern.finditer(shipped)} - {None}
    assert {"front_matter", "origin", "perplexity_table", "repo_id"} <= placeholders


def test_a_local_base_model_stays_out_of_the_front_matter(folder):
    """The Hub links `base_model` to a repo: a local checkpoint's name goes in the text only."""
    text = render_model_card(folder, full_info(base_model="my-llama-folder"))
    assert "base_model" not in front_matter(text)
    assert "`my-llama-folder`" in text


def test_origin_and_what_perplexity_was_measured_on(folder):
    text = render_model_card(folder, full_info(origin="De-quantized from a GGUF file (Q4_1).",
                                               perplexity_text="pydoc text, in 256-token blocks"))
    assert "## Origin\n\nDe-quantized from a GGUF file (Q4_1)." in text
    assert "Measured on pydoc text, in 256-token blocks." in text.split("## Perplexity", 1)[1]


def test_tokenizer_snippet_trusts_remote_code(folder):
    text = render_model_card(folder, full_info())
    assert 'AutoTokenizer.from_pretrained("tester/smollm2-ma", trust_remote_code=True)' in text
