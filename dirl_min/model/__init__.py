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

Modules: :mod:`~dirl_min.model.tokenizers` (tiny and Qwen tokenizers, a checkpoint's tokenizer,
chat prompts, stop tokens; the chat template is ``qwen3_chat_template.jinja``),
:mod:`~dirl_min.model.checkpoints` (load, save, checkpoint folders, the block size / mask token
settings, dtype), :mod:`~dirl_min.model.tiny` (the tiny model); checkpoints are written
atomically by :mod:`dirl_min.infra.atomic`. This package re-exports their public names.
:mod:`~dirl_min.model.forward` (the backend seam: the backbone driven with dirl_min's masks) is
imported as its own module.
"""

from dirl_min.model.checkpoints import (
    SDAR_ONLY_FIELDS,
    TRAIN_CHECKPOINT_MODEL_DIR,
    TRAINER_STATE_FILE,
    checkpoint_folder,
    diffusion_settings,
    load_model,
    resolve_dtype,
    save_model,
)
from dirl_min.model.tiny import build_tiny
from dirl_min.model.tokenizers import (
    QWEN3_CHAT_TEMPLATE,
    QWEN_ADDED_TOKENS,
    SDAR_MASK_TOKEN_ID,
    build_tiny_tokenizer,
    chat_prompt_ids,
    qwen_tokenizer,
    stop_token_ids,
)

__all__ = [
    "QWEN3_CHAT_TEMPLATE",
    "QWEN_ADDED_TOKENS",
    "SDAR_MASK_TOKEN_ID",
    "SDAR_ONLY_FIELDS",
    "TRAIN_CHECKPOINT_MODEL_DIR",
    "TRAINER_STATE_FILE",
    "build_tiny_tokenizer",
    "build_tiny",
    "checkpoint_folder",
    "load_model",
    "save_model",
    "qwen_tokenizer",
    "chat_prompt_ids",
    "stop_token_ids",
    "resolve_dtype",
    "diffusion_settings",
]
