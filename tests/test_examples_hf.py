"""The Hugging Face examples (examples/hf_finetune.py, examples/lora_finetune.py) run, quick and
small, and do what they say: coded training equals plain PyTorch's, and what is saved with
``save_pretrained`` loads into the plain class and computes the same."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the examples need transformers (requirements.lock)")
pytest.importorskip("peft", reason="the LoRA example needs peft (requirements.lock)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, **kwargs):
    return runpy.run_path(str(EXAMPLES / name), run_name="__test__")["main"](**kwargs)


def test_hf_finetune_trains_gpt2_coded_and_reloads_it_plain(tmp_path):
    result = run_example("hf_finetune.py", steps=6, width=64, layers=1, block=32, batch=8, out=tmp_path)
    assert "transformer.h.0.attn.c_attn" in {name.removesuffix(".weight") for name in result["coded"]}
    assert result["losses"][-1] < result["losses"][0]
    assert max(abs(a - b) for a, b in zip(result["losses"], result["reference"], strict=True)) <= 1e-4
    assert result["weight_error"] <= 1e-4  # float32, 6 steps
    assert result["reload_error"] <= 1e-5
    assert result["same_tokens"]
    assert (tmp_path / "config.json").is_file() and any(tmp_path.glob("*.safetensors"))


def test_lora_finetune_trains_adapters_on_a_coded_llama_and_merges():
    result = run_example("lora_finetune.py", steps=4, width=64, layers=1, block=32, batch=8)
    assert result["trained"] < result["total"] / 3  # only the adapters train
    assert result["losses"][-1] < result["losses"][0]
    assert max(abs(a - b) for a, b in zip(result["losses"], result["reference"], strict=True)) <= 1e-4
    assert result["merge_error"] <= 1e-4, "merge_and_unload changed what the model computes"
    assert result["reload_error"] <= 1e-4


@pytest.mark.parametrize("example", ["hf_finetune.py", "lora_finetune.py"])
@pytest.mark.parametrize(("sizes", "flag"), [
    ({"steps": 0}, "--steps"),
    ({"width": 30}, "--width"),
    ({"block": 2}, "--block"),
])
def test_examples_refuse_bad_sizes_by_flag(example, sizes, flag):
    with pytest.raises(ValueError, match=flag):
        run_example(example, **sizes)

