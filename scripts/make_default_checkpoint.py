"""Build checkpoints/tiny-arith: the tiny default model that jaxtp ships with.

Why: the engine needs a real Hugging Face Llama checkpoint that is small enough
to commit (< 4 MB), loads offline, exercises GQA and tensor parallelism up to 8
(8 query heads, 4 KV heads, vocab 16), and whose outputs can be *checked by a
program* rather than eyeballed. So we train a tiny LlamaForCausalLM, from
scratch with torch on CPU, to add integers:

    prompt  "<s>17+305="   ->   greedy continuation "322</s>"

Operands are 0..999 (sums 0..1998), written in normal decimal, no leading
zeros. The tokenizer is character level: <pad> <s> </s> <unk> 0-9 + = .
Loss is taken only on the answer digits and EOS. A held-out set of problems
(never drawn during training) is scored with greedy `model.generate` at the end
and the accuracy is written into the model card.

Deterministic (fixed seeds, 2 threads); about 6-7 minutes on 2 idle CPU cores:

    python3 scripts/make_default_checkpoint.py
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = SPECIALS + list("0123456789+=")  # 16 tokens: divisible by 8
PAD, BOS, EOS = 0, 1, 2
MAX_OPERAND = 999
MAX_LEN = 1 + 3 + 1 + 3 + 1 + 4 + 1  # <s>999+999=1998</s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' and loop.last %}"
    "{{ m['content'] }}{% endif %}{% endfor %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()  # join pieces without spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=64,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, dtype="float32",
    )


def encode(a: int, b: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt "<s>a+b=" and of the answer "c</s>"."""
    ids = lambda s: [VOCAB.index(ch) for ch in s]
    return [BOS] + ids(f"{a}+{b}="), ids(str(a + b)) + [EOS]


def sample_operands(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mostly uniform 0..999, with extra 1- and 2-digit operands so short numbers get coverage."""
    scale = rng.choice([10, 100, 1000], p=[0.1, 0.15, 0.75], size=n)
    return (rng.random(n) * scale).astype(np.int64)


def make_batch(rng, batch_size, held_out):
    x = torch.full((batch_size, MAX_LEN), PAD)
    y = torch.full((batch_size, MAX_LEN), -100)  # HF shifts labels internally
    i = 0
    while i < batch_size:
        for a, b in zip(sample_operands(rng, batch_size), sample_operands(rng, batch_size)):
            if i == batch_size:
                break
            if (a, b) in held_out:
                continue
            p, ans = encode(int(a), int(b))
            x[i, : len(p) + len(ans)] = torch.tensor(p + ans)
            y[i, len(p) : len(p) + len(ans)] = torch.tensor(ans)
            i += 1
    return x, y


@torch.no_grad()
def evaluate(model, tok, problems):
    """Greedy-decode every problem with model.generate; batches group equal prompt lengths (no padding)."""
    model.eval()
    by_len: dict[int, list] = {}
    for a, b in problems:
        by_len.setdefault(len(f"{a}+{b}="), []).append((a, b))
    correct, examples = 0, []
    for group in by_len.values():
        enc = tok([f"{a}+{b}=" for a, b in group], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (a, b), text, row in zip(group, texts, out):
            ok = text == str(a + b) and EOS in row.tolist()
            correct += ok
            if len(examples) < 8 or not ok and len(examples) < 16:
                examples.append(f"{a}+{b}= -> {text!r} {'ok' if ok else 'WRONG'}")
    model.train()
    return correct / len(problems), examples


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="checkpoints/tiny-arith")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-size", type=int, default=1000)
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)

    eval_rng = np.random.default_rng(args.seed + 1)
    held_out = set()
    while len(held_out) < args.eval_size:
        held_out.add(tuple(int(v) for v in eval_rng.integers(0, MAX_OPERAND + 1, size=2)))
    held_out_list = sorted(held_out)

    tok = make_tokenizer()
    config = make_config()
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )

    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        x, y = make_batch(rng, args.batch_size, held_out)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.1f}s", flush=True)
    train_s = time.time() - t0

    acc, examples = evaluate(model, tok, held_out_list)
    print(f"held-out accuracy: {acc:.2%} on {len(held_out_list)} problems  (training {train_s:.0f}s)")
    print("\n".join(examples))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False).save_pretrained(out)
    tok.save_pretrained(out, save_jinja_files=False)  # keep chat_template inside tokenizer_config.json
    cmd = "python3 scripts/make_default_checkpoint.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != ap.get_default(k)
    )
    cfg = {k: getattr(config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")}
    (out / "README.md").write_text(f"""# tiny-arith

jaxtp's embedded default model: a tiny `LlamaForCausalLM` ({n_params:,} parameters, float32
safetensors) trained from scratch to add integers, so engine output can be checked by a program.

- **Task:** `a+b=` -> `c` then EOS, operands 0..{MAX_OPERAND} in normal decimal (no leading zeros).
  Example: prompt `17+305=` (tokenized as `<s> 1 7 + 3 0 5 =`) -> `322</s>`.
- **Tokenizer:** character level, vocab {len(VOCAB)}: `{" ".join(VOCAB)}`. Encoding prepends `<s>`;
  decoding joins characters without spaces. The chat template renders `<s>` + the last user message.
- **Held-out accuracy:** {acc:.2%} exact-match with greedy `model.generate` on {len(held_out_list)}
  uniformly random problems never seen in training.
- **Made by:** `{cmd}` (torch on CPU, 2 threads, {args.steps} steps x {args.batch_size} sequences,
  AdamW lr {args.lr} with warmup + cosine, loss on answer tokens only; ~6-7 min on 2 idle cores).
- **Config:** `{json.dumps(cfg)}`
""")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
