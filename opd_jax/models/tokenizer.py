"""Tokenisation: local `transformers` tokenizers, chat templates, character offsets.

Offsets are what the sentence segmenter needs: `encode_with_offsets` maps each prompt
token to its characters in the input text, `decode_with_offsets` maps each sampled token
to its characters in the decoded response. Nothing here touches the network.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import transformers

from opd_jax.errors import InputError

Tokenizer = transformers.PreTrainedTokenizerBase
Offsets = list[tuple[int, int]]
_REPLACEMENT = "\ufffd"
# The chat format of tokenizers trained here: "<|user|>question\n<|assistant|>answer<eos>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>")


def train_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int, *, split_digits: bool = False
) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with a chat template; offline.

    Ids: ``<pad>`` 0, ``<eos>`` 1, then the chat-role tokens, the 256 bytes and the merges
    (at most ``vocab_size`` in all). ``split_digits`` makes every digit its own token (numbers
    are then spelled digit by digit, which small models learn arithmetic from far better).
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Files any of which holds a tokenizer that `AutoTokenizer` reads.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """`AutoTokenizer.from_pretrained` on a local directory (never the hub).

    Raises:
      FileNotFoundError: no such directory, or none of `TOKENIZER_FILES` in it.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Tokenizer directory {path} does not exist; pass a local "
            "checkpoint directory (hub ids are not downloaded)."
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
            "model's tokenizer there, e.g. `tokenizer.save_pretrained(path)` or copy those "
            "files from the checkpoint it came from."
        )
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def apply_chat_template(
    tokenizer: Tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    system: str | None = None,
    **template_kwargs: Any,
) -> list[str]:
    """Renders prompts (user strings or message lists) with the chat template, ready for
    the assistant's turn; `template_kwargs` go to the template (e.g. `enable_thinking`).
    A tokenizer without a template gets the prompts unchanged."""
    if not getattr(tokenizer, "chat_template", None):
        return [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
    rendered = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        rendered.append(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
        )
    return rendered


def encode_with_offsets(
    tokenizer: Tokenizer, texts: Sequence[str], *, add_special_tokens: bool = False
) -> tuple[list[list[int]], list[Offsets]]:
    """Token ids and, per token, its `(start, end)` character span in its text.

    Spans are non-decreasing and cover the text; byte-level tokens that split one multi-byte
    character all get that character's span.
    """
    if not tokenizer.is_fast:
        raise InputError(
            "encode_with_offsets needs a fast (Rust) tokenizer; save the "
            "tokenizer with tokenizer.json."
        )
    enc = tokenizer(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return (
        [list(ids) for ids in enc["input_ids"]],
        [[(int(s), int(e)) for s, e in offs] for offs in enc["offset_mapping"]],
    )


def decode_with_offsets(
    tokenizer: Tokenizer, token_ids: Sequence[int], *, skip_special_tokens: bool = False
) -> tuple[str, Offsets]:
    """Decodes a response and gives each token its `(start, end)` span in the text.

    Incremental detokenisation: a token's text is what decoding a short window ending at it
    adds to decoding the window without it. A token that ends inside a multi-byte character
    (byte-level BPE) adds nothing until the token completing the character, which gets the
    whole character; the spans tile the text: `text == "".join(text[s:e] for s, e in offsets)`.
    """
    decoder = OffsetDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    decoder.feed(token_ids)
    return decoder.result()


def raw_decoder(tokenizer: Tokenizer, skip_special_tokens: bool = False):
    """``ids -> tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces=False)``.

    A fast tokenizer that keeps `transformers`' own `_decode` does no more than its Rust
    tokenizer's `decode` there; that is called directly, without `transformers`' per-call
    argument handling (10x the decode itself: detokenising a response token by token spent
    most of its time there). Any other tokenizer decodes through `tokenizer.decode`."""
    fast = transformers.PreTrainedTokenizerFast
    if isinstance(tokenizer, fast) and type(tokenizer)._decode is fast._decode:
        backend = tokenizer.backend_tokenizer
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class OffsetDecoder:
    """:func:`decode_with_offsets` of a growing response: :meth:`feed` the tokens as they are
    sampled, read :meth:`result` at any point (each token is decoded once)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._decode = raw_decoder(tokenizer, skip_special_tokens)
        self.ids: list[int] = []
        self.pieces: list[str] = []
        self.offsets: Offsets = []
        self.prefix = self.read = 0  # window start; tokens before `read` have been emitted
        self.length = 0

    def feed(self, token_ids: Sequence[int]) -> None:
        """Appends tokens to the response."""
        ids = self.ids
        for token in token_ids:
            ids.append(int(token))
            prefix_text = self._decode(ids[self.prefix : self.read])
            new_text = self._decode(ids[self.prefix :])
            if new_text.endswith(_REPLACEMENT) or not new_text.startswith(prefix_text):
                self.offsets.append((self.length, self.length))
                continue
            delta = new_text[len(prefix_text) :]
            self.pieces.append(delta)
            self.offsets.append((self.length, self.length + len(delta)))
            self.length += len(delta)
            self.prefix, self.read = self.read, len(ids)

    def result(self) -> tuple[str, Offsets]:
        """The text so far and each token's span (trailing incomplete bytes decoded as
        replacement characters, given to the last token)."""
        if self.read == len(self.ids):
            return "".join(self.pieces), list(self.offsets)
        window = self.ids[self.prefix :]
        tail = self._decode(window)[len(self._decode(self.ids[self.prefix : self.read])) :]
        offsets = list(self.offsets)
        offsets[-1] = (self.length, self.length + len(tail))
        return "".join(self.pieces) + tail, offsets


def check_same_tokenizer(tok_a: Tokenizer, tok_b: Tokenizer, names=("student", "teacher")) -> None:
    """Raises :class:`InputError` unless both tokenizers map the same strings to the same ids
    and have the same special tokens (token-level distillation needs one tokenizer), naming the
    first differing id or special token."""
    a, b = names
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        by_id_a = {i: t for t, i in vocab_a.items()}
        by_id_b = {i: t for t, i in vocab_b.items()}
        first = min(i for i in by_id_a.keys() | by_id_b.keys() if by_id_a.get(i) != by_id_b.get(i))
        raise InputError(
            f"The tokenizers differ: vocabularies of {len(vocab_a)} ({a}) and {len(vocab_b)} "
            f"({b}) tokens; the first differing id is {first}: {by_id_a.get(first)!r} in the "
            f"{a}'s, {by_id_b.get(first)!r} in the {b}'s. Teacher and student must use the same "
            "tokenizer; pick models of the same family."
        )
    special_a, special_b = tok_a.special_tokens_map, tok_b.special_tokens_map
    for role in sorted(special_a.keys() | special_b.keys()):
        if special_a.get(role) != special_b.get(role):
            raise InputError(
                f"The tokenizers differ in their special tokens: {role} is "
                f"{special_a.get(role)!r} in the {a}'s, {special_b.get(role)!r} in the {b}'s. "
                "Teacher and student must use the same tokenizer; pick models of the same family."
            )


def token_vocab(tokenizer: Tokenizer) -> int:
    """The ids a tokenizer can produce: one past its largest (added tokens included)."""
    return max(tokenizer.get_vocab().values()) + 1


def encode_prompts(
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    length: int,
    *,
    chat_template: bool = True,
    system_prompt: str = "",
    length_key: str = "data.max_prompt_tokens",
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises prompts, left-padded (or truncated from the left) to ``length``.

    Returns ``tokens [B, P]`` int32 and ``mask [B, P]`` int32 (1 on real tokens). A prompt
    longer than ``length`` warns, naming ``length_key``, the config key that sets it.
    """
    texts = list(prompts)
    if chat_template:
        texts = apply_chat_template(tokenizer, texts, system=system_prompt or None)
    ids = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]
    pad = pad_id(tokenizer)
    tokens = np.full((len(ids), length), pad, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    longest = max((len(row) for row in ids), default=0)
    if longest > length:
        warnings.warn(
            f"a prompt of {longest} tokens is cut to {length_key}={length} "
            f"(its start is dropped): raise {length_key} to keep it whole.",
            stacklevel=2,
        )
    for b, row in enumerate(ids):
        row = row[-length:]
        tokens[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    return tokens, mask


def pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's padding id, else its EOS id, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def eos_ids(tokenizer: Tokenizer, model_eos: int | Sequence[int] | None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the model config's."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    if model_eos is not None:
        ids |= {int(model_eos)} if isinstance(model_eos, int) else {int(i) for i in model_eos}
    return tuple(sorted(ids))
