"""SDAR / Qwen3 checkpoints: load as plain transformers classes, save (SDAR's format kept), find the
folder; the block-diffusion settings a model carries and the dtype setting.

SDAR checkpoints use Qwen3 parameter names, so they load into ``Qwen3ForCausalLM`` /
``Qwen3MoeForCausalLM`` without running the checkpoint's own Python code (no ``trust_remote_code``).
Pickled weights are refused. ``model.config.block_size`` and ``model.config.mask_token_id`` are the
single source of truth for the block grid and the mask token; :func:`diffusion_settings` reads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dirl_min.infra.atomic import atomic_dir
from dirl_min.infra.errors import ModelError
from dirl_min.model.tokenizers import load_tokenizer

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


def _config_from_sdar_dict(cfg: dict):
    """Qwen3Config / Qwen3MoeConfig from an SDAR config.json dict (SDAR-only fields dropped)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    kwargs = {k: v for k, v in cfg.items() if k not in SDAR_ONLY_FIELDS}
    if "torch_dtype" in kwargs:  # transformers 5 name
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    cls = Qwen3MoeConfig if cfg.get("model_type") == "sdar_moe" else Qwen3Config
    return cls(**kwargs)


def resolve_dtype(name: str, *, cuda: bool | None = None) -> torch.dtype:
    """A dtype setting: ``auto`` = bfloat16 on a GPU (``cuda``, default: if one is available), else float32."""
    if name == "auto":
        return torch.bfloat16 if (torch.cuda.is_available() if cuda is None else cuda) else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {name!r}")
    return table[name]


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



def _config_and_class(path: Path, cfg_dict: dict):
    """The transformers config and model class for a checkpoint's config.json dict, without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg_dict.get("model_type")
    if model_type in _SDAR_TYPES:
        config = _config_from_sdar_dict(cfg_dict)
        return config, (Qwen3MoeForCausalLM if model_type == "sdar_moe" else Qwen3ForCausalLM)
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        return config, AutoModelForCausalLM
    raise ValueError(
        f"this checkpoint needs its own Python code (auto_map {cfg_dict.get('auto_map')!r}, "
        f"model_type {model_type!r} unknown to transformers); dirl_min loads only SDAR "
        "('sdar', 'sdar_moe') and transformers-native models, without trust_remote_code"
    )


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


def _read_config(file: Path) -> dict:
    """A checkpoint's config.json as a dict; :class:`ModelError` naming the file if it is not one."""
    try:
        cfg_dict = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(cfg_dict, dict):
        raise ModelError(f"{file}: expected a JSON object, got {type(cfg_dict).__name__}")
    return cfg_dict


def _check_headers(files: list[Path]) -> None:
    """Read each safetensors file's header (not its tensors): a truncated or corrupt file is named here,
    not deep inside transformers."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # SafetensorError, OSError: the message says which
            raise ModelError(f"{f}: not a readable safetensors file ({e})") from None


def _check_weights(path: Path) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files) or "model.safetensors.index.json" in files:
        _check_headers(sorted(path / f for f in files if f.endswith(".safetensors")))
        return
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(
            f"{path} holds only pickled weights ({', '.join(pickles)}); dirl_min loads only *.safetensors "
            "because loading pickles can run arbitrary code. Convert them to safetensors in a trusted "
            "environment (e.g. load there and save with safetensors.torch.save_file / save_pretrained)."
        )
    raise ModelError(f"{path} has no weights (*.safetensors or model.safetensors.index.json)")


#: the subfolder of a ``dirl_min.train`` checkpoint (``<ckpt>/model`` + ``<ckpt>/trainer_state.pt``)
TRAIN_CHECKPOINT_MODEL_DIR = "model"
#: the file of a ``dirl_min.train`` checkpoint that holds optimizer, scheduler, RNG and data cursor
TRAINER_STATE_FILE = "trainer_state.pt"


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
    raise ModelError(f"{path} is not a checkpoint folder: it {what}, and there is no {inner}/config.json "
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
    path = checkpoint_folder(path)
    cfg_dict = _read_config(path / "config.json")
    model_type = cfg_dict.get("model_type")
    config, model_cls = _config_and_class(path, cfg_dict)
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
        raise ModelError(f"weights in {path} do not match the {type(model).__name__} architecture: {problems}")
    # Restore after from_pretrained (which may rebuild the config object).
    model.config.block_size, model.config.mask_token_id = bs, mask_id
    if device is not None:
        model.to(device)
    model.eval()
    if model_type in _SDAR_TYPES:
        model._dirl_sdar_config = cfg_dict
        model._dirl_source_dir = str(path.resolve())
    tokenizer = load_tokenizer(path, mask_id)
    diffusion_settings(model)
    return model, tokenizer


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
            state dict of a sharded model, :func:`dirl_min.infra.sharding.full_state_dict`).

    Returns:
        Path: ``path``.
    """
    diffusion_settings(model)
    path = Path(path)
    sdar = getattr(model, "_dirl_sdar_config", None)
    with atomic_dir(path) as tmp:
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
