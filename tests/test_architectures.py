"""More transformers architectures than the zoo's, each as users build it (a config, random weights),
coded by the automatic plan: 3 training steps equal plain PyTorch in float64 under both schemes
(naive with AdamW, DEU with SGD momentum), the same parameter names and ``state_dict`` keys, and a
true reason for every weight left on the master. Dropout is off on both sides (its masks would
differ); the loss is computed here in float64 (some models' own losses cast logits to float32)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn
from torch.nn.utils import parametrize

import sazd
from sazd.codes import get_code
from sazd.parallel import context
from sazd.runtime.inproc import InProcessCluster

F64 = torch.float64
V, H, L, NH, I = 128, 64, 2, 4, 128
TOKENS = dict(vocab_size=V)
BERTLIKE = dict(TOKENS, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=I)

# name: (config class, model class, input kind, config) -- tiny, in each config's own vocabulary
ARCHITECTURES = {
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", "tokens",
                dict(TOKENS, hidden_size=H, num_layers=L, num_heads=NH, intermediate_size=I,
                     attention_types=[[["global", "local"], 1]], max_position_embeddings=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "tokens",
                 BERTLIKE),
    "opt": ("OPTConfig", "OPTForCausalLM", "tokens",
            dict(TOKENS, hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, ffn_dim=I,
                 word_embed_proj_dim=H, max_position_embeddings=64)),
    "bloom": ("BloomConfig", "BloomForCausalLM", "tokens", dict(TOKENS, hidden_size=H, n_layer=L, n_head=NH)),
    "phi": ("PhiConfig", "PhiForCausalLM", "tokens",
            BERTLIKE),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", "tokens",
             dict(TOKENS, n_embd=H, n_layer=L, n_head=NH, rotary_dim=8, n_positions=64)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "tokens",
                    dict(TOKENS, n_embd=H, n_layer=L, n_head=NH, n_positions=64)),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", "tokens",
                BERTLIKE),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", "tokens",
                   dict(TOKENS, dim=H, n_layers=L, n_heads=NH, hidden_dim=I)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", "tokens",
                   BERTLIKE),
    "t5": ("T5Config", "T5ForConditionalGeneration", "seq2seq",
           dict(TOKENS, d_model=H, d_kv=16, d_ff=I, num_layers=L, num_heads=NH, decoder_start_token_id=0)),
    "bart": ("BartConfig", "BartForConditionalGeneration", "seq2seq",
             dict(TOKENS, d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=NH,
                  decoder_attention_heads=NH, encoder_ffn_dim=I, decoder_ffn_dim=I,
                  max_position_embeddings=64)),
    "swin": ("SwinConfig", "SwinForImageClassification", "images",
             dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4,
                  num_labels=10)),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", "images",
                 dict(num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], num_labels=10, image_size=32)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration", "audio",  # its encoder opens with Conv1d
                dict(TOKENS, num_mel_bins=80, d_model=H, encoder_layers=L, decoder_layers=L,
                     encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=I,
                     decoder_ffn_dim=I, max_source_positions=16, max_target_positions=32,
                     decoder_start_token_id=0, pad_token_id=0)),
    # float32 norms inside a float64 model (RMSNorm on q and k, Cohere's LayerNorm): they sum in the
    # products' memory order, which must be F.linear's
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "tokens",
              dict(BERTLIKE, num_key_value_heads=2, max_position_embeddings=64)),
    "cohere": ("CohereConfig", "CohereForCausalLM", "tokens",
               dict(BERTLIKE, num_key_value_heads=2, max_position_embeddings=64)),
    "fsmt": ("FSMTConfig", "FSMTForConditionalGeneration", "seq2seq",  # views its time-major projections
             dict(langs=["en", "de"], src_vocab_size=V, tgt_vocab_size=V, d_model=H, encoder_layers=L,
                  decoder_layers=L, encoder_attention_heads=NH, decoder_attention_heads=NH, encoder_ffn_dim=I,
                  decoder_ffn_dim=I, max_position_embeddings=64, pad_token_id=1, decoder_start_token_id=2)),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC", "wave",  # convolutions; a weight-normed position conv
                 dict(BERTLIKE, conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                      num_feat_extract_layers=2, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                      mask_time_prob=0.0)),  # SpecAugment's masks come from numpy's generator
}


def build(name: str) -> tuple[nn.Module, str]:
    config_class, model_class, kind, kw = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**kw)
    for attr, value in list(vars(config).items()):  # dropout (and LayerDrop) off: the two draw apart
        random = "dropout" in attr or "pdrop" in attr or attr in ("drop_path_rate", "layerdrop")
        if isinstance(value, float) and random:
            setattr(config, attr, 0.0)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).to(F64), kind


def batch(kind: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "images":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen, dtype=F64),
                "labels": torch.randint(0, 10, (2,), generator=gen)}
    if kind == "wave":  # 400 samples: 39 frames after the two strided convolutions
        return {"input_values": torch.randn(2, 400, generator=gen, dtype=F64),
                "labels": torch.randint(0, V, (2, 39), generator=gen)}
    ids = torch.randint(0, V, (2, 12), generator=gen)
    if kind == "audio":  # 80 mel bins x 32 frames (twice the encoder's 16 positions)
        features = torch.randn(2, 80, 32, generator=gen, dtype=F64)
        return {"input_features": features, "decoder_input_ids": ids, "labels": ids}
    extra = {"decoder_input_ids": ids} if kind == "seq2seq" else {}
    return {"input_ids": ids, "labels": ids, **extra}


def loss_and_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = inputs["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)), logits


@pytest.mark.parametrize("scheme", ["naive", "deu"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_trains_exactly_as_plain(name, scheme):
    plain, kind = build(name)
    model = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # what stays on the master: checked below
        sazd.parallelize(model, get_code("sazd", n=6, k=4), InProcessCluster(6), scheme=scheme,
                         min_features=32)
    ctx = context(model)
    assert len(ctx.layers) >= 6
    if name == "whisper":
        assert {"model.encoder.conv1", "model.encoder.conv2"} <= set(ctx.layers)  # Conv1d, coded
    for module, why in ctx.left_on_master.items():  # every reason is one the plan gives, and true
        held = dict(model.named_modules())[module]
        if why.startswith("narrower"):
            matrices = [p for p in held.parameters(recurse=False) if p.dim() >= 2]
            assert min(min(p.shape[0], p[0].numel()) for p in matrices) < 32
        elif why.startswith("its weight is tied"):
            assert held.weight is not None and any(
                held.weight is m.weight for m in model.modules() if isinstance(m, nn.Embedding))
        elif why.startswith("its weight is computed by a parametrization"):
            assert parametrize.is_parametrized(held, "weight") and "remove_parametrizations" in why
        else:
            assert why.startswith("it is a grouped Conv") and held.groups > 1, (module, why)
    if name == "wav2vec2":  # weight-normed, and grouped: the reason that a fix of the other cannot cure
        assert ctx.left_on_master["wav2vec2.encoder.pos_conv_embed.conv"].startswith("it is a grouped Conv1d")
        assert not any(module.endswith("parametrizations.weight") for module in ctx.left_on_master)

    if scheme == "naive":
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, model)]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, model)]
    opts[1] = sazd.coded_optimizer(opts[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no use of a coded weight falls back to the master
        for step in range(3):
            inputs = batch(kind, step + 1)
            outs = []
            for m, opt in zip((plain, model), opts, strict=True):
                opt.zero_grad()
                loss, logits = loss_and_logits(m, inputs)
                loss.backward()
                opt.step()
                outs.append(logits.detach())
            assert (outs[1] - outs[0]).abs().max() <= 1e-10 * outs[0].abs().max(), step
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    got, want = model.state_dict(), plain.state_dict()
    assert list(got) == list(want)
    worst = max(float((got[k] - v).abs().max()) / max(1.0, float(v.abs().max())) for k, v in want.items())
    assert worst <= 1e-10
