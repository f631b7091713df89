"""Byte-level BPE tokenizer with Phi-4's special tokens and chat template, and chat encoding.

The tokenizer has Phi-4's layout (a regex Split then ByteLevel, ByteLevel decoder, BPE with
ignore_merges) with one change: numbers split into single digits instead of Phi-4's runs of up
to three, because a tiny model learns column arithmetic on single digits far more easily.
"""

import json
import os

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Phi-4's pre-tokenizer regex with \p{N}{1,3} narrowed to \p{N}.
PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
           r"|\s*[\r\n]|\s+(?!\S)|\s+")

# Phi-4's special tokens, in Phi-4's id order, appended after the BPE vocabulary.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>")
BOS, UNK, EOS, PAD = "<|endoftext|>", "<|endoftext|>", "<|im_end|>", "<|dummy_85|>"


def load_phi4_tokenizer_config(phi4_dir):
    """Phi-4's tokenizer_config.json (special token strings and the chat template)."""
    path = os.path.join(phi4_dir, "tokenizer_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass the folder holding Phi-4's "
                                "tokenizer_config.json")
    with open(path) as f:
        return json.load(f)


def train_tokenizer(texts, vocab_size):
    """Trains the BPE on `texts` and appends the special tokens; `vocab_size` counts them."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                              use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def special_ids(tok):
    """Ids of the special tokens by role: bos, eos, pad, im_start, im_sep, endoftext."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return {"bos": ids[BOS], "eos": ids[EOS], "pad": ids[PAD], "im_start": ids["<|im_start|>"],
            "im_sep": ids["<|im_sep|>"], "endoftext": ids["<|endoftext|>"]}


def save_tokenizer(tok, out_dir, max_length, phi4):
    """Writes tokenizer.json and tokenizer_config.json (`phi4`'s strings and chat template)."""
    config = {k: phi4[k] for k in ("add_bos_token", "add_eos_token", "bos_token", "eos_token",
                                   "pad_token", "unk_token", "clean_up_tokenization_spaces")}
    config.update(model_max_length=max_length, tokenizer_class=phi4["tokenizer_class"],
                  chat_template=phi4["chat_template"])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def compile_template(source):
    """Compiles a chat template with the Jinja2 settings transformers uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


class ChatEncoder:
    """Turns conversations into token ids plus a mask of the tokens that carry the loss.

    Special tokens split the rendered template, so encoding each message's content on its own
    gives the same ids as encoding the whole rendered string. The loss covers each assistant
    content and the <|im_end|> after it. Answers that are a single lowercase word (reversed or
    sorted letters) are spelled one letter a token, which a tiny model learns far more easily
    than the BPE merges of a scrambled word; they decode to the same text.
    """

    def __init__(self, tok, chat_template):
        self.tok = tok
        self.template = compile_template(chat_template)
        self.ids = special_ids(tok)
        self.roles = {r: tok.encode(r, add_special_tokens=False).ids
                      for r in ("system", "user", "assistant")}
        self.letters = {c: tok.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz"}

    def _content(self, role, text, encoded):
        if role == "assistant" and text.isalpha() and text.islower():
            return [self.letters[c] for c in text]
        return encoded

    def encode(self, batch):
        """Encodes a list of conversations into a list of (ids, loss_mask) pairs."""
        texts = [m["content"] for messages in batch for m in messages]
        encoded = iter(e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False))
        out = []
        for messages in batch:
            ids, mask = [], []
            for m in messages:
                head = [self.ids["im_start"], *self.roles[m["role"]], self.ids["im_sep"]]
                body = self._content(m["role"], m["content"], next(encoded)) + [self.ids["eos"]]
                ids += head + body
                mask += [False] * len(head) + [m["role"] == "assistant"] * len(body)
            out.append((ids, mask))
        return out

    def prompt(self, messages):
        """Ids of a conversation followed by the assistant generation prompt."""
        text = self.template.render(messages=messages, add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False).ids
