"""Tokenization with the Hugging Face tokenizer.json a .upg header carries.

Text goes in and out as bytes, as in llama-cpp-python: a token may hold part of a UTF-8 character,
so the runtime joins token bytes and decodes only complete characters.
"""
from __future__ import annotations

import functools
import json
import threading
from typing import Any, Iterable

from tokenizers import Tokenizer as HFTokenizer

from ._core import UPGFormatError


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes (the ByteLevel pre-tokenizer's alphabet) -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _special_string(value: Any) -> str | None:
    # tokenizer_config stores special tokens as strings or as AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one model.

    Args:
        tokenizer_json: the parsed tokenizer.json.
        tokenizer_config: the parsed tokenizer_config.json (special token strings, add_bos_token).

    Raises:
        UPGFormatError: the tokenizer cannot be loaded.
    """

    def __init__(self, tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any] | None = None):
        if not isinstance(tokenizer_json, dict) or "model" not in tokenizer_json:
            raise UPGFormatError("the header has no usable 'tokenizer' (tokenizer.json) object")
        try:
            # One instance (building one takes 0.6 s for a 200k vocabulary): encode() sets whether
            # special-token strings in the text count as those tokens, under a lock.
            self._hf = HFTokenizer.from_str(json.dumps(tokenizer_json))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise UPGFormatError(f"cannot load the tokenizer: {e}") from e
        self._encode_lock = threading.Lock()
        self.config = dict(tokenizer_config or {})
        self.n_vocab = self._hf.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            key: s for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                               "mask_token")
            if (s := _special_string(self.config.get(key))) is not None}
        self.bos_id = self._token_id(self.special_tokens.get("bos_token"))
        self.eos_id = self._token_id(self.special_tokens.get("eos_token"))
        add_bos = self.config.get("add_bos_token")
        if add_bos is None:  # not stated: do what the tokenizer's post-processor does
            ids = self._hf.encode("", add_special_tokens=True).ids
            add_bos = bool(ids) and ids[0] == self.bos_id
        self.add_bos = bool(add_bos) and self.bos_id is not None
        added = self._hf.get_added_tokens_decoder()
        self._added = {t.content for t in added.values()}
        self._control_ids = {i for i, t in added.items() if t.special}
        decoder = tokenizer_json.get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        self._byte_table = _byte_level_table() if "ByteLevel" in kinds else None
        self._token_bytes: dict[int, bytes] = {}  # filled as tokens are first decoded

    def _token_id(self, text: str | None) -> int | None:
        return None if text is None else self._hf.token_to_id(text)

    def _piece_bytes(self, token: int) -> bytes:
        """A token's bytes, so generated text can be assembled byte-exactly, token by token."""
        piece = self._hf.id_to_token(token)
        table = self._byte_table
        if piece is None:
            return b""
        if piece in self._added:
            return piece.encode("utf-8")
        if table is not None:
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece: U+2581 marks a space

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text.
            add_bos: prepend the BOS token when the model's tokenizer_config asks for it
                (`add_bos_token`; Phi-4 does not).
            special: read special-token strings in the text (`<|im_start|>`) as those tokens;
                otherwise they are tokenized as plain text.
        """
        with self._encode_lock:
            self._hf.encode_special_tokens = not special
            ids = self._hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.add_bos else ids

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for; control tokens give b"" unless `special`, and so do ids
        past the tokenizer's vocabulary (models pad their embedding tables)."""
        if token < 0:
            raise ValueError(f"token ids are non-negative, got {token}")
        if token >= self.n_vocab:  # a model's embedding rows past the tokenizer's vocabulary (padding)
            return b""
        if not special and token in self._control_ids:
            return b""
        piece = self._token_bytes.get(token)
        if piece is None:
            piece = self._token_bytes[token] = self._piece_bytes(token)
        return piece

    def decode(self, tokens: Iterable[int], special: bool = False) -> bytes:
        """The bytes of a token sequence (no cleanup: the exact concatenation of token bytes)."""
        return b"".join(self.token_bytes(int(t), special) for t in tokens)

    def is_control(self, token: int) -> bool:
        """Whether the token is a special (control) token."""
        return token in self._control_ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for (from the vocabulary's strings),
        so that a text's least token count is known without tokenizing it."""
        return max(1, max(len(piece.encode("utf-8")) for piece in self._hf.get_vocab(with_added_tokens=True)))

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance builds its token table from)."""
        return self._hf.to_str()

    def token_id(self, text: str) -> int | None:
        """The id of a token given by its exact string (e.g. "<|im_end|>"), or None."""
        return self._token_id(text)
