"""Fine-tune a Hugging Face GPT-2 with its projections coded over 6 workers, save it with
``save_pretrained`` and load it back into the plain class.

    python examples/hf_finetune.py                 # 60 steps, width 128, 2 layers
    python examples/hf_finetune.py --steps 5 --width 64 --out /tmp/gpt2-coded

The model is ``transformers.GPT2LMHeadModel`` built from a config (random weights, nothing is
downloaded), the data the pystdlib corpus of ``sazd.data`` (the Python standard library's sources as
bytes: vocabulary 256). ``sazd.parallelize`` codes every wide projection (GPT-2's ``Conv1D`` layers:
their weight stays the module's ``weight``, stored (in, out) as GPT-2 keeps it); SAZD(6, 4) means any
4 of the 6 workers' answers decode. The same steps run in plain PyTorch beside it, and at the end the
saved directory is loaded with ``GPT2LMHeadModel.from_pretrained``: the same logits, the same greedy
``generate()`` tokens.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import sazd
from sazd.codes import SAZD
from sazd.data.text import load_text
from sazd.runtime.inproc import InProcessCluster


def make_model(width: int, layers: int, block: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=block, n_embd=width, n_layer=layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=10, eos_token_id=10)
    return GPT2LMHeadModel(config)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
          ) -> list[float]:
    losses = []
    for ids in batches:
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss  # GPT-2 shifts the labels itself
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


def main(steps: int = 60, width: int = 128, layers: int = 2, block: int = 64, batch: int = 16,
         out: str | Path | None = None) -> dict:
    check_sizes(steps, width, layers, block, batch)
    data = load_text("pystdlib", block_size=block, train_limit=steps * batch)
    batches = [data.train_x[i * batch:(i + 1) * batch] for i in range(steps)]

    plain = make_model(width, layers, block)
    model = copy.deepcopy(plain)
    sazd.parallelize(model, SAZD(n=6, k=4), InProcessCluster(6), scheme="deu")
    losses = train(model, sazd.coded_optimizer(make_optimizer(model)), batches)
    reference = train(plain, make_optimizer(plain), batches)  # the same steps, plain PyTorch
    coded_state, plain_state = model.state_dict(), plain.state_dict()
    weight_error = max(float((coded_state[k] - v).abs().max() / v.abs().max().clamp_min(1e-2))
                       for k, v in plain_state.items())

    with tempfile.TemporaryDirectory() as tmp:
        where = Path(out) if out is not None else Path(tmp)
        model.save_pretrained(where)
        loaded = GPT2LMHeadModel.from_pretrained(where)
    model.eval()
    loaded.eval()
    probe = data.test_x[:4]
    with torch.no_grad():
        reload_error = float((loaded(probe).logits - model(probe).logits).abs().max())
        prompt = probe[:, : block // 4]
        new_tokens = block // 2  # prompt + new tokens fit GPT-2's n_positions = block
        tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        reloaded = loaded.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    coded_names = sorted(sazd.parallel.context(model).layers)
    print(f"coded {len(coded_names)} weight matrices, e.g. {coded_names[:2]}")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (plain PyTorch: {reference[0]:.3f} -> "
          f"{reference[-1]:.3f}); weights vs plain: {weight_error:.1e}")
    print(f"from_pretrained of the saved model: logits within {reload_error:.1e}, generate() "
          f"{'the same' if torch.equal(tokens, reloaded) else 'DIFFERENT'} tokens: "
          f"{bytes(tokens[0, block // 4:].tolist())!r}")
    return {"losses": losses, "reference": reference, "weight_error": weight_error, "coded": coded_names,
            "reload_error": reload_error, "same_tokens": torch.equal(tokens, reloaded)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=128, help="GPT-2 n_embd (4 heads)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--block", type=int, default=64, help="tokens per window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="keep the saved model here")
    args = parser.parse_args()
    try:
        check_sizes(args.steps, args.width, args.layers, args.block, args.batch)
    except ValueError as err:
        parser.error(str(err))
    main(args.steps, args.width, args.layers, args.block, args.batch, args.out)
