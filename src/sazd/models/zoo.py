"""Third-party models as users bring them, built offline from configs with random weights.

Each entry of ``ZOO`` builds one model and knows how to feed it: a sample batch (a dict of the
model's keyword arguments, labels included), its output scores and its training loss.

- ``gpt2-hf``: ``transformers`` GPT-2 (projections are ``Conv1D``: a Linear with the weight stored
  transposed, (in, out)); its ``lm_head`` is tied to the token embedding.
- ``llama-hf``: ``transformers`` Llama (RMSNorm, rotary positions, gated MLP, untied ``lm_head``).
- ``bert-hf``: ``transformers`` BERT for sequence classification.
- ``vit-hf``: ``transformers`` ViT for image classification (its patch embedding is a Conv2d).
- ``resnet-hf``: ``transformers`` ResNet for image classification (basic blocks of Conv2d).
- ``vit-timm``: a timm-style ViT (``timm`` is not installed): ``patch_embed.proj`` Conv2d, blocks of
  ``attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2`` Linears, ``head``; timm's names and math.
- ``transformer-encoder``: ``nn.TransformerEncoder`` (its attention's ``in_proj_weight`` is a bare
  parameter used through ``F.multi_head_attention_forward``) over token embeddings, mean-pooled.
- ``lora-llama``: a ``peft`` LoRA adapter (r=4 on ``q_proj`` / ``v_proj``) on ``llama-hf``; only the
  adapters train.

Every model is built in float32 from a private seeded generator (the global RNG is untouched) with
dropout off, then cast to ``dtype``; ``build(name, dtype=torch.float64)`` gives the oracle's precision.

Two sizes (``SIZES``): ``"tiny"`` (the default; width 64, 16 tokens, 16x16 images: fast tests) and
``"base"`` (width 512, MLP 2048, 64 tokens, 32x32 images, 2 layers: products large enough that a
training step is compute, as with the widths users bring). ``build(name, size="base")`` and
``entry.batch(8, size="base")`` go together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sazd
from sazd.codes import get_code
from sazd.parallel.schemes import Scheme, get_scheme
from sazd.runtime.inproc import InProcessCluster

VOCAB = 256  # byte tokens, as sazd's text corpora
LABELS = 10

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class Size:
    """The widths a zoo model is built with and the shape of its sample inputs."""

    name: str
    width: int  # hidden width (ResNet: the stem's channels)
    heads: int
    mlp: int  # hidden width of the MLP blocks (Llama: the gated MLP's intermediate size)
    layers: int
    seq: int  # tokens per sample
    image: tuple[int, int, int]  # channels, height, width of the sample images
    patch: int  # ViT patch side
    stages: tuple[int, ...]  # ResNet stage widths (one basic block each)

    @property
    def positions(self) -> int:
        """Position embeddings of the language models: room for generating past the sample windows."""
        return 2 * self.seq


SIZES: dict[str, Size] = {size.name: size for size in (
    Size("tiny", width=64, heads=4, mlp=128, layers=2, seq=16, image=(3, 16, 16), patch=4,
         stages=(64, 128)),
    Size("base", width=512, heads=8, mlp=2048, layers=2, seq=64, image=(3, 32, 32), patch=4,
         stages=(256, 512)),
)}
TINY = SIZES["tiny"]
SEQ, IMAGE = TINY.seq, TINY.image  # the tiny sample batches' shapes


def get_size(size: str | Size) -> Size:
    """The ``Size`` named ``size``; a ValueError listing the sizes when there is none."""
    if isinstance(size, Size):
        return size
    if size not in SIZES:
        raise ValueError(f"size: unknown zoo size {size!r}; choose one of {list(SIZES)}")
    return SIZES[size]


@dataclass(frozen=True)
class ZooModel:
    """One third-party model: how to build it, feed it and score it."""

    name: str
    summary: str
    make: Callable[[Size], nn.Module]  # float32, random weights; called under a seeded RNG
    sample: Callable[[int, torch.Generator, Size], Batch]  # (batch size, generator, size) -> keyword args
    logits: Callable[[nn.Module, Batch], Tensor]
    loss: Callable[[nn.Module, Batch], Tensor]
    causal_lm: bool = False  # a language model with ``generate()``
    pretrained: bool = False  # a transformers model: ``save_pretrained`` / ``from_pretrained``

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32, size: str | Size = "tiny",
              ) -> nn.Module:
        """The model of ``size`` with weights drawn from ``seed``, in ``dtype``, in train mode."""
        widths = get_size(size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make(widths)
        return model.to(dtype).train()  # in place: tied parameters stay one tensor

    def batch(self, batch_size: int = 2, seed: int = 0, dtype: torch.dtype | None = None,
              size: str | Size = "tiny") -> Batch:
        """A sample batch of ``batch_size`` for the model of ``size``; floating inputs (images) cast to
        ``dtype`` when given."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        inputs = self.sample(batch_size, torch.Generator().manual_seed(seed), get_size(size))
        if dtype is None:
            return inputs
        return {key: t.to(dtype) if t.is_floating_point() else t for key, t in inputs.items()}


# ------------------------------------------------------------------ transformers models
def _gpt2(size: Size) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=size.positions, n_embd=size.width, n_layer=size.layers,
                        n_head=size.heads, n_inner=4 * size.width, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _llama(size: Size) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=size.width, intermediate_size=size.mlp,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=size.positions,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _bert(size: Size) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=size.width, num_hidden_layers=size.layers,
                        num_attention_heads=size.heads, intermediate_size=size.mlp,
                        max_position_embeddings=size.positions, num_labels=LABELS, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(config)


def _vit(size: Size) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=size.image[1], patch_size=size.patch, num_channels=size.image[0],
                       hidden_size=size.width, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       intermediate_size=size.mlp, num_labels=LABELS, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def _resnet(size: Size) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=size.image[0], embedding_size=size.stages[0] // 2,
                          hidden_sizes=list(size.stages), depths=[1] * len(size.stages), layer_type="basic",
                          num_labels=LABELS)
    return ResNetForImageClassification(config)


def _lora_llama(size: Size) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_llama(size), config)
    with torch.no_grad():  # peft starts lora_B at zero (no effect); a trained adapter's is not
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.weight"):
                param.normal_(0.0, 0.02)
    return model


def _timm_vit(size: Size) -> nn.Module:
    return TimmViT(size.image, size.patch, size.width, size.layers, size.heads, size.mlp // size.width)


def _encoder(size: Size) -> nn.Module:
    return EncoderClassifier(VOCAB, size.width, size.layers, size.heads, mlp=size.mlp)


# ------------------------------------------------------------------ models written here
class TimmAttention(nn.Module):
    """timm's ``Attention``: one ``qkv`` Linear, scaled dot-product attention, ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, dim)


class TimmViT(nn.Module):
    """timm's ``VisionTransformer`` (class token, learned positions, pre-norm blocks, token pooling)
    with its parameter names, small: 16x16 images, 4x4 patches, width 64, 2 blocks."""

    def __init__(self, image: tuple[int, int, int] = IMAGE, patch: int = 4, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 2, num_classes: int = LABELS) -> None:
        super().__init__()
        patches = (image[1] // patch) * (image[2] // patch)
        self.patch_embed = PatchEmbed(image[0], patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(TimmBlock(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class EncoderClassifier(nn.Module):
    """Token embedding -> ``nn.TransformerEncoder`` (2 layers, width 64, 4 heads, MLP ``mlp``, default
    2 x width) -> mean -> ``head``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, depth: int = 2, heads: int = 4,
                 num_classes: int = LABELS, mlp: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=mlp or 2 * dim, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(input_ids)).mean(dim=1))


# ------------------------------------------------------------------ batches, scores, losses
def _tokens(labels: str) -> Callable[[int, torch.Generator, Size], Batch]:
    """Random token windows; ``labels``: "next" (the tokens themselves, HF shifts them), "class"."""

    def sample(batch_size: int, gen: torch.Generator, size: Size) -> Batch:
        ids = torch.randint(0, VOCAB, (batch_size, size.seq), generator=gen)
        if labels == "next":
            return {"input_ids": ids, "labels": ids.clone()}
        return {"input_ids": ids, "labels": torch.randint(0, LABELS, (batch_size,), generator=gen)}

    return sample


def _images(batch_size: int, gen: torch.Generator, size: Size) -> Batch:
    return {"pixel_values": torch.randn(batch_size, *size.image, generator=gen),
            "labels": torch.randint(0, LABELS, (batch_size,), generator=gen)}


def _hf_logits(model: nn.Module, batch: Batch) -> Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _hf_loss(model: nn.Module, batch: Batch) -> Tensor:
    return model(**batch).loss


def _plain_logits(key: str) -> Callable[[nn.Module, Batch], Tensor]:
    def logits(model: nn.Module, batch: Batch) -> Tensor:
        return model(batch[key])

    return logits


def _plain_loss(key: str) -> Callable[[nn.Module, Batch], Tensor]:
    def loss(model: nn.Module, batch: Batch) -> Tensor:
        return F.cross_entropy(model(batch[key]), batch["labels"])

    return loss


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("gpt2-hf", "transformers GPT2LMHeadModel (Conv1D projections, MLP 4 x width, tied lm_head)",
             _gpt2, _tokens("next"), _hf_logits, _hf_loss, causal_lm=True, pretrained=True),
    ZooModel("llama-hf", "transformers LlamaForCausalLM (RMSNorm, rotary positions, gated MLP)",
             _llama, _tokens("next"), _hf_logits, _hf_loss, causal_lm=True, pretrained=True),
    ZooModel("bert-hf", "transformers BertForSequenceClassification, 10 labels",
             _bert, _tokens("class"), _hf_logits, _hf_loss, pretrained=True),
    ZooModel("vit-hf", "transformers ViTForImageClassification, 4x4 patches",
             _vit, _images, _hf_logits, _hf_loss, pretrained=True),
    ZooModel("resnet-hf", "transformers ResNetForImageClassification, one basic block per stage",
             _resnet, _images, _hf_logits, _hf_loss, pretrained=True),
    ZooModel("vit-timm", "timm-style VisionTransformer (nn.Linear qkv/proj/fc1/fc2)",
             _timm_vit, _images, _plain_logits("pixel_values"), _plain_loss("pixel_values")),
    ZooModel("transformer-encoder", "nn.TransformerEncoder (in_proj_weight)",
             _encoder, _tokens("class"), _plain_logits("input_ids"), _plain_loss("input_ids")),
    ZooModel("lora-llama", "peft LoRA (r=4, q_proj and v_proj) on llama-hf; only the adapters train",
             _lora_llama, _tokens("next"), _hf_logits, _hf_loss, causal_lm=True),
)}
ZOO_MODELS = tuple(ZOO)


def get(name: str) -> ZooModel:
    """The zoo entry ``name``; a ValueError listing the names when there is none."""
    if name not in ZOO:
        raise ValueError(f"model: unknown third-party model {name!r}; choose one of {list(ZOO_MODELS)}")
    return ZOO[name]


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, size: str | Size = "tiny",
          ) -> nn.Module:
    return get(name).build(seed, dtype, size)


# ------------------------------------------------------------------ what is a weight matrix
MATRIX_MODULES = ("Linear", "Conv1D", "Conv1d", "Conv2d", "NonDynamicallyQuantizableLinear")


def weight_matrices(model: nn.Module) -> list[str]:
    """Parameter names of every weight matrix the model multiplies activations by: the ``weight`` of
    each Linear, Conv1D, Conv1d and Conv2d that holds one (subclasses included; a tied weight once per module
    that uses it; peft's LoRA wrapper, which only forwards its base layer's, not again) and each
    ``nn.MultiheadAttention``'s ``in_proj_weight``. Embedding tables are lookups, not listed."""
    names = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            names.append(prefix + "in_proj_weight")
        elif "weight" in module._parameters and any(c.__name__ in MATRIX_MODULES for c in type(module).mro()):
            names.append(prefix + "weight")
    return names


# ------------------------------------------------------------------ the coded step beside the plain one
STEP_PHASES = ("encode_s", "worker_s", "decode_s", "master_other_s")


def step_optimizer(model: nn.Module, scheme: str | Scheme) -> torch.optim.Optimizer:
    """What the tests train with: SGD with momentum where the scheme steps only SGD (DEU), else AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if get_scheme(scheme).sgd_only:
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-3)


def measure_step(name: str, scheme: str = "deu", code: str = "sazd", n: int = 6, k: int = 4,
                 batch_size: int = 8, warmup: int = 2, iterations: int = 10, seed: int = 0,
                 size: str | Size = "tiny") -> dict[str, object]:
    """Zoo model ``name`` of ``size`` coded with the automatic plan on an in-process cluster (the
    workers' products computed one after another, in this process) beside the plain model: coded /
    total weight matrices, the float64 forward's relative error, and the median wall time of a float32
    training step of each (steps interleaved, plain then coded, so load hits both alike), with the coded
    step's phases from the context's counters (worker_s: the workers' products), per step on
    average: they add up to ``coded_mean_s``. ``ratio_best``: the fastest coded step over the fastest
    plain one, the steadier figure on a loaded machine."""
    import copy
    import statistics
    import time
    import warnings


    entry = get(name)
    widths = get_size(size)

    def parallelize(model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():  # what stays on the master is reported from the context
            warnings.simplefilter("ignore", UserWarning)
            return sazd.parallelize(model, get_code(code, n=n, k=k), InProcessCluster(n), scheme=scheme)

    plain64 = entry.build(seed, torch.float64, widths)
    coded64 = parallelize(copy.deepcopy(plain64))
    probe = entry.batch(batch_size, seed, torch.float64, widths)
    with torch.no_grad():
        ref = entry.logits(plain64, probe)
        error = float((entry.logits(coded64, probe) - ref).abs().max() / ref.abs().max())
    ctx64 = sazd.parallel.context(coded64)

    plain = entry.build(seed, size=widths)
    model = parallelize(copy.deepcopy(plain))
    optimizers = {id(plain): step_optimizer(plain, scheme),
                  id(model): sazd.coded_optimizer(step_optimizer(model, scheme))}
    stats = sazd.parallel.context(model).stats

    def step(m: nn.Module, batch: Batch) -> float:
        start = time.perf_counter()
        optimizers[id(m)].zero_grad()
        entry.loss(m, batch).backward()
        optimizers[id(m)].step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "coded": []}
    phases = {p: 0.0 for p in STEP_PHASES}
    for i in range(warmup + iterations):
        batch = entry.batch(batch_size, seed=seed + 1 + i, size=widths)
        plain_s = step(plain, batch)
        before = stats.snapshot()
        coded_s = step(model, batch)
        after = stats.snapshot()
        if i < warmup:
            continue
        times["plain"].append(plain_s)
        times["coded"].append(coded_s)
        for p in ("encode_s", "worker_s", "decode_s"):
            phases[p] += (after[p] - before[p]) / iterations
        phases["master_other_s"] += (coded_s - sum(after[p] - before[p] for p in ("encode_s", "worker_s",
                                                                                  "decode_s"))) / iterations
    plain_s, coded_s = statistics.median(times["plain"]), statistics.median(times["coded"])
    return {"model": name, "size": widths.name, "scheme": scheme, "code": code, "n": n, "k": k,
            "batch_size": batch_size,
            "coded": len(ctx64.layers), "total": len(weight_matrices(plain64)),
            "left_on_master": dict(ctx64.left_on_master), "float64_error": error,
            "plain_step_s": plain_s, "coded_step_s": coded_s, "ratio": coded_s / plain_s,
            "plain_best_s": min(times["plain"]), "coded_best_s": min(times["coded"]),
            "ratio_best": min(times["coded"]) / min(times["plain"]),
            "coded_mean_s": statistics.fmean(times["coded"]), "phases_s": phases, "iterations": iterations}


__all__ = ["SIZES", "STEP_PHASES", "ZOO", "ZOO_MODELS", "EncoderClassifier", "Size", "TimmViT", "ZooModel",
           "build", "get", "get_size", "measure_step", "step_optimizer", "weight_matrices"]
