"""Which transformers architecture a minillm model is, and back: configs and weight names.

    architecture(cfg)               "llama" | "qwen3" | "gpt2", or ExportError naming the option
    hf_config_fields(cfg, specials) keyword arguments of that architecture's transformers config
    model_config_from_hf(hf, where) ModelConfig fields (a dict) from a transformers config, or ExportError
    require_hf()                    ExportError saying what to install when transformers is missing
    to_hf_state(sd, cfg, arch)      minillm state dict -> transformers names and layouts
    from_hf_state(sd, cfg, arch)    the inverse (exact: only slices, concatenations and transposes)

The mapping, checked against transformers 5 (models/llama/modeling_llama.py, models/qwen3/modeling_qwen3.py,
models/gpt2/modeling_gpt2.py; logit parity is tested in tests/test_hf_export.py):

    minillm options                                              transformers
    pos=rope, norm=rmsnorm, mlp=swiglu, qk_norm=false            LlamaForCausalLM  (bias -> attention_bias
                                                                                    and mlp_bias)
    pos=rope, norm=rmsnorm, mlp=swiglu, qk_norm=true, bias=false Qwen3ForCausalLM  (q_norm/k_norm: RMSNorm
                                                                                    over each head, before RoPE)
    pos=learned, norm=layernorm, mlp=gelu, n_kv_head=n_head,     GPT2LMHeadModel   (bias=false: zero biases)
      qk_norm=false

Details that would break parity silently: RoPE rotates the two halves of each head in both (minillm
model.apply_rope; transformers' ``rotate_half`` with ``cat(freqs, freqs)``), so q/k need no permutation;
minillm's fused ``qkv`` is q, k, v along the output rows and its fused ``fc`` is gate then up (model.py);
GPT-2's Conv1D stores weights (in, out), the transpose of nn.Linear; gelu_approximate=tanh is
``gelu_pytorch_tanh`` (the same F.gelu call), none is ``gelu`` (exact erf); norm_eps is rms_norm_eps /
layer_norm_epsilon, and Qwen3 uses it for q_norm/k_norm as minillm does; tied embeddings store one tensor.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch

from minillm.config import ModelConfig
from minillm.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


class ExportError(UserError, ValueError):
    """A model or folder with no exact counterpart on the other side; the message names the field."""


def require_hf() -> None:
    """ExportError (one line: what to install) when transformers or safetensors is missing."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportError(f"the Hugging Face export needs the optional extra ({e.name} is not installed): "
                          'pip install -e ".[hf]"') from e


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden width as minillm.model.MLP computes it."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    return 4 * cfg.n_embd if cfg.mlp == "gelu" else 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


def _refuse(key: str, value, why: str) -> None:
    raise ExportError(f"model.{key}={value!r}: {why}; no transformers architecture computes the same model "
                      "(see minillm/hf_arch.py for the combinations that export)")


def architecture(cfg: ModelConfig) -> str:
    """The transformers architecture computing exactly ``cfg``'s model; ExportError naming the first option
    that has no exact equivalent (the table in the module docstring)."""
    if cfg.pos == "rope":
        if cfg.norm != "rmsnorm":
            _refuse("norm", cfg.norm, "RoPE models export as Llama/Qwen3, which use RMSNorm")
        if cfg.mlp != "swiglu":
            _refuse("mlp", cfg.mlp, "RoPE models export as Llama/Qwen3, whose MLP is SwiGLU")
        if cfg.qk_norm and cfg.bias:
            _refuse("bias", cfg.bias, "with qk_norm the model exports as Qwen3, whose MLP has no biases")
        return "qwen3" if cfg.qk_norm else "llama"
    if cfg.norm != "layernorm":
        _refuse("norm", cfg.norm, "learned-position models export as GPT-2, which uses LayerNorm")
    if cfg.mlp != "gelu":
        _refuse("mlp", cfg.mlp, "learned-position models export as GPT-2, whose MLP is GELU")
    if cfg.qk_norm:
        _refuse("qk_norm", cfg.qk_norm, "GPT-2 has no query/key norm")
    if cfg.n_kv_head != cfg.n_head:
        _refuse("n_kv_head", cfg.n_kv_head, f"GPT-2 has as many key/value heads as query heads ({cfg.n_head})")
    return "gpt2"


def hf_config_fields(cfg: ModelConfig, specials: dict) -> dict:
    """Keyword arguments for ``transformers.AutoConfig.for_model(architecture(cfg), ...)``.

    ``specials``: bos_token_id, eos_token_id, pad_token_id (None when the tokenizer has none). A key
    ``minillm`` keeps what the architecture cannot say (the preset's name; GPT-2 always has biases)."""
    arch = architecture(cfg)
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "architectures": [ARCHITECTURES[arch]], "minillm": {"name": cfg.name, "bias": cfg.bias}, **specials}
    if arch == "gpt2":
        return common | {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                         "n_positions": cfg.block_size, "n_inner": mlp_hidden(cfg),
                         "activation_function": "gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu",
                         "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                         "attn_pdrop": 0.0}  # minillm has no dropout on attention weights
    fields = {"hidden_size": cfg.n_embd, "intermediate_size": mlp_hidden(cfg), "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "attention_bias": cfg.bias, "attention_dropout": 0.0}
    if arch == "llama":
        return common | fields | {"mlp_bias": cfg.bias}
    return common | fields | {"use_sliding_window": False}


def _hf_refuse(where, field: str, value, what: str) -> None:
    raise ExportError(f"{where}/config.json: {field}={value!r}: minillm's model has no {what}; "
                      "train.init_from takes llama, qwen3 and gpt2 folders without it")


def _rope_theta(hf, where) -> float:
    """The RoPE base of a transformers config; ExportError for RoPE scaling (config.json's rope_scaling or
    rope_parameters with a rope_type other than default: transformers 5 reads both into rope_parameters)."""
    rope = getattr(hf, "rope_parameters", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        _hf_refuse(where, "rope_scaling", {"rope_type": kind}, "RoPE scaling")
    if not isinstance(rope.get("rope_theta", 10000.0), (int, float)):  # one table per layer type
        _hf_refuse(where, "rope_parameters", rope, "per-layer RoPE tables")
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))


def _llama_like(hf, where) -> dict:
    """ModelConfig fields of a Llama or Qwen3 config (checked: SiLU, head_dim, no scaling, no sliding window)."""
    if hf.hidden_act != "silu":
        _hf_refuse(where, "hidden_act", hf.hidden_act, "MLP activation but SiLU (SwiGLU)")
    if getattr(hf, "head_dim", None) not in (None, hf.hidden_size // hf.num_attention_heads):
        _hf_refuse(where, "head_dim", hf.head_dim, "head width but hidden_size / num_attention_heads")
    if hf.model_type == "llama" and hf.attention_bias != hf.mlp_bias:
        _hf_refuse(where, "mlp_bias", hf.mlp_bias, f"biases in only one of attention ({hf.attention_bias}) and MLP")
    if hf.model_type == "qwen3" and hf.attention_bias:
        _hf_refuse(where, "attention_bias", True, "attention biases without MLP biases")
    if getattr(hf, "sliding_window", None) or "sliding_attention" in (getattr(hf, "layer_types", None) or []):
        _hf_refuse(where, "sliding_window", hf.sliding_window, "sliding-window attention")
    return {"n_layer": hf.num_hidden_layers, "n_head": hf.num_attention_heads, "n_kv_head": hf.num_key_value_heads,
            "n_embd": hf.hidden_size, "block_size": hf.max_position_embeddings, "norm": "rmsnorm",
            "norm_eps": float(hf.rms_norm_eps), "pos": "rope", "rope_theta": _rope_theta(hf, where), "mlp": "swiglu",
            "mlp_hidden": hf.intermediate_size, "bias": bool(hf.attention_bias), "qk_norm": hf.model_type == "qwen3"}


_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}  # gelu_new: the tanh formula, written out


def _gpt2(hf, where) -> dict:
    """ModelConfig fields of a GPT-2 config (checked: GELU kind, plain scaled attention)."""
    if hf.activation_function not in _GELU:
        _hf_refuse(where, "activation_function", hf.activation_function, "activation but GELU")
    if hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
        _hf_refuse(where, "scale_attn_by_inverse_layer_idx", hf.scale_attn_by_inverse_layer_idx,
                   "attention scaling but 1/sqrt(head_dim)")
    if getattr(hf, "add_cross_attention", False):
        _hf_refuse(where, "add_cross_attention", True, "cross-attention")
    return {"n_layer": hf.n_layer, "n_head": hf.n_head, "n_kv_head": hf.n_head, "n_embd": hf.n_embd,
            "block_size": hf.n_positions, "norm": "layernorm", "norm_eps": float(hf.layer_norm_epsilon),
            "pos": "learned", "mlp": "gelu", "mlp_hidden": hf.n_inner or 4 * hf.n_embd,
            "gelu_approximate": _GELU[hf.activation_function], "bias": True, "qk_norm": False}


def model_config_from_hf(hf, where) -> dict:
    """ModelConfig fields (a dict, dropout left out) for a transformers config object ``hf``; ExportError
    naming the field of config.json that minillm cannot compute (architecture, RoPE scaling, sliding
    window, activation, ...)."""
    if hf.model_type not in ARCHITECTURES:
        raise ExportError(f"{where}/config.json: model_type={hf.model_type!r}: minillm imports "
                          f"{', '.join(ARCHITECTURES)} models only")
    fields = _gpt2(hf, where) if hf.model_type == "gpt2" else _llama_like(hf, where)
    extra = getattr(hf, "minillm", None) or {}  # written by minillm's export
    fields |= {"name": extra.get("name", f"hf-{hf.model_type}"), "vocab_size": hf.vocab_size,
               "tie_embeddings": bool(hf.tie_word_embeddings)}
    if "bias" in extra:
        fields["bias"] = bool(extra["bias"])
    default = mlp_hidden(ModelConfig(**{**fields, "mlp_hidden": None}))
    fields["mlp_hidden"] = None if fields["mlp_hidden"] == default else fields["mlp_hidden"]
    return {k: v for k, v in asdict(ModelConfig(**fields)).items() if k != "dropout"}  # validated


def _name_map(cfg: ModelConfig, arch: str) -> list[tuple[str, str, object]]:
    """(transformers name, minillm name, layout) for every tensor: layout is "copy", "T" (transpose:
    GPT-2's Conv1D) or (start, stop) rows of a fused minillm tensor (qkv: q, k, v; fc: gate, up)."""
    out = []
    for i in range(cfg.n_layer):
        out += _block_map(cfg, arch, i, f"blocks.{i}.")
    if arch == "gpt2":
        out += [("transformer.wte.weight", "tok_emb.weight", "copy"), ("transformer.wpe.weight", "pos_emb.weight", "copy"),
                ("transformer.ln_f.weight", "norm_f.weight", "copy"), ("transformer.ln_f.bias", "norm_f.bias", "copy")]
    else:
        out += [("model.embed_tokens.weight", "tok_emb.weight", "copy"), ("model.norm.weight", "norm_f.weight", "copy")]
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", "lm_head.weight", "copy"))
    return out


def _block_map(cfg: ModelConfig, arch: str, i: int, m: str) -> list[tuple[str, str, object]]:
    """The entries of _name_map for block i (minillm prefix ``m``)."""
    if arch == "gpt2":
        h = f"transformer.h.{i}."
        pairs = [("ln_1", "norm1", "copy"), ("attn.c_attn", "attn.qkv", "T"), ("attn.c_proj", "attn.proj", "T"),
                 ("ln_2", "norm2", "copy"), ("mlp.c_fc", "mlp.fc", "T"), ("mlp.c_proj", "mlp.proj", "T")]
        return [(f"{h}{a}.{p}", f"{m}{b}.{p}", lay if p == "weight" else "copy")
                for a, b, lay in pairs for p in ("weight", "bias")]
    h, q, kv, f = f"model.layers.{i}.", cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, mlp_hidden(cfg)
    out = [(f"{h}input_layernorm.weight", f"{m}norm1.weight", "copy"),
           (f"{h}post_attention_layernorm.weight", f"{m}norm2.weight", "copy")]
    fused = [("self_attn.q_proj", "attn.qkv", (0, q)), ("self_attn.k_proj", "attn.qkv", (q, q + kv)),
             ("self_attn.v_proj", "attn.qkv", (q + kv, q + 2 * kv)), ("self_attn.o_proj", "attn.proj", "copy"),
             ("mlp.gate_proj", "mlp.fc", (0, f)), ("mlp.up_proj", "mlp.fc", (f, 2 * f)),
             ("mlp.down_proj", "mlp.proj", "copy")]
    for p in ("weight", "bias") if cfg.bias else ("weight",):
        out += [(f"{h}{a}.{p}", f"{m}{b}.{p}", lay) for a, b, lay in fused]
    if cfg.qk_norm:
        out += [(f"{h}self_attn.q_norm.weight", f"{m}attn.q_norm.weight", "copy"),
                (f"{h}self_attn.k_norm.weight", f"{m}attn.k_norm.weight", "copy")]
    return out


def to_hf_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """minillm state dict -> transformers state dict (new contiguous tensors; a minillm tensor missing
    because bias=False becomes zeros of GPT-2's bias shape: zero biases compute the same model)."""
    out = {}
    for hf_name, name, layout in _name_map(cfg, arch):
        t = sd.get(name)
        if t is None:  # GPT-2 bias of a bias-free minillm model: LayerNorm/Linear biases of zeros
            t = torch.zeros(sd[name.replace(".bias", ".weight")].shape[0], dtype=sd["tok_emb.weight"].dtype)
        elif layout == "T":
            t = t.t()
        elif isinstance(layout, tuple):
            t = t[layout[0]:layout[1]]
        out[hf_name] = t.contiguous().clone()
    return out


def from_hf_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """transformers state dict -> minillm state dict (fused tensors concatenated back in order); KeyError
    naming a missing tensor. GPT-2 biases are dropped for a bias-free ModelConfig."""
    parts: dict[str, list[torch.Tensor]] = {}
    for hf_name, name, layout in _name_map(cfg, arch):
        if name.endswith(".bias") and not cfg.bias:
            continue
        t = sd[hf_name]
        parts.setdefault(name, []).append(t.t() if layout == "T" else t)
    out = {name: (ts[0] if len(ts) == 1 else torch.cat(ts)).contiguous() for name, ts in parts.items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
