"""Resolve a model argument (embedded name, local directory, hub id) and load it safely.

Safety: weights load from safetensors only and `trust_remote_code` stays off unless the user asks;
the architecture is checked against the family registry from `config.json` before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config_check import CheckpointConfig, validate_config
from .embedded import EMBEDDED, materialize
from .spec import FamilySpec, family_for

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]


def resolve_checkpoint(source: str) -> Path:
    """Return a local checkpoint directory for an embedded name, a local path or a hub id."""
    if source in EMBEDDED:
        return materialize(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"'{source}' is a directory without config.json: not a HF checkpoint")
        return path
    if path.exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise CheckpointError(
            f"'{source}' is not a checkpoint directory, a hub id (org/name) or an embedded model "
            f"({', '.join(sorted(EMBEDDED))})"
        )
    return _download(source)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot fetch '{repo_id}' from the Hugging Face Hub ({reason[:160]}); "
            "if you have it on disk, pass the local checkpoint directory instead"
        ) from None


def read_family(path: Path) -> tuple[CheckpointConfig, FamilySpec]:
    """Read config.json as plain JSON (no code runs), check its sizes and find its family, or raise naming it."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"cannot read {file}: not UTF-8 text") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(config, dict) and not model_type:
        raise CheckpointError(f"{file} has no model_type")
    if isinstance(config, dict) and not isinstance(model_type, str):
        raise CheckpointError(f"{file}: model_type must be a string, got {model_type!r:.60}")
    family = family_for(model_type) if isinstance(config, dict) else None  # an unknown family: say that first
    return validate_config(config, file), family


def check_safetensors(path: Path) -> None:
    """Open each safetensors file's header (sizes, offsets, JSON) before transformers reads it."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file ({str(exc).splitlines()[0][:160]}); "
                                  "download or convert it again") from None


def check_weights_are_safe(path: Path, trust_remote_code: bool) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(ext))
    if pickles and not trust_remote_code:
        raise CheckpointError(
            f"{path} has only pickle weights ({pickles[0]}): loading them could run code from the checkpoint; "
            "convert them to safetensors, or pass --trust-remote-code if you trust this checkpoint"
        )
    if not pickles:
        raise CheckpointError(f"{path} has no weights (*.safetensors)")


def load_model(path: Path, dtype: str = "fp32", trust_remote_code: bool = False, **kwargs) -> torch.nn.Module:
    """Load a causal LM from a resolved checkpoint directory in eval mode. Every weight must come from the
    checkpoint: transformers would initialise missing ones at random, and the build would be garbage."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    read_family(path)
    check_weights_are_safe(path, trust_remote_code)
    check_safetensors(path)
    from transformers.utils import logging as hf_logging

    # transformers' "Loading weights" bar and its LOAD REPORT table (missing/unexpected tensors, as warnings) would
    # precede the one line below: moe-compile refuses those itself. The path is local: no download bar is lost.
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=DTYPES[dtype],
            use_safetensors=not trust_remote_code,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load {path}: {str(exc).strip().splitlines()[0][:300]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    for kind in ("missing", "unexpected", "mismatched"):
        names = sorted(str(name) for name in info.get(f"{kind}_keys") or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise CheckpointError(f"{path}'s weights do not match its config.json: {len(names)} {kind} tensors "
                                  f"({shown}); the checkpoint is incomplete or from another model")
    return model.eval()
