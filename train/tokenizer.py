"""The tokenizer recipe: byte-level BPE trained on the train split only, the token streams (EOT, id 0,
before every document) and each token's UTF-8 byte length, which the metric weighs targets by.
"""
from __future__ import annotations

import numpy as np

EOT = "<|endoftext|>"  # id 0; precedes every document in the token streams



def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    return tokenizer


def token_stream(tokenizer, docs: list[tuple[str, str]], dtype, chunk: int = 1024) -> np.ndarray:
    """EOT (id 0) then the document's tokens, for each document; encoded in chunks to bound memory."""
    pieces = []
    for start in range(0, len(docs), chunk):
        texts = [text for _, text in docs[start : start + chunk]]
        for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
            pieces.append(np.zeros(1, dtype=dtype))
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is one printable character, so len(token) = its bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_byte_lengths(tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 byte length of each id (0 for the special token and for ids the corpus never filled)."""
    alphabet = byte_decoder()
    lengths = np.zeros(vocab_size, dtype=np.int32)
    specials = {EOT}
    for token, idx in tokenizer.get_vocab().items():
        if token in specials:
            continue
        if any(ch not in alphabet for ch in token):
            raise RuntimeError(f"token {token!r} is outside the byte-level alphabet")
        lengths[idx] = len(token)
    return lengths


def token_bytes_of(spec, ids) -> list[bytes]:
    """The raw bytes of token ids: for tests and for reading what a model predicts."""
    from tokenizers import Tokenizer

    alphabet = byte_decoder()
    tokenizer = Tokenizer.from_file(str(spec.tokenizer_path))
    tokens = [tokenizer.id_to_token(int(i)) for i in ids]
    return [b"" if token in (None, EOT) else bytes(alphabet[ch] for ch in token) for token in tokens]
