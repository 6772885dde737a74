"""GPT language model: training reduces loss, likelihood normalizes, model folders round-trip, trainer hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genlab.data.base import DatasetInfo, TextDataset
from genlab.data.tokenizer import train_tokenizer
from genlab.errors import GenlabError
from genlab.models.gpt import GPT, GPTConfig

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40 + "pack my box with five dozen liquor jugs!\n" * 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt(vocab_size: int | None = None, seed: int = 0, std: float = 0.3, **kw) -> GPT:
    """A 2-layer GPT with large random weights (varied outputs); a char tokenizer unless `vocab_size` is given."""
    torch.manual_seed(seed)
    tok = None if vocab_size else train_tokenizer(TEXT, "char")
    cfg = dict(vocab_size=vocab_size or tok.vocab_size, n_layer=2, n_head=4, n_embd=32, block_size=64)
    model = GPT(GPTConfig(**(cfg | kw)), tokenizer=tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return model.eval()


def dataset(text: str = TEXT) -> TextDataset:
    return TextDataset(text, DatasetInfo(name="toy", kind="text", size=len(text), license="", attribution=""))


def test_training_loop_learns_the_text():
    torch.manual_seed(0)
    model = GPT.build(GPTConfig(tokenizer="char", n_layer=2, n_head=2, n_embd=32, block_size=32), dataset())
    data = model.prepare_data(dataset())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(80):
        loss = model.training_losses(data.get_batch(torch.randint(len(data), (16,), generator=g)))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 3.0  # about log(vocab) at the start
    metrics = model.validation_metrics(data)
    assert metrics["val_loss"] < 1.0
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["val_loss"]))


def test_validation_loss_is_the_mean_cross_entropy_over_every_token_once():
    model = tiny_gpt(block_size=16)
    ids = torch.tensor(model.tokenizer.encode(TEXT[:200], bos=True))
    from genlab.models.gpt import TokenBlocks

    data = TokenBlocks(ids, 16)
    n_blocks = (len(ids) - 1) // 16
    with torch.no_grad():
        ref = [F.cross_entropy(model(ids[None, i * 16: i * 16 + 16])[0], ids[i * 16 + 1: i * 16 + 17], reduction="sum")
               for i in range(n_blocks)]
    expected = float(sum(ref)) / (n_blocks * 16)
    assert model.validation_metrics(data)["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_likelihood_sums_to_one_over_all_continuations():
    model = tiny_gpt(vocab_size=5)
    seqs = torch.tensor([[1, a, b, c] for a in range(5) for b in range(5) for c in range(5)])
    with torch.no_grad():
        total = model.log_likelihood(seqs).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_model_folder_round_trip(tmp_path, tie):
    model = tiny_gpt(tie_embeddings=tie, n_kv_head=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = GPT.from_pretrained(tmp_path)
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.tokenizer.encode("fox") == model.tokenizer.encode("fox")
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie


def test_prepare_data_windows_and_user_errors():
    model = tiny_gpt(block_size=8)
    data = model.prepare_data(dataset())
    batch = data.get_batch([0, 5])["input_ids"]
    assert batch.shape == (2, 9)
    assert torch.equal(batch[1, :4], data.ids[5:9])
    with pytest.raises(GenlabError, match="block_size"):
        model.prepare_data(dataset("ab"))
    with pytest.raises(GenlabError, match="divisible"):
        GPT(GPTConfig(vocab_size=10, n_embd=30, n_head=4))


def test_write_preview_writes_text(tmp_path):
    model = tiny_gpt(preview_tokens=12)
    paths = model.write_preview(tmp_path / "step_1", None, torch.Generator().manual_seed(0))
    assert paths[0].suffix == ".txt" and paths[0].read_text().strip()
