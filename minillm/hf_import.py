"""A transformers folder (Llama, Qwen3, GPT-2 with a sentencepiece tokenizer) as a fine-tuning source.

    is_hf_folder(path)      whether ``path`` is a transformers model folder (config.json with model_type)
    load_hf_source(path)    {"model": minillm state dict, "tokenizer": Tokenizer, "model_config": dict,
                             "step": int, "where": Path}, the shape minillm.init_from.load_source returns
                             (step: the exported checkpoint's, 0 for a folder minillm did not write)

The ModelConfig is built from config.json by minillm/hf_arch.py (a field minillm cannot compute, such as
RoPE scaling or a sliding window, is refused in one line naming it); the weights are read with
safetensors (model.safetensors, or the shards a model.safetensors.index.json lists), cast to float32
(minillm trains in float32; a float32 export comes back bit for bit), and renamed by hf_arch.from_hf_state.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minillm.config import ModelConfig
from minillm.hf_arch import ARCHITECTURES, ExportError, from_hf_state, model_config_from_hf, require_hf
from minillm.hf_tokenizer import load_sentencepiece


def is_hf_folder(path: str | Path) -> bool:
    """A folder whose config.json names a transformers model_type (a minillm run folder's does not)."""
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), by name; ExportError when there are none."""
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{folder}: no model.safetensors (nor model.safetensors.index.json); minillm reads "
                          "safetensors weights only (transformers' save_pretrained writes them)")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(folder / name))
    if "wte.weight" in out and "transformer.wte.weight" not in out:  # the original gpt2 files: no prefix
        out = {("" if k.startswith("lm_head.") else "transformer.") + k: v for k, v in out.items()}
    return out


def _has_gpt2_biases(weights: dict[str, torch.Tensor]) -> bool:
    """Whether any LayerNorm or Linear bias of a GPT-2 state dict is nonzero (not the old causal-mask
    buffers ``attn.bias``/``attn.masked_bias`` of the original gpt2 files)."""
    layers = ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc")
    return any(bool(t.any()) for k, t in weights.items() if k.endswith(".bias") and k.split(".")[-2] in layers)


def load_hf_source(path: str | Path) -> dict:
    """The fine-tuning source in a transformers folder (see the module docstring). Raises ExportError
    naming the field, file or tensor that cannot be used."""
    require_hf()
    from transformers import AutoConfig
    folder = Path(path).expanduser()
    raw = json.loads((folder / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ExportError(f"{folder}/config.json: model_type={model_type!r} has no minillm equivalent; "
                          f"train.init_from takes {', '.join(ARCHITECTURES)} folders, or a minillm run")
    tok = load_sentencepiece(folder)
    fields = model_config_from_hf(AutoConfig.from_pretrained(folder), folder)
    if fields["vocab_size"] < tok.vocab_size:
        raise ExportError(f"{folder}: config.json has vocab_size={fields['vocab_size']} but tokenizer.model has "
                          f"{tok.vocab_size} pieces; use the tokenizer the model was trained with")
    weights = _read_weights(folder)
    if model_type == "gpt2" and not fields["bias"] and _has_gpt2_biases(weights):
        fields["bias"] = True  # exported bias-free, trained with biases since: keep them
    cfg = ModelConfig(**fields)
    try:
        state = from_hf_state(weights, cfg, model_type)
    except KeyError as e:
        raise ExportError(f"{folder}: the weights have no tensor {e.args[0]!r}, which a {model_type} model "
                          "with this config.json needs") from e
    state = {k: v if v.dtype == torch.float32 else v.float() for k, v in state.items()}
    step = int((raw.get("minillm") or {}).get("step", 0))  # a minillm export's source step
    return {"model": state, "tokenizer": tok, "model_config": fields, "step": step, "where": folder}
