"""LoRA on the GPT (Hu et al. 2021): only adapters train, merging is exact (peft's merge_and_unload and the closed
form W0 + (alpha / r) B A as oracles), saved adapters are peft's format and load with peft's own PeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_gpt import TEXT, tiny_gpt

from genlab.errors import GenlabError
from genlab.models.base import GenerativeModel, resolve_model_dir
from genlab.models.gpt import GPT
from genlab.models.lora import add_lora, lora_layers, merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")


class Lora:
    def __init__(self, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0) -> None:
        self.rank, self.alpha, self.dropout = rank, alpha, dropout


def adapted(tmp_path, rank: int = 4, alpha: float = 8.0):
    """A tiny base GPT saved to a folder, loaded back as `init_from`, with adapters whose B is random (B = 0 at
    initialisation would make every check trivial)."""
    base_dir = tiny_gpt().save_pretrained(tmp_path / "base")
    model = GPT.from_pretrained(base_dir)
    model.config.init_from = str(base_dir)
    peft_model = add_lora(model, Lora(rank, alpha))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return base_dir, model.eval(), peft_model


def ids(n: int = 3, t: int = 20) -> torch.Tensor:
    return torch.randint(0, 20, (n, t), generator=torch.Generator().manual_seed(0))


def test_only_the_adapters_train_and_their_count_is_r_times_in_plus_out(tmp_path):
    base_dir, model, _ = adapted(tmp_path, rank=4)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = lora_layers(model)
    assert len(layers) == 4 * model.config.n_layer  # wqkv, wo, w13, w2 of every block
    expected = sum(4 * (m.get_base_layer().in_features + m.get_base_layer().out_features) for _, m in layers)
    assert sum(p.numel() for p in trainable.values()) == expected
    model.train()
    model.training_losses({"input_ids": ids()})["loss"].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(float(p.grad.abs().sum()) > 0 for p in trainable.values())
    opt = model.configure_optimizers(type("T", (), {"weight_decay": 0.0, "lr": 1e-2, "betas": (0.9, 0.99)})())[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)


def test_merged_weights_give_the_adapted_logits_and_match_peft_and_the_closed_form(tmp_path):
    import copy

    base_dir, model, peft_model = adapted(tmp_path, rank=4, alpha=8.0)
    model.double()  # float64: the comparison tests the merge, not float32 rounding of large logits
    x = ids()
    with torch.no_grad():
        adapted_logits = model(x)
        base_logits = GPT.from_pretrained(base_dir).double().eval()(x)
        assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter does something
        name, layer = lora_layers(model)[0]
        w0 = layer.get_base_layer().weight.detach().clone()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        closed_form = w0 + (8.0 / 4) * b @ a
        oracle = copy.deepcopy(peft_model).merge_and_unload()  # peft's own merge
        merged = merge_lora(model)
        assert not lora_layers(merged)
        torch.testing.assert_close(merged.get_submodule(name).weight, closed_form, atol=1e-6, rtol=0)
        for (n, p), (n2, q) in zip(merged.state_dict().items(), oracle.state_dict().items(), strict=True):
            assert n == n2
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
        torch.testing.assert_close(merged(x), adapted_logits, atol=1e-5, rtol=0)


def test_a_trained_adapter_is_peft_format_and_loads_with_peft_genlab_generate_and_export(tmp_path, capsys):
    from peft import PeftModel

    from genlab.cli import main
    from genlab.config import load_run_config
    from genlab.train import Trainer

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    base_dir = tiny_gpt().save_pretrained(tmp_path / "base")
    cfg = load_run_config(None, [
        "family=gpt", f"data.name={text}", f"model.init_from={base_dir}", "adapt.lora.rank=2", "adapt.lora.alpha=4",
        "train.steps=3", "train.batch_size=4", "train.lr=0.05", "train.warmup_steps=0", "train.ema_decay=0",
        "train.log_every=1", "train.ckpt_every=0", f"out_dir={tmp_path}", "name=lora"])
    trainer = Trainer(cfg)
    captured = capsys.readouterr()
    assert "trainable parameters: 2,560 of " in captured.out + captured.err  # 2 (in + out) summed over 8 layers
    out = trainer.fit()
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 2 and meta["lora_alpha"] == 4
    assert meta["base_model_name_or_path"] == str(base_dir.resolve())
    assert all("lora_" in k for k in load_file(out / "adapter_model.safetensors"))

    x = ids()
    ours = GenerativeModel.from_pretrained(resolve_model_dir(tmp_path / "lora")).eval()
    theirs = PeftModel.from_pretrained(GPT.from_pretrained(base_dir), str(out)).eval()
    base = GPT.from_pretrained(base_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
        assert (ours(x) - base(x)).abs().max() > 1e-4  # three steps moved the adapter

    for int8 in ([], ["--int8"]):
        assert main(["generate", str(tmp_path / "lora"), "--prompt", "the", "--max-new-tokens", "8",
                     "--temperature", "0", *int8]) == 0
    merged_dir = tmp_path / "merged"
    assert main(["export", str(out), "--merge", "--out", str(merged_dir)]) == 0
    merged = GPT.from_pretrained(merged_dir).eval()
    assert not lora_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ours(x), atol=1e-5, rtol=1e-5)  # W + BA rounds once
    ppl = {}
    for name, folder in (("adapter", tmp_path / "lora"), ("merged", merged_dir)):
        assert main(["eval", str(folder), "--data", str(text), "--metrics", "nll", "--out",
                     str(tmp_path / f"eval-{name}")]) == 0
        ppl[name] = json.loads((tmp_path / f"eval-{name}" / "eval.json").read_text())["perplexity"]
    assert ppl["adapter"] == pytest.approx(ppl["merged"], rel=1e-5)


@pytest.mark.parametrize(("sets", "message"), [
    (["adapt.lora.rank=4"], "set model.init_from"),
    (["adapt.lora.rank=-1", "model.init_from=BASE"], "adapt.lora.rank"),
    (["adapt.lora.rank=4", "adapt.lora.alpha=0", "model.init_from=BASE"], "adapt.lora.alpha"),
    (["adapt.lora.rank=4", "adapt.lora.dropout=1", "model.init_from=BASE"], "adapt.lora.dropout"),
    (["adapt.lora.rnk=4"], "adapt.lora.rnk"),
])
def test_bad_lora_settings_fail_with_one_line(tmp_path, sets, message):
    from genlab.config import load_run_config
    from genlab.train import Trainer

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    base_dir = tiny_gpt().save_pretrained(tmp_path / "base")
    sets = [s.replace("BASE", str(base_dir)) for s in sets]
    with pytest.raises(GenlabError, match=message):
        Trainer(load_run_config(None, ["family=gpt", f"data.name={text}", "model.tokenizer=char", "model.n_layer=1",
                                       "model.n_head=2", "model.n_embd=16", "model.block_size=32",
                                       f"out_dir={tmp_path}", *sets]))


def test_the_cli_refuses_lora_on_a_recipe_without_init_from_before_loading_data(tmp_path, capsys):
    from genlab.cli import main

    assert main(["train", "configs/fortunes-gpt.yaml", "--set", "adapt.lora.rank=8", "--set",
                 f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set model.init_from" in err[0]
    assert not any(tmp_path.iterdir())


def test_an_adapter_whose_base_is_gone_says_so(tmp_path):
    base_dir, model, peft_model = adapted(tmp_path)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    cfg = tmp_path / "adapter" / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    cfg.write_text(json.dumps(meta | {"base_model_name_or_path": str(tmp_path / "nowhere")}))
    with pytest.raises(GenlabError, match="does not exist"):
        GenerativeModel.from_pretrained(tmp_path / "adapter")
