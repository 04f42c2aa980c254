"""Third-party models as users bring them, built offline from configs with random weights, small.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 256  # byte tokens, as sazd's text corpora
SEQ = 16  # tokens per sample in the sample batches
IMAGE = (3, 16, 16)  # channels, height, width of the sample images
LABELS = 10

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class ZooModel:
    """One third-party model: how to build it, feed it and score it."""

    name: str
    summary: str
    make: Callable[[], nn.Module]  # float32, random weights; called under a seeded RNG
    sample: Callable[[int, torch.Generator], Batch]  # (batch size, generator) -> keyword arguments
    logits: Callable[[nn.Module, Batch], Tensor]
    loss: Callable[[nn.Module, Batch], Tensor]
    causal_lm: bool = False  # a language model with ``generate()``
    pretrained: bool = False  # a transformers model: ``save_pretrained`` / ``from_pretrained``

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with weights drawn from ``seed``, in ``dtype``, in train mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make()
        return model.to(dtype).train()  # in place: tied parameters stay one tensor

    def batch(self, batch_size: int = 2, seed: int = 0, dtype: torch.dtype | None = None) -> Batch:
        """A sample batch of ``batch_size``; floating inputs (images) cast to ``dtype`` when given."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        inputs = self.sample(batch_size, torch.Generator().manual_seed(seed))
        if dtype is None:
            return inputs
        return {key: t.to(dtype) if t.is_floating_point() else t for key, t in inputs.items()}


# ------------------------------------------------------------------ transformers models
def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=LABELS,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return BertForSequenceClassification(config)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=IMAGE[1], patch_size=4, num_channels=IMAGE[0], hidden_size=64,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=LABELS,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def _resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=IMAGE[0], embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1],
                          layer_type="basic", num_labels=LABELS)
    return ResNetForImageClassification(config)


def _lora_llama() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_llama(), config)
    with torch.no_grad():  # peft starts lora_B at zero (no effect); a trained adapter's is not
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.weight"):
                param.normal_(0.0, 0.02)
    return model


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
    """Token embedding -> ``nn.TransformerEncoder`` (2 layers, width 64, 4 heads) -> mean -> ``head``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, depth: int = 2, heads: int = 4,
                 num_classes: int = LABELS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(input_ids)).mean(dim=1))


# ------------------------------------------------------------------ batches, scores, losses
def _tokens(labels: str) -> Callable[[int, torch.Generator], Batch]:
    """Random token windows; ``labels``: "next" (the tokens themselves, HF shifts them), "class"."""

    def sample(batch_size: int, gen: torch.Generator) -> Batch:
        ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=gen)
        if labels == "next":
            return {"input_ids": ids, "labels": ids.clone()}
        return {"input_ids": ids, "labels": torch.randint(0, LABELS, (batch_size,), generator=gen)}

    return sample


def _images(batch_size: int, gen: torch.Generator) -> Batch:
    return {"pixel_values": torch.randn(batch_size, *IMAGE, generator=gen),
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
    ZooModel("gpt2-hf", "transformers GPT2LMHeadModel, 2 layers, width 64 (Conv1D projections, tied lm_head)",
             _gpt2, _tokens("next"), _hf_logits, _hf_loss, causal_lm=True, pretrained=True),
    ZooModel("llama-hf", "transformers LlamaForCausalLM, 2 layers, width 64, MLP 128",
             _llama, _tokens("next"), _hf_logits, _hf_loss, causal_lm=True, pretrained=True),
    ZooModel("bert-hf", "transformers BertForSequenceClassification, 2 layers, width 64, 10 labels",
             _bert, _tokens("class"), _hf_logits, _hf_loss, pretrained=True),
    ZooModel("vit-hf", "transformers ViTForImageClassification, 16x16 images, 4x4 patches, width 64",
             _vit, _images, _hf_logits, _hf_loss, pretrained=True),
    ZooModel("resnet-hf", "transformers ResNetForImageClassification, basic blocks 64, 128",
             _resnet, _images, _hf_logits, _hf_loss, pretrained=True),
    ZooModel("vit-timm", "timm-style VisionTransformer (nn.Linear qkv/proj/fc1/fc2), width 64",
             TimmViT, _images, _plain_logits("pixel_values"), _plain_loss("pixel_values")),
    ZooModel("transformer-encoder", "nn.TransformerEncoder, 2 layers, width 64 (in_proj_weight)",
             EncoderClassifier, _tokens("class"), _plain_logits("input_ids"), _plain_loss("input_ids")),
    ZooModel("lora-llama", "peft LoRA (r=4, q_proj and v_proj) on llama-hf; only the adapters train",
             _lora_llama, _tokens("next"), _hf_logits, _hf_loss, causal_lm=True),
)}
ZOO_MODELS = tuple(ZOO)


def get(name: str) -> ZooModel:
    """The zoo entry ``name``; a ValueError listing the names when there is none."""
    if name not in ZOO:
        raise ValueError(f"model: unknown third-party model {name!r}; choose one of {list(ZOO_MODELS)}")
    return ZOO[name]


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    return get(name).build(seed, dtype)


# ------------------------------------------------------------------ what is a weight matrix
MATRIX_MODULES = ("Linear", "Conv1D", "Conv2d", "NonDynamicallyQuantizableLinear")


def weight_matrices(model: nn.Module) -> list[str]:
    """Parameter names of every weight matrix the model multiplies activations by: the ``weight`` of
    each Linear, Conv1D and Conv2d that holds one (subclasses included; a tied weight once per module
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


def trainable_fraction(model: nn.Module) -> float:
    """Share of the parameters (each tensor once) that train."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / max(1, sum(p.numel() for p in params))


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


__all__ = ["ZOO", "ZOO_MODELS", "EncoderClassifier", "TimmViT", "ZooModel", "build", "get",
           "param_bytes", "trainable_fraction", "weight_matrices"]
