"""Service settings: environment variables (PLI_*), an optional YAML/JSON config file, then CLI flags."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# What is done with personal data in one direction (app/serving/safety.py): off; redact_stored: the model and
# the client see it, every log and stored record (the conversation archive) holds it redacted; redact: replaced
# by [PHONE], [ID], [CARD], [EMAIL] before the model (prompts) or the client (answers) sees it; block: a prompt
# is refused, an answer ends before it.
PiiMode = Literal["off", "redact_stored", "redact", "block"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLI_", extra="forbid")

    # Where settings come from: environment first, then this file (the Ansible role templates it).
    config_file: Path | None = Field(default=None, description="YAML or JSON file with any of these settings")

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=1, le=65535, description="port to listen on")

    model_path: str = Field(default="", description="HF folder or .gguf file; empty serves the embedded default")
    served_model_name: str | None = Field(default=None, description="model id clients send; defaults from the path")
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "private-llm" / "models",
        description="where converted GGUF models are cached",
    )
    compile_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "private-llm" / "compile",
        description="vllm: where compiled model code is kept, so that a restart loads it instead of compiling again",
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        default="auto",
        description="engine backend; auto: vllm when it is installed and a GPU is present, else transformers",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="sequences decoded together")
    max_queued_requests: int = Field(default=64, ge=0, description="waiting requests before 429")
    max_tokens_default: int = Field(default=512, ge=1, description="max_tokens when a request gives none")
    max_tokens_limit: int | None = Field(
        default=None, ge=1, description="longest answer in tokens; a larger max_tokens is clamped (finish: length)"
    )
    max_model_len: int | None = Field(default=None, ge=16, description="context limit (defaults to the model's)")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch")
    prefill_chunk_tokens: int = Field(
        default=512,
        ge=16,
        description="transformers: prompt tokens prefilled per engine step; longer prompts go in chunks "
        "between the running streams' decode steps",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vllm: fraction of GPU memory for weights and KV cache"
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs one model is split across")
    enable_prefix_caching: bool = Field(default=True, description="vllm: reuse KV blocks of shared prompt prefixes")
    cpu_kv_cache_gib: int = Field(default=4, ge=1, description="vllm on CPU: KV cache size in GiB")

    keys_db: Path = Field(default=Path("keys.db"), description="SQLite database of API key hashes and the usage ledger")
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL that several nodes share for keys and the ledger (postgresql://user:pass@host/db)"
        "; none: the SQLite keys_db",
    )
    insecure_no_auth: bool = Field(default=False, description="serve without API keys (local development only)")
    jwt_keyring_file: Path | None = Field(
        default=None,
        description="YAML keyring of HS256 signing keys for access tokens (POST /v1/auth/token); none: no tokens",
    )
    jwt_issuer: str = Field(default="private-llm", min_length=1, description="iss of issued and accepted tokens")
    jwt_audience: str = Field(default="private-llm", min_length=1, description="aud of issued and accepted tokens")
    jwt_ttl_s: int = Field(default=900, ge=60, description="lifetime of an issued access token unless asked shorter")
    jwt_max_ttl_s: int = Field(
        default=3600, ge=60, le=86_400, description="longest access token lifetime issued or accepted"
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis holding the quota counters every node shares (redis:// or rediss://); none: "
        "this node counts alone",
    )
    node_name: str = Field(
        default_factory=socket.gethostname, min_length=1, description="this node's name in the usage ledger"
    )
    ledger_flush_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="how often usage rows queued by requests are written"
    )

    sensitive_word_files: list[Path] = Field(
        default_factory=list,
        description="word lists (a term per line, # comments; the category is the file name without its suffix) "
        "whose terms are refused in prompts and cut from answers; read again on SIGHUP",
    )
    sensitive_word_allow_files: list[Path] = Field(
        default_factory=list,
        description="allowed terms: a longer word holding a listed term, which then is not blocked there",
    )

    pii_mode_prompt: PiiMode = Field(
        default="redact_stored",
        description="personal data (mobile numbers, resident ID numbers, bank cards, e-mail) in prompts: off; "
        "redact_stored: kept out of logs and stored records only; redact: replaced by [PHONE], [ID], [CARD], "
        "[EMAIL] before the model sees it; block: the request is refused (400 pii_detected)",
    )
    pii_mode_answer: PiiMode = Field(
        default="redact_stored",
        description="personal data in answers: off, redact_stored, redact (replaced before the client sees it), "
        "block (the answer ends before it, finish_reason content_filter)",
    )

    archive_enabled: bool = Field(
        default=False, description="keep every request's messages and answer in the encrypted archive"
    )
    archive_tenants: list[str] = Field(
        default_factory=list, description="tenants whose requests are archived (besides all, with archive_enabled)"
    )
    archive_key_file: Path | None = Field(
        default=None,
        description="the archive's master keys: one url-safe base64 32-byte key per line, the first the primary "
        "(python -m app archive keygen)",
    )
    archive_retention_days: int = Field(
        default=180, ge=1, description="days an archived record is kept; then its day's data key is destroyed"
    )

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="largest accepted request body")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: time allowed for in-flight requests")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 429 queue-full answers")
    engine_stall_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="an engine step that takes longer is taken for a hang: the process exits to be restarted",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def archive_on(self) -> bool:
        """Whether any request is archived: all of them, or those of the tenants named."""
        return self.archive_enabled or bool(self.archive_tenants)

    @model_validator(mode="after")
    def _check_paths(self) -> Settings:
        if self.model_path and not Path(self.model_path).exists():
            raise ValueError(f"model_path {self.model_path} does not exist")
        if self.database_url is not None:
            from app.store.database import server_url

            try:
                server_url(self.database_url)
            except ValueError as exc:
                raise ValueError(f"database_url: {exc}") from exc
        if self.sensitive_word_files or self.sensitive_word_allow_files:
            from app.safety import WordListError, read_word_file

            try:
                for path in [*self.sensitive_word_files, *self.sensitive_word_allow_files]:
                    read_word_file(path)
            except WordListError as exc:
                raise ValueError(str(exc)) from exc
        if self.archive_on:
            if self.archive_key_file is None:
                raise ValueError("archive_key_file: needed when archive_enabled or archive_tenants is set")
            from app.archive import ArchiveKeyError, MasterKeys

            try:
                MasterKeys.from_file(self.archive_key_file)
            except ArchiveKeyError as exc:
                raise ValueError(f"archive_key_file: {exc}") from exc
        if self.jwt_keyring_file is not None:
            from app.auth.tokens import KeyringError, load_keyring

            try:
                load_keyring(self.jwt_keyring_file)
            except KeyringError as exc:
                raise ValueError(f"jwt_keyring_file: {exc}") from exc
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls, init_settings, env_settings)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by config_file (given on the command line or as PLI_CONFIG_FILE)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._init = init_settings
        self._env = env_settings

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self._init().get("config_file") or self._env().get("config_file")
        if not path:
            return {}
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return {key.replace("-", "_"): value for key, value in data.items()}
