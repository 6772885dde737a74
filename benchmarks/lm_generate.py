"""Generation speed: genlab vs transformers' `generate` on the same exported weights; int8; speculative decoding.

    python benchmarks/lm_generate.py [--model runs/fortunes-gpt/model] [--draft runs/fortunes-draft/model]

Without --model, a randomly initialised 12M-parameter GPT (BPE 4096, 6 x 384) is measured. Greedy decoding of
exactly --new-tokens tokens at batch 1 and 8; each figure is the best of --repeats runs, genlab and transformers
alternating. Prints one JSON line: tokens/s, the ratios genlab / transformers, int8's speed and perplexity,
and (with --draft) speculative decoding's speedup and acceptance rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genlab.data import load_dataset  # noqa: E402
from genlab.data.tokenizer import train_tokenizer  # noqa: E402
from genlab.models.gpt import GPT, GPTConfig  # noqa: E402
from genlab.models.hf_export import export_hf  # noqa: E402
from genlab.nn.quant import quantize_int8  # noqa: E402
from genlab.sampling.speculative import speculative_generate  # noqa: E402
from genlab.sampling.text import GenerationConfig, generate  # noqa: E402


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def perplexity(model: GPT, text: str, block: int, max_blocks: int) -> float:
    """exp(mean next-token loss) over non-overlapping blocks of `text` (the test split)."""
    data = model.prepare_data(type("T", (), {"text": text})())
    total, count = 0.0, 0
    with torch.inference_mode():
        for i, batch in enumerate(data.iter_eval_batches(8)):
            if i * 8 >= max_blocks:
                break
            ids = batch["input_ids"]
            logits = model(ids[:, :-1]).float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(),
                                                             reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GPT model folder (default: random 12M-parameter GPT)")
    ap.add_argument("--draft", default=None, help="a smaller GPT with the same tokenizer (speculative decoding)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    ap.add_argument("--gamma", type=int, default=4)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM

    test_text = load_dataset("fortunes", split="test").text
    if args.model:
        model = GPT.from_pretrained(args.model).eval()
    else:
        torch.manual_seed(0)
        tok = train_tokenizer(load_dataset("fortunes").text, "bpe", 4096)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=6, n_head=6, n_embd=384, block_size=512), tok).eval()
    tok = model.tokenizer
    n_params = sum(p.numel() for p in model.parameters())
    hf_dir = Path(tempfile.mkdtemp(prefix="lm-bench-")) / "hf"
    export_hf(model, hf_dir)
    hf = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    new = args.new_tokens
    cfg = GenerationConfig(max_new_tokens=new, temperature=0, stop_token_ids=[])
    prompt = tok.encode("Q: What is the meaning of life?\nA:", bos=True)
    result: dict = {"benchmark": "lm_generate", "params_M": round(n_params / 1e6, 2), "new_tokens": new,
                    "threads": torch.get_num_threads()}

    def ours(m: GPT, b: int) -> None:
        out = generate(m, [prompt] * b, cfg)
        assert all(len(t) == new for t in out.tokens)

    def theirs(b: int) -> None:
        x = torch.tensor([prompt] * b)
        with torch.inference_mode():
            out = hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_id)
        assert out.shape[1] == len(prompt) + new

    same = generate(model, [prompt], GenerationConfig(max_new_tokens=32, temperature=0, stop_token_ids=[])).tokens[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    result["greedy_tokens_equal_transformers"] = same == ref
    for b in (1, 8):
        ours(model, b)  # warm up
        theirs(b)
        t_ours, t_hf = [], []
        for _ in range(args.repeats):
            t_ours.append(best_time(lambda: ours(model, b), 1))  # noqa: B023
            t_hf.append(best_time(lambda: theirs(b), 1))  # noqa: B023
        result[f"genlab_tok_s_b{b}"] = round(b * new / min(t_ours), 1)
        result[f"transformers_tok_s_b{b}"] = round(b * new / min(t_hf), 1)
        result[f"ratio_b{b}"] = round(min(t_hf) / min(t_ours), 2)

    q = quantize_int8(copy.deepcopy(model))
    ours(q, 1)
    result["int8_tok_s_b1"] = round(new / best_time(lambda: ours(q, 1), args.repeats), 1)
    result["int8_speedup_b1"] = round(result["int8_tok_s_b1"] / result["genlab_tok_s_b1"], 2)
    block = model.config.block_size
    result["ppl_fp32"] = round(perplexity(model, test_text, block, 64), 3)
    result["ppl_int8"] = round(perplexity(q, test_text, block, 64), 3)

    if args.draft:
        draft = GPT.from_pretrained(args.draft).eval()
        for name, temp in (("greedy", 0.0), ("t0.8", 0.8)):
            scfg = GenerationConfig(max_new_tokens=new, temperature=temp, stop_token_ids=[], seed=0)
            plain = best_time(lambda: generate(model, [prompt], scfg), args.repeats)  # noqa: B023
            outs = []
            spec = best_time(lambda: outs.append(speculative_generate(model, draft, prompt, scfg,  # noqa: B023
                                                                      gamma=args.gamma)), args.repeats)
            result[f"speculative_{name}_speedup"] = round(plain / spec, 2)
            result[f"speculative_{name}_acceptance"] = round(outs[-1].acceptance_rate, 3)
        result["draft_params_M"] = round(sum(p.numel() for p in draft.parameters()) / 1e6, 2)
        result["gamma"] = args.gamma
    print(json.dumps(result))


if __name__ == "__main__":
    main()
