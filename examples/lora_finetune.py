"""LoRA fine-tuning with peft on a Llama whose frozen base weights are coded over 6 workers; the
adapters train on the master; at the end the adapters are merged and the model saved as a plain Llama.

    python examples/lora_finetune.py               # 40 steps, width 128
    python examples/lora_finetune.py --steps 5 --width 64

``peft.get_peft_model`` wraps ``q_proj`` and ``v_proj`` of a ``transformers.LlamaForCausalLM`` (built
from a config: random weights, nothing downloaded) with rank-8 adapters; ``sazd.parallelize`` then
codes every wide base weight (the adapters' rank-8 matrices are too narrow to gain from coding and
stay on the master, with the norms and embeddings). Only the adapters train (AdamW), on the pystdlib
corpus; the same steps run in plain PyTorch beside it. ``merge_and_unload()`` folds each adapter into
its base weight, which is coded: the merged model must compute what the adapted one did.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import sazd
from sazd.codes import SAZD
from sazd.data.text import load_text
from sazd.runtime.inproc import InProcessCluster


def make_model(width: int, layers: int, block: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=block, bos_token_id=10, eos_token_id=10, pad_token_id=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
          ) -> list[float]:
    losses = []
    for ids in batches:
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def check_sizes(steps: int, width: int, layers: int, block: int, batch: int) -> None:
    """A ValueError naming the first bad size and what it must be."""
    for flag, value, least in (("steps", steps, 1), ("layers", layers, 1), ("block", block, 8),
                               ("batch", batch, 1), ("width", width, 4)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"--{flag} must be an integer >= {least}, got {value!r}")
    if width % 4:
        raise ValueError(f"--width must be a multiple of the 4 attention heads, got {width}")


def main(steps: int = 40, width: int = 128, layers: int = 2, block: int = 64, batch: int = 16) -> dict:
    check_sizes(steps, width, layers, block, batch)
    data = load_text("pystdlib", block_size=block, train_limit=steps * batch)
    batches = [data.train_x[i * batch:(i + 1) * batch] for i in range(steps)]

    plain = make_model(width, layers, block)
    model = copy.deepcopy(plain)
    sazd.parallelize(model, SAZD(n=6, k=4), InProcessCluster(6), scheme="deu")
    losses = train(model, sazd.coded_optimizer(make_optimizer(model)), batches)
    reference = train(plain, make_optimizer(plain), batches)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    probe = data.test_x[:4]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
        merged_model = model.merge_and_unload()  # adapters folded into the coded base weights
        merged = merged_model(input_ids=probe).logits
    merge_error = float((merged - adapted).abs().max())

    with tempfile.TemporaryDirectory() as tmp:
        merged_model.save_pretrained(tmp)
        loaded = LlamaForCausalLM.from_pretrained(tmp).eval()
        with torch.no_grad():
            reload_error = float((loaded(input_ids=probe).logits - adapted).abs().max())
    print(f"{trained} of {total} parameters train (the adapters); "
          f"{len(sazd.parallel.context(merged_model).layers)} base weight matrices coded")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"(plain PyTorch: {reference[0]:.3f} -> {reference[-1]:.3f})")
    print(f"merge_and_unload: logits within {merge_error:.1e} of the adapted model; saved and loaded as a "
          f"plain LlamaForCausalLM: within {reload_error:.1e}")
    return {"losses": losses, "reference": reference, "trained": trained, "total": total,
            "merge_error": merge_error, "reload_error": reload_error}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=128, help="Llama hidden size (4 heads)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--block", type=int, default=64, help="tokens per window")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    try:
        check_sizes(args.steps, args.width, args.layers, args.block, args.batch)
    except ValueError as err:
        parser.error(str(err))
    main(args.steps, args.width, args.layers, args.block, args.batch)
