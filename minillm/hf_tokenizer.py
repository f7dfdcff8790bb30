"""A minillm (sentencepiece) tokenizer as transformers tokenizer files, and a sentencepiece model from a folder.

    save_hf_tokenizer(tok, folder, max_length)  tokenizer.json, tokenizer_config.json (and the like), tokenizer.model
    special_ids(tok)                            {"bos_token_id", "eos_token_id", "pad_token_id"} for config.json
    load_sentencepiece(folder)                  a minillm Tokenizer from a folder's tokenizer.model, or ExportError

tokenizer.json is built by transformers' own converter, ``SpmConverter.build_tokenizer_from_spm_proto``
(transformers/convert_slow_tokenizer.py), which follows the sentencepiece model's settings (for minillm's:
identity normalization, no dummy prefix, spaces as U+2581, byte fallback, "\\n" a user-defined piece
emitted whole). Two settings are ours, so that ``AutoTokenizer`` gives sentencepiece's ids:
``ignore_merges`` is off for BPE (with it, a chunk that happens to be a vocabulary entry, such as the text
"<0xE2>", maps to that entry; sentencepiece only ever merges), and ``split_special_tokens`` is on (the text
"</s>" is encoded as text, as sentencepiece does, not as the eos id). The tokenizer class is
``PreTrainedTokenizerFast``, which transformers 4 and 5 both load. Known differences, both inherent to
the conversion: a literal U+2581 in the text reads as a space (minillm emits its three byte tokens), and
with a unigram model the text of a special or byte piece ("<s>", "<0x41>") can match that piece.
"""
from __future__ import annotations

import json
from pathlib import Path

from minillm.hf_arch import ExportError
from minillm.tokenizer import Tokenizer

_BPE, _UNIGRAM, _CHAR = 2, 1, 4  # sentencepiece_model.proto TrainerSpec.ModelType


def _proto(tok: Tokenizer):
    from transformers.convert_slow_tokenizer import import_protobuf
    m = import_protobuf().ModelProto()
    m.ParseFromString(tok.proto)
    return m


def _backend(tok: Tokenizer):
    """The ``tokenizers.Tokenizer`` equivalent to ``tok`` (see the module docstring)."""
    from transformers.convert_slow_tokenizer import SpmConverter
    m = _proto(tok)
    kind = m.trainer_spec.model_type
    if kind not in (_BPE, _UNIGRAM, _CHAR):
        raise ExportError(f"the run's tokenizer is a sentencepiece '{m.trainer_spec.WhichOneof('model_type') or kind}'"
                          " model; only bpe, unigram and char models convert")
    if kind == _UNIGRAM:
        vocab = [(p.piece, p.score) for p in m.pieces]
    else:  # bpe, and char (a BPE without merges: every piece is one character)
        vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(m, vocab, legacy=True)
    user_defined = [p.piece for p in m.pieces if p.type == 4]
    if kind != _UNIGRAM and all(len(p) == 1 for p in user_defined):
        backend.model.ignore_merges = False  # single-character user pieces need no whole-word lookup
    return backend


def special_ids(tok: Tokenizer) -> dict:
    """bos/eos/pad ids of the sentencepiece model (None where it has none), as config.json names them."""
    sp = tok.sp
    return {"bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None,
            "eos_token_id": sp.eos_id() if sp.eos_id() >= 0 else None,
            "pad_token_id": sp.pad_id() if sp.pad_id() >= 0 else None}


def save_hf_tokenizer(tok: Tokenizer, folder: Path, max_length: int) -> None:
    """Write ``tok`` into ``folder`` for ``AutoTokenizer.from_pretrained`` (no bos/eos added on encode,
    as minillm trains: documents are separated by eos), plus the sentencepiece model as tokenizer.model."""
    from transformers import PreTrainedTokenizerFast
    sp, names = tok.sp, {}
    for key, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                   ("pad_token", sp.pad_id())):
        if i >= 0:
            names[key] = sp.id_to_piece(i)
    fast = PreTrainedTokenizerFast(tokenizer_object=_backend(tok), split_special_tokens=True,
                                   model_max_length=max_length, clean_up_tokenization_spaces=False, **names)
    fast.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend, unknown to 4
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "tokenizer.model").write_bytes(tok.proto)


def load_sentencepiece(folder: Path) -> Tokenizer:
    """The sentencepiece model of a transformers folder as a minillm Tokenizer. ExportError when there is
    none (a byte-level BPE such as GPT-2's or Llama 3's cannot be used) or its eos id is not minillm's (2)."""
    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in Path(folder).glob("tokenizer*")
                                 if p.name != "tokenizer_config.json")) or "no tokenizer files"
        raise ExportError(f"{folder}: no tokenizer.model (found: {found}); minillm needs a sentencepiece "
                          "tokenizer, as Llama 2 folders and minillm exports have")
    try:
        tok = Tokenizer(path.read_bytes())
    except RuntimeError as e:
        raise ExportError(f"{path}: not a sentencepiece model ({e})") from e
    if tok.sp.eos_id() != 2:
        raise ExportError(f"{path}: eos_id={tok.sp.eos_id()}, but minillm separates documents with id 2; "
                          "use a sentencepiece model whose eos is id 2 (as Llama's is)")
    return tok
