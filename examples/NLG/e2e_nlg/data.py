"""E2E NLG data: finding the files, parsing them, tokenising them (cached), and batching with dynamic padding.

A line of Microsoft LoRA's ``data/e2e/*.txt`` is ``<meaning representation>||<reference>``. A training example is
``tokens(format_prompt(mr)) + tokens(format_completion(ref)) + [end of text]``, the loss on the last two parts;
generation feeds the prompt and stops at the end of text.
"""
import hashlib
import importlib.util
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .tokenizer import EOT_ID, Tokenizer, gpt2_tokenizer

SPLITS = ("train", "valid", "test")
ENV_VAR = "E2E_DATA_DIR"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_DATA_DIR = os.path.join(REPO_ROOT, "data", "e2e")
DOWNLOAD_CMD = "python data/download_e2e.py  (or: python data/download_e2e.py --from DIR_WITH_THE_TXT_FILES)"
DOWNLOADER_PATH = os.path.join(REPO_ROOT, "data", "download_e2e.py")
IGNORE_INDEX = -100  # label value the loss skips (prompt and padding)
PROMPT_FORMAT_VERSION = 2  # bump when the prompt/completion format or the cached fields change: a new cache


class DataError(ValueError):
    """Missing or malformed E2E data; the message says which file and how to fix it."""


# Attributes the default run delexicalises (as the E2E baseline TGen does): a random frozen base cannot learn to
# copy open-class venue names in minutes.
DELEX_SLOTS = ("name", "near")


def placeholder(attr: str) -> str:
    """The text standing for ``attr``'s value in a delexicalised MR and text: ``[name]``, ``[near]``."""
    return f"[{attr}]"


def mr_fields(mr: str) -> List[Tuple[str, str, Optional[str]]]:
    """The fields of an MR ``"key : value | ..."`` as stripped ``(field, key, value)``, ``value`` None for a field
    without ``:`` (the caller decides what that means)."""
    fields = []
    for field in mr.strip().split("|"):
        key, sep, value = field.partition(":")
        fields.append((field.strip(), key.strip(), value.strip() if sep else None))
    return fields


def delexicalize(mr: str, text: Optional[str] = None, slots: Sequence[str] = DELEX_SLOTS
                 ) -> Tuple[str, Optional[str], Dict[str, str]]:
    """Replace the values of ``slots`` (those the MR has) by their placeholders in an MR and optionally a text.

    Args:
        text: a reference; every case-insensitive occurrence of a value becomes its placeholder.

    Returns:
        (the MR, the text or None, ``{attr: value}`` replaced, for :func:`relexicalize`).
    """
    fields, values = [], {}
    for field, key, value in mr_fields(mr):
        if value and key in slots:
            values[key] = value
            field = f"{key} : {placeholder(key)}"
        fields.append(field)
    if text is not None:
        for attr, value in values.items():
            # "Cafe" for "Café" and any letter case: the references spell names both ways.
            pattern = re.escape(value).replace("é", "[eé]")
            text = re.sub(pattern, placeholder(attr), text, flags=re.IGNORECASE)
    return " | ".join(fields), text, values


def relexicalize(text: str, values: Dict[str, str]) -> str:
    """Put the MR's values back in place of their placeholders (a placeholder the MR has no value for stays)."""
    for attr, value in values.items():
        text = text.replace(placeholder(attr), value)
    return text


def format_prompt(mr: str, delex: Sequence[str] = ()) -> str:
    """The prompt for an MR: ``mr + " ||"``, the ``delex`` attributes' values as placeholders."""
    if delex:
        mr = delexicalize(mr, None, delex)[0]
    return mr.strip() + " ||"


def format_completion(reference: str) -> str:
    """The text the model learns after the prompt (end of text is appended as a token)."""
    return " " + reference.strip()


def find_data_dir(data_dir: Optional[str] = None, split: str = "train") -> str:
    """The first of ``data_dir`` (``--data_dir``), ``$E2E_DATA_DIR`` and ``data/e2e/`` that holds ``{split}.txt``;
    a ``data_dir`` given must hold it (no fallback).

    Raises:
        DataError: none has it; the message names the three places and the download command.
    """
    fname = f"{split}.txt"
    if data_dir:
        if os.path.isfile(os.path.join(data_dir, fname)):
            return data_dir
        raise DataError(f"--data_dir {data_dir!r} has no {fname}. Get the E2E data with: {DOWNLOAD_CMD}")
    tried = []
    env = os.environ.get(ENV_VAR)
    for label, d in ((f"${ENV_VAR}", env), ("data/e2e/", DEFAULT_DATA_DIR)):
        if d and os.path.isfile(os.path.join(d, fname)):
            return d
        tried.append(f"{label} ({d if d else 'not set'})")
    raise DataError(f"E2E data not found: no {fname} in --data_dir (not given), {tried[0]}, or {tried[1]}. "
                    f"Get it with: {DOWNLOAD_CMD}  -- or point --data_dir / ${ENV_VAR} at a directory holding "
                    f"train.txt, valid.txt and test.txt")


def downloader():
    """The script ``data/download_e2e.py`` as a module, so the examples share its ``fetch_e2e``.

    Raises:
        DataError: the script is not there (a copy of ``examples/`` outside the repository).
    """
    name = "loralib_nlg_download_e2e"
    if name not in sys.modules:
        if not os.path.isfile(DOWNLOADER_PATH):
            raise DataError(f"{DOWNLOADER_PATH} is missing, so the E2E data cannot be fetched; point --data_dir "
                            f"or ${ENV_VAR} at a directory holding train.txt, valid.txt and test.txt")
        spec = importlib.util.spec_from_file_location(name, DOWNLOADER_PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def ensure_data(data_dir: Optional[str] = None, splits: Sequence[str] = ("train", "valid"), download: bool = True,
                progress: bool = True) -> None:
    """Make sure :func:`find_data_dir` finds each of ``splits``, else fetch the E2E files into ``data/e2e/``
    (never for an explicit ``data_dir``, which must hold them itself).

    Args:
        download: False (``--no_download``): a missing split is an error.
        progress: show tqdm bars while downloading.

    Raises:
        DataError: a split is missing and fetching is off or failed; the message says how to fix it.
    """
    if data_dir:
        for split in splits:
            find_data_dir(data_dir, split)
        return
    missing = []
    for split in splits:
        try:
            find_data_dir(None, split)
        except DataError:
            missing.append(split)
    if not missing:
        return
    env = os.environ.get(ENV_VAR)
    where = (f"no {missing[0]}.txt in --data_dir (not given), ${ENV_VAR} ({env if env else 'not set'}) or "
             f"data/e2e/")
    fix = (f"Copy the three files with `python data/download_e2e.py --from DIR`, or set ${ENV_VAR} to a "
           "directory holding train.txt, valid.txt and test.txt")
    if not download:
        raise DataError(f"E2E data not found: {where}, and --no_download forbids fetching it; {fix}")
    dl = downloader()
    print(f"E2E data not found ({where}): fetching it into data/e2e/ from {dl.BASE_URL} (sha256-checked)",
          file=sys.stderr)
    existed = os.path.isdir(DEFAULT_DATA_DIR)
    try:
        dl.fetch_e2e(DEFAULT_DATA_DIR, progress=progress, log=lambda msg: print(msg, file=sys.stderr))
    except dl.DownloadError as e:
        if not existed and os.path.isdir(DEFAULT_DATA_DIR) and not os.listdir(DEFAULT_DATA_DIR):
            os.rmdir(DEFAULT_DATA_DIR)  # a failed first fetch leaves no empty data/e2e/ behind
        if isinstance(e, dl.NetworkError):
            raise DataError(f"E2E data not found ({where}) and the download failed ({e}). Offline? {fix}") from e
        raise DataError(f"E2E data not found ({where}) and the download was refused: {e}. {fix}") from e


def split_path(split: str, data_dir: Optional[str] = None) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    return os.path.join(find_data_dir(data_dir, split), f"{split}.txt")


def read_e2e(path: str) -> List[Tuple[str, str]]:
    """An E2E file's (MR, reference) pairs, in file order.

    Raises:
        DataError: not UTF-8, no examples, or a line (named) without exactly one ``||`` or with an empty side.
    """
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue  # a blank line (e.g. a trailing one) carries no example
                parts = line.rstrip("\n").split("||")
                if len(parts) != 2:
                    raise DataError(f"{path}:{lineno}: expected '<meaning representation>||<reference>' with "
                                    f"exactly one '||', found {len(parts) - 1}: {line.strip()[:80]!r}")
                mr, ref = parts[0].strip(), parts[1].strip()
                if not mr:
                    raise DataError(f"{path}:{lineno}: empty meaning representation before '||'")
                if not ref:
                    raise DataError(f"{path}:{lineno}: empty reference after '||'")
                pairs.append((mr, ref))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); re-download it with: {DOWNLOAD_CMD}") from e
    if not pairs:
        raise DataError(f"{path} holds no examples")
    return pairs


def load_references(split: str = "test", data_dir: Optional[str] = None) -> List[Tuple[str, List[str]]]:
    """Group a split's lines by their exact MR: ``[(mr, [ref, ...]), ...]``, unique MRs in first-seen order."""
    groups: Dict[str, List[str]] = {}
    for mr, ref in read_e2e(split_path(split, data_dir)):
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())


def cache_dir() -> str:
    """``$LORALIB_NLG_CACHE``, else ``~/.cache/loralib-nlg``."""
    return os.environ.get("LORALIB_NLG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loralib-nlg")


@dataclass
class TokenizedSplit:
    """Examples stored flat: example i is ``tokens[offsets[i]:offsets[i+1]]``, the first ``prompt_lens[i]`` the
    prompt; ``faithful[i]``: its reference realises every attribute of its MR (slots.py)."""
    tokens: torch.Tensor
    offsets: torch.Tensor
    prompt_lens: torch.Tensor
    sha256: str
    faithful: torch.Tensor
    pad_id: int = EOT_ID

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def example(self, i: int) -> Tuple[List[int], int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist(), int(self.prompt_lens[i])


def tokenize_pairs(pairs: Sequence[Tuple[str, str]], delex: Sequence[str] = (), tokenizer: Optional[Tokenizer] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tok = tokenizer or gpt2_tokenizer()
    enc = tok.enc
    if delex:
        pairs = [delexicalize(mr, ref, delex)[:2] for mr, ref in pairs]
    prompts = enc.encode_ordinary_batch([format_prompt(mr) for mr, _ in pairs])
    comps = enc.encode_ordinary_batch([format_completion(ref) for _, ref in pairs])
    seqs = [p + c + [tok.eos_id] for p, c in zip(prompts, comps)]
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)
    tokens = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    return tokens, offsets, torch.tensor([len(p) for p in prompts], dtype=torch.int32)


def load_tokenized(split: str, data_dir: Optional[str] = None, use_cache: bool = True,
                   write_cache: bool = True, delex: Sequence[str] = (), tokenizer: Optional[Tokenizer] = None
                   ) -> TokenizedSplit:
    """Parse and tokenise a split, cached under :func:`cache_dir` by the file's sha256.

    Args:
        write_cache: False reads a cache entry but never writes one (data-parallel ranks other than 0).
        delex: attributes to delexicalise (:func:`delexicalize`).
        tokenizer: the model family's (default GPT-2's); its name is part of the cache key.

    Raises:
        DataError: as :func:`find_data_dir` and :func:`read_e2e`.
    """
    path = split_path(split, data_dir)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    tok = tokenizer or gpt2_tokenizer()
    tag = ("-d" + "+".join(delex) if delex else "") + ("" if tok.name == "gpt2" else f"-t{tok.name}")
    cpath = os.path.join(cache_dir(), f"e2e-{split}-{digest[:32]}-p{PROMPT_FORMAT_VERSION}{tag}.pt")
    if use_cache and os.path.isfile(cpath):
        try:
            d = torch.load(cpath, map_location="cpu", weights_only=True)
            return TokenizedSplit(d["tokens"], d["offsets"], d["prompt_lens"], digest, d["faithful"], tok.pad_id)
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    pairs = read_e2e(path)
    tokens, offsets, prompt_lens = tokenize_pairs(pairs, delex, tok)
    faithful = torch.tensor([_faithful(mr, ref) for mr, ref in pairs], dtype=torch.bool)
    if use_cache and write_cache:
        try:
            from .adapter_io import atomic_write

            atomic_write(cpath, lambda f: torch.save(
                {"tokens": tokens, "offsets": offsets, "prompt_lens": prompt_lens, "faithful": faithful}, f))
        except OSError:
            pass  # a read-only cache location only costs the next run a re-tokenisation
    return TokenizedSplit(tokens, offsets, prompt_lens, digest, faithful, tok.pad_id)


def _faithful(mr: str, ref: str) -> bool:
    from .slots import check
    try:
        return check(mr, ref).errors == 0
    except ValueError:  # an MR field the matcher cannot parse: not known to be faithful
        return False


def make_example(tokens: List[int], prompt_len: int, max_len: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of one example, truncated to ``max_len``: labels are the tokens on the completion and
    IGNORE_INDEX on the prompt (the model shifts them by one)."""
    if max_len is not None:
        tokens = tokens[:max_len]
    labels = [IGNORE_INDEX] * min(prompt_len, len(tokens)) + tokens[prompt_len:]
    return tokens, labels


def collate(examples: Sequence[Tuple[List[int], List[int]]], pad_id: int = EOT_ID) -> Dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: input_ids with ``pad_id``, labels with IGNORE_INDEX. Training needs
    no attention mask: causal attention never sees the padding after a token, and padding carries no loss."""
    T = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        labels[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    return {"input_ids": ids, "labels": labels}


def target_count(labels: torch.Tensor) -> int:
    """The tokens a batch's mean loss is over (labels after the first position that are not ``IGNORE_INDEX``)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def select_indices(n: int, limit: Optional[int], seed: int, among: Optional[Sequence[int]] = None) -> List[int]:
    """A fixed random subset of ``limit`` of ``n`` example indices (or of ``among``); all when ``limit`` is None."""
    idx = list(range(n)) if among is None else list(among)
    if limit is not None and limit < n:
        random.Random(seed).shuffle(idx)
        idx = sorted(idx[:limit])
    return idx


def iterate_batches(split: TokenizedSplit, indices: Sequence[int], batch_size: int, max_len: Optional[int],
                    shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
                    ) -> Iterator[Dict[str, torch.Tensor]]:
    """Batches over ``indices`` (shuffled by ``seed`` when asked, then without the ragged last); rank ``rank`` of
    ``world_size`` takes every ``world_size``-th batch."""
    order = list(indices)
    if shuffle:
        random.Random(seed).shuffle(order)
    for b in range(rank, num_batches(len(order), batch_size, shuffle), world_size):
        chunk = order[b * batch_size:(b + 1) * batch_size]
        yield collate([make_example(*split.example(i), max_len=max_len) for i in chunk], split.pad_id)


def num_batches(n_examples: int, batch_size: int, shuffle: bool, world_size: int = 1) -> int:
    """Batches per rank of :func:`iterate_batches`."""
    n = n_examples // batch_size if shuffle else -(-n_examples // batch_size)
    return -(-n // world_size)
