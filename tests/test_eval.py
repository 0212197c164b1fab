"""`ma-convert eval` and the real attention cost it reports."""

import json

import pytest
import torch
from tiny_models import save_tiny_llama

from ma_convert.cli import main
from ma_convert.core.config import MetaAttnConfig
from ma_convert.core.cost import routed_work
from ma_convert.core.meta_attention import MetaAttention


def layer(**overrides):
    cfg = MetaAttnConfig(**{"d_model": 64, "n_heads": 4, "window_size": 2, "sink_tokens": 0, **overrides})
    return MetaAttention(cfg)


def cost(meta, routes):
    work, full = routed_work(meta, torch.as_tensor(routes)[None], len(routes))
    return work / full


def test_real_cost_counts_query_key_pairs():
    meta = layer()
    assert cost(meta, [0] * 50) == 1.0  # full attention's own work
    assert cost(meta, [2, 2, 2, 2]) == pytest.approx((1 + 2 + 2 + 2) / 10)  # window 2 over 4 keys
    assert cost(meta, [0, 0, 2, 2]) == pytest.approx((1 + 2 + 2 + 2) / 10)
    assert cost(meta, [2, 2, 2, 0]) == pytest.approx((1 + 2 + 2 + 4) / 10)  # the last token sees all 4
    sinks = layer(sink_tokens=1)
    assert cost(sinks, [2] * 5) == pytest.approx((1 + 2 + 3 + 3 + 3) / 15)  # the window and one sink


def test_real_cost_of_windows_and_kernels_falls_with_length():
    meta = MetaAttention(MetaAttnConfig(d_model=256, n_heads=4, window_size=512, linear_window=64, sink_tokens=4))
    local = [cost(meta, [2] * t) for t in (1024, 2048, 8192)]
    hybrid = [cost(meta, [1] * t) for t in (1024, 2048, 8192)]
    assert local[1] == pytest.approx(0.44, abs=0.01) and local[2] == pytest.approx(0.12, abs=0.01)
    assert hybrid[0] > hybrid[1] > hybrid[2] and hybrid[2] < 0.1
    assert cost(meta, [1] * 40) > 1.0  # below its own overhead the kernel part costs more than full


@pytest.mark.parametrize("overrides", [dict(), dict(linear_window=3, sink_tokens=1), dict(full_window=5)])
def test_token_costs_average_to_the_real_cost_of_hard_routes(overrides):
    """The objective's per-token real costs, averaged over a hard routing's choices, are the real cost
    `routed_work` counts, less the kernel expert's per-key work (charged once per row)."""
    from ma_convert.core.cost import key_work, token_costs

    meta = layer(window_size=4, **overrides)
    routes = torch.randint(0, 3, (1, 40), generator=torch.Generator().manual_seed(0))
    costs = token_costs(meta, 40)
    assert costs.shape == (40, 3)
    charged = costs.gather(1, routes.T).mean().item()
    work, full = routed_work(meta, routes, 40)
    kernel = meta.experts[1]
    assert charged == pytest.approx((work - key_work(kernel, 40, meta.cfg.d_head)) / full, rel=1e-5)
    assert torch.allclose(token_costs(meta, 40)[:, 0].mean(), torch.tensor(1.0))  # full: 1 on average


def test_real_cost_baseline_keeps_the_base_models_window():
    meta = layer(full_window=4)  # a Mistral-style model: full attention is itself windowed
    assert cost(meta, [0] * 10) == 1.0
    assert cost(meta, [2] * 10) == pytest.approx((1 + 2 * 9) / (1 + 2 + 3 + 4 * 7))


@pytest.fixture
def converted(tmp_path):
    source = save_tiny_llama(tmp_path / "source")
    assert main(["convert", str(source), str(tmp_path / "converted")]) == 0
    from pydoc_data.topics import topics

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]), encoding="utf-8")
    return source, tmp_path / "converted", text


def test_eval_reports_perplexity_routing_and_costs_per_length(converted, tmp_path, capsys):
    source, folder, text = converted
    out = tmp_path / "report"
    assert main(["eval", str(folder), "--text", str(text), "--lengths", "32", "96", "--routing", "hard",
                 "--base", str(source), "--max-blocks", "2", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]) == {"32", "96"}
    for row in report["results"].values():
        assert row["perplexity"] > 1 and row["original_perplexity"] > 1
        assert 0 < row["real_cost"] and 0 < row["projected_cost"] <= 1
        assert len(row["layers"]) == 2 and sum(row["routing"]["expert_fractions"]) == pytest.approx(1)
    markdown = (tmp_path / "report.md").read_text()
    assert "real cost" in markdown and f"# converted on {text}, routing hard" in markdown  # the model, then the text
    assert report["versions"]["torch"] == torch.__version__ and report["command"].startswith("ma-convert ")
    assert "wrote" in capsys.readouterr().out


def test_eval_passkey_at_the_models_last_position_leaves_room_for_the_answer(converted, tmp_path):
    """At the model's maximum length the passkey prompt is shortened by the answer's tokens (it used to
    fail with 'the sequence has 8193 tokens' on SmolLM2 at 8192)."""
    source, folder, text = converted
    assert main(["eval", str(folder), "--text", str(text), "--lengths", "128", "--max-blocks", "1", "--passkey",
                 "--routing", "full", "--base", str(source), "--out", str(tmp_path / "r")]) == 0
    row = json.loads((tmp_path / "r.json").read_text())["results"]["128"]
    assert row["passkey"]["prompt_tokens"] == 120 and 0 <= row["passkey"]["accuracy"] <= 1
    # with --base the original answers the same prompts; forced to full, the converted model answers as it does
    assert len(row["passkey"]["answers"]) == row["passkey"]["n"] == row["original_passkey"]["n"]
    assert row["passkey"]["answers"] == row["original_passkey"]["answers"]
    assert f"({row['original_passkey']['accuracy']:.2f})" in (tmp_path / "r.md").read_text()


def test_eval_sweeps_thresholds_into_a_cost_quality_frontier(converted, tmp_path, capsys):
    """--sweep-threshold: auto routing at each threshold plus each cheap expert forced, per length, as
    JSON, Markdown and a PNG plot; a higher threshold sends fewer tokens to full."""
    source, folder, text = converted
    argv = ["eval", str(folder), "--text", str(text), "--lengths", "32", "64", "--max-blocks", "2",
            "--base", str(source), "--sweep-threshold", "0.9", "0.001", "--out", str(tmp_path / "front")]
    assert main(argv) == 0
    points = json.loads((tmp_path / "front.json").read_text())["frontier"]
    assert [(p["length"], p["point"]) for p in points] == [
        (n, label) for n in (32, 64) for label in ("auto 0.001", "auto 0.9", "all linear", "all local")]
    for n in (32, 64):
        auto = {p["point"]: p for p in points if p["length"] == n}
        low, high = auto["auto 0.001"], auto["auto 0.9"]
        assert low["expert_fractions"][0] == 1.0  # every token is more uncertain than 0.001: all full
        # (at 32 tokens the kernel expert's per-key work makes it dearer than full in real cost)
        assert high["expert_fractions"][0] < 1.0 and high["projected_cost"] < low["projected_cost"] == 1.0
        assert low["real_cost"] == pytest.approx(1.0) and low["perplexity"] == pytest.approx(low["original_perplexity"])
        assert auto["all local"]["expert_fractions"][2] == 1.0
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "front.png" in (tmp_path / "front.md").read_text()
    assert main([*argv, "--overwrite"]) == 0  # the plot is recognised as ours too
    assert main([*argv[:-5], "--sweep-threshold", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "give thresholds in (0, 1]" in capsys.readouterr().err


def test_eval_forced_full_is_the_original(converted, tmp_path):
    source, folder, text = converted
    out = tmp_path / "full"
    assert main(["eval", str(folder), "--text", str(text), "--lengths", "64", "--routing", "full", "--base", str(source),
                 "--max-blocks", "2", "--out", str(out)]) == 0
    row = json.loads((tmp_path / "full.json").read_text())["results"]["64"]
    assert row["perplexity"] == pytest.approx(row["original_perplexity"], rel=1e-5)
    assert "real_cost" not in row  # nothing was routed


@pytest.mark.parametrize("argv,message", [
    (["--lengths", "4096"], "beyond the model's 128 positions"),
    (["--routing", "auto"], "needs --threshold"),
    (["--lengths", "1"], "at least 2 tokens"),
])
def test_eval_refuses_bad_input_clearly(converted, tmp_path, capsys, argv, message):
    _, folder, text = converted
    assert main(["eval", str(folder), "--text", str(text), "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_eval_never_overwrites_a_file_it_did_not_write(converted, tmp_path, capsys):
    _, folder, text = converted
    mine = tmp_path / "notes.json"
    mine.write_text("my notes")
    argv = ["eval", str(folder), "--text", str(text), "--lengths", "32", "--max-blocks", "1", "--out", str(tmp_path / "notes")]
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 2 and "not a report ma-convert wrote" in capsys.readouterr().err
    assert mine.read_text() == "my notes"
    missing = tmp_path / "missing.txt"
    assert main(["eval", str(folder), "--text", str(missing), "--out", str(tmp_path / "x")]) == 2


def test_eval_reads_jsonl_and_names_an_unreachable_hub_dataset(converted, tmp_path, capsys):
    _, folder, text = converted
    docs = [d for d in text.read_text().split("\n\n") if d.strip()]
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    argv = ["eval", str(folder), "--lengths", "32", "--max-blocks", "1", "--routing", "full"]
    assert main([*argv, "--text", str(jsonl), "--text-field", "body", "--out", str(tmp_path / "j")]) == 0
    assert json.loads((tmp_path / "j.json").read_text())["results"]["32"]["perplexity"] > 1
    assert main([*argv, "--text", "someone/some-dataset", "--out", str(tmp_path / "h")]) == 2
    assert "Hub is unreachable" in capsys.readouterr().err


def test_real_cost_of_the_linear_expert_by_hand():
    """Hedgehog, d=16 (F=32), chunk C: per query (F d + d^2) / 2d = 24 pairs and ((p mod C) + 1) * 1.5
    for its chunk; per key of a row that uses it, 24 more."""
    meta = MetaAttention(MetaAttnConfig(d_model=64, n_heads=4, window_size=2, sink_tokens=0))
    c = meta.experts[1].chunk
    t = c + 3
    want = sum(24 + ((p % c) + 1) * 1.5 for p in range(t)) + 24 * t
    assert cost(meta, [1] * t) == pytest.approx(want / (t * (t + 1) / 2))
    rows = torch.tensor([[1] * t, [0] * t])  # the second row never uses it: no per-key work there
    work, full = routed_work(meta, rows, t)
    assert work == pytest.approx(want + t * (t + 1) / 2) and full == t * (t + 1)


def test_real_cost_counts_every_expert_a_soft_token_ran_on(converted, tmp_path):
    _, folder, text = converted
    costs = {}
    for routing in ("hard", "soft"):
        out = tmp_path / routing
        assert main(["eval", str(folder), "--text", str(text), "--lengths", "64", "--routing", routing,
                     "--max-blocks", "1", "--out", f"{out}.json"]) == 0  # a suffix given is not doubled
        costs[routing] = json.loads((tmp_path / f"{routing}.json").read_text())["results"]["64"]["real_cost"]
    assert costs["soft"] > costs["hard"] and costs["soft"] > 1.0  # every expert ran on every token


def test_eval_overwrite_replaces_its_own_report(converted, tmp_path):
    _, folder, text = converted
    argv = ["eval", str(folder), "--text", str(text), "--lengths", "32", "--max-blocks", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    first = (tmp_path / "r.json").read_text()
    assert main([*argv, "--routing", "full", "--overwrite"]) == 0
    assert (tmp_path / "r.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".r", "r."))) == ["r.json", "r.md"]


def test_eval_card_puts_each_measurement_into_the_model_card_once(converted, tmp_path):
    """--card: the per-length table and the frontier (with its plot) go into the folder's README.md, each
    in its own marked section before "## Usage"; measuring again replaces the section, never doubles it."""
    _, folder, text = converted
    lengths = ["eval", str(folder), "--text", str(text), "--lengths", "32", "--max-blocks", "1", "--card",
               "--out", str(tmp_path / "r")]
    frontier = [*lengths[:-2], "--sweep-threshold", "0.5", "--out", str(tmp_path / "f")]
    for _ in range(2):
        assert main([*lengths, "--overwrite"]) == 0 and main([*frontier, "--overwrite"]) == 0
    card = (folder / "README.md").read_text()
    assert card.count("<!-- ma-convert measurement: eval-text-saved -->") == 1
    assert card.count("<!-- ma-convert measurement: frontier-text -->") == 1
    assert card.index("| length | perplexity |") < card.index("## Usage")
    assert "![frontier](frontier-text.png)" in card and "real cost" in card
    assert (folder / "frontier-text.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_card_refuses_a_card_it_did_not_write_before_measuring(converted, tmp_path, capsys):
    _, folder, text = converted
    (folder / "README.md").write_text("# my own notes\n")
    argv = ["eval", str(folder), "--text", str(text), "--lengths", "32", "--card", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "not a card ma-convert wrote" in capsys.readouterr().err
    assert (folder / "README.md").read_text() == "# my own notes\n" and not (tmp_path / "r.json").exists()
