"""Data: corpus files in, token files and training batches out. One concept per module:

    corpus.py      finding the corpus (file, folder, glob, named download), checking it (UTF-8, binary),
                   the validation split, reading it in newline-aligned pieces
    formats.py     file formats by extension: JSON Lines and Parquet records (one document each, the
                   text in data.text_field), .gz/.bz2/.xz/.zst decompressed as streams
    hf_dataset.py  a Hugging Face dataset (save_to_disk folder, local dataset folder, hub name) as a
                   corpus: one document per row, streamed; ``datasets`` is imported only there, lazily
    tokenizer_sample.py  the tokenizer's training sample: seeded, uniform over every line, bounded
    encode.py      documents -> token ids (a process pool, in order, bounded memory), eos between them
    token_file.py  the token-file format: header, checksum, atomic writer, verified memmap reader
    prepare.py     corpus + tokenizer settings (or tokenizer.path) -> a cached folder of tokenizer.model,
                   train.bin, val.bin; a damaged entry is rebuilt
    batches.py     the training batch source (rank-aware, resumable) and evaluation windows

The tokenizer (minillm/tokenizer.py) imports nothing from here; this package uses it. Import from the
modules themselves (``from minillm.data.prepare import prepare``): this file imports nothing, so reading a
corpus or encoding it never loads torch (only batches.py needs it).
"""
