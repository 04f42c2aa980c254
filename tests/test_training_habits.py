"""A coded Hugging Face model trained the way its users train it: dropout on (the configs' default),
the same seed as the plain run, and transformers' own ``Trainer`` (gradient accumulation, gradient
clipping, ``model.zero_grad()``, ``save_model``). Oracle: the plain model trained the same way, float64."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import sazd
from sazd.codes import get_code
from sazd.parallel import coded_layers
from sazd.runtime.inproc import InProcessCluster

transformers = pytest.importorskip("transformers")

F64 = torch.float64
VOCAB = 96


def gpt2(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(config).to(F64)


def bart(dropout: float = 0.1) -> nn.Module:
    """BART drops out functionally (``F.dropout(x, p=self.dropout)``), no ``nn.Dropout`` module."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        dropout=dropout, activation_dropout=dropout)
    return transformers.BartForConditionalGeneration(config).to(F64)


def coded(model: nn.Module, scheme: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head, left on the master and said
        return sazd.parallelize(model, get_code("sazd", n=6, k=4), InProcessCluster(6), scheme=scheme)


def optimizer(model: nn.Module, scheme: str) -> torch.optim.Optimizer:
    if scheme == "naive":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def tokens(seed: int, rows: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(seed))


def worst_gap(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in pairs)


@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("make", [gpt2, bart], ids=["nn.Dropout", "F.dropout"])
def test_dropout_drops_the_same_elements_as_on_the_plain_model(scheme, make):
    """Dropout draws its mask in memory order: a coded product laid out otherwise than ``F.linear``'s
    would drop other elements under the same seed, and training would part from plain PyTorch's."""
    plain = make()
    model = coded(copy.deepcopy(plain), scheme)
    opts = (optimizer(plain, scheme), sazd.coded_optimizer(optimizer(model, scheme)))
    for step in range(3):
        ids = tokens(step)
        for m, opt in zip((plain, model), opts, strict=True):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    assert worst_gap(model, plain) <= 1e-10


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_transformers_trainer_trains_a_coded_model_as_the_plain_one(scheme, tmp_path):
    data = [{"input_ids": t, "labels": t.clone()} for t in tokens(3, rows=24)]

    def train(model: nn.Module, make: Callable, out: str) -> nn.Module:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=3, max_grad_norm=0.5, report_to=[], save_strategy="no", logging_strategy="no",
            use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizers=(make(optimizer(model, scheme)), None))
        trainer.train()
        trainer.save_model(str(tmp_path / out / "model"))
        return transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / out / "model"), dtype=F64)

    plain = gpt2()
    model = coded(copy.deepcopy(plain), scheme)
    assert len(coded_layers(model)) == 8
    want = train(plain, lambda opt: opt, "plain")
    got = train(model, sazd.coded_optimizer, "coded")
    assert worst_gap(got, want) <= 1e-10  # reloaded plain from the coded run's save_pretrained
    assert worst_gap(got, sazd.parallel.plain_model(model)) == 0.0


def test_the_trainers_own_optimizer_trains_naive_exactly_and_is_refused_under_deu(tmp_path):
    """Given no optimizer, the Trainer makes its default one, fused AdamW, whose kernel writes the
    weights without moving their version counters: naive must still ship every step (it was 7e-5 off,
    without a word). DEU cannot take AdamW: the first step names the fix."""
    data = [{"input_ids": t, "labels": t.clone()} for t in tokens(3, rows=24)]

    def train(model: nn.Module, out: str) -> nn.Module:
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=3, report_to=[],
            save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, data_seed=0,
            dataloader_num_workers=0)
        assert args.optim.value == "adamw_torch_fused"  # transformers' default with this torch
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
        return model

    plain = gpt2(dropout=0.0)
    naive = coded(copy.deepcopy(plain), "naive")
    train(plain, "plain")
    train(naive, "naive")
    assert worst_gap(naive, plain) <= 1e-12
    refused = r"left the coded weights of .* sazd\.coded_optimizer\(torch\.optim\.SGD"
    with pytest.raises(RuntimeError, match=refused):
        train(coded(gpt2(dropout=0.0), "deu"), "deu")


@pytest.mark.parametrize("scheme", ["naive", "deu"])
def test_the_trainer_resumes_a_coded_run_from_its_checkpoint_exactly(scheme, tmp_path):
    """``Trainer.train(resume_from_checkpoint=...)`` reloads the model and ``optimizer.pt``: under DEU
    the momentum lives on the workers, so the saved optimizer state must carry it (decoded) and the
    load must ship it back; 2 + 2 steps then equal 4 uninterrupted plain steps."""
    data = [{"input_ids": t, "labels": t.clone()} for t in tokens(3, rows=24)]

    def args(out: str, steps: int) -> transformers.TrainingArguments:
        return transformers.TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=steps, save_steps=2,
            save_strategy="steps", lr_scheduler_type="constant", report_to=[], logging_strategy="no",
            use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0)

    plain = gpt2(dropout=0.0)
    model = coded(copy.deepcopy(plain), scheme)
    transformers.Trainer(model=plain, args=args("plain", 4), train_dataset=data,
                         optimizers=(optimizer(plain, scheme), None)).train()
    for steps, resume in ((2, None), (4, str(tmp_path / "coded" / "checkpoint-2"))):
        trainer = transformers.Trainer(model=model, args=args("coded", steps), train_dataset=data,
                                       optimizers=(sazd.coded_optimizer(optimizer(model, scheme)), None))
        trainer.train(resume_from_checkpoint=resume)
    assert worst_gap(model, plain) <= 1e-12
