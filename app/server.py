"""Run the app under uvicorn with a draining SIGTERM: /ready turns 503, new API requests get 503,
in-flight ones finish (up to drain_timeout_s, and never for an engine that has failed), then the process
exits 0. An engine that cannot go on ends the process non-zero (app/supervisor.py)."""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
import threading
import time
from types import FrameType

import redis.asyncio as redis
import uvicorn
from sqlalchemy.exc import OperationalError

from app.api.app import create_app
from app.api.services import Services
from app.archive import Archive, ArchiveKeyError, MasterKeys
from app.auth import Authenticator, KeyStore, TokenService
from app.engine import Engine
from app.engine.loader import load_model
from app.engine.transformers_engine import TransformersEngine
from app.ledger import UsageLedger
from app.metrics import Metrics
from app.quota import LocalQuota, Quota
from app.quota.shared import SharedQuota
from app.safety import ContentFilter, WordListError
from app.settings import Settings
from app.store import open_database
from app.supervisor import Notifier, Supervisor


class _JSONFormatter(logging.Formatter):
    """One JSON object per line; structured fields come from `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = [handler]
        logging.getLogger(name).propagate = False
    # Our middleware writes the access log (without query strings or bodies).
    logging.getLogger("uvicorn.access").disabled = True


def chosen_engine(settings: Settings) -> str:
    if settings.engine != "auto":
        return settings.engine
    from app.engine.vllm_engine import vllm_available

    if settings.device == "cpu" or not vllm_available():
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def build_engine(services: Services) -> Engine:
    settings = services.settings
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    engine = chosen_engine(settings)
    logging.getLogger("app").info("loading model", extra={"fields": {"engine": engine}})
    if engine == "vllm":
        from app.engine.vllm_engine import VLLMEngine, VLLMOptions

        return VLLMEngine(
            VLLMOptions(
                model_path=settings.model_path,
                cache_dir=settings.model_cache_dir,
                compile_cache_dir=settings.compile_cache_dir,
                served_model_name=settings.served_model_name,
                dtype=settings.dtype,
                max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_batch_size,
                max_queued_requests=settings.max_queued_requests,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                tensor_parallel_size=settings.tensor_parallel_size,
                enable_prefix_caching=settings.enable_prefix_caching,
                cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
            ),
            services.metrics,
        )

    loaded = load_model(
        settings.model_path,
        cache_dir=settings.model_cache_dir,
        device=settings.device,
        dtype=settings.dtype,
        name=settings.served_model_name,
    )
    return TransformersEngine(
        loaded,
        services.metrics,
        max_batch_size=settings.max_batch_size,
        max_queued_requests=settings.max_queued_requests,
        context_length=settings.max_model_len,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
    )


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, services: Services) -> None:
        super().__init__(config)
        self.services = services
        self.supervisor = Supervisor(services, Notifier(), request_exit=self._exit_for_engine)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.services.draining:
            super().handle_exit(sig, frame)
            return
        self.services.draining = True
        logging.getLogger("app").info("draining", extra={"fields": {"in_flight": self.services.in_flight}})
        threading.Thread(target=self._drain_then_exit, name="drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.services.settings.drain_timeout_s
        while self.services.in_flight > 0 and time.monotonic() < deadline and not self._engine_failed():
            time.sleep(0.05)
        logging.getLogger("app").info("drained", extra={"fields": {"left": self.services.in_flight}})
        # Not recorded as a captured signal: uvicorn would re-raise SIGTERM after shutdown and exit 143.
        self.should_exit = True

    def _engine_failed(self) -> bool:
        # A failed engine has answered its requests with errors already; nothing is left to wait for.
        return self.services.engine is not None and self.services.engine.failure() is not None

    def _exit_for_engine(self, code: int) -> None:
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop ticks every 0.1 s.
        if counter % 10 == 0:
            self.supervisor.check()
        return await super().on_tick(counter)


def _token_service(settings: Settings) -> TokenService | None:
    if settings.jwt_keyring_file is None:
        return None
    return TokenService(
        settings.jwt_keyring_file,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_s=settings.jwt_ttl_s,
        max_ttl_s=settings.jwt_max_ttl_s,
    )


def _quota(settings: Settings, metrics: Metrics) -> Quota:
    if settings.redis_url is None:
        return LocalQuota()
    # Short timeouts: a Redis that hangs must not hold every request up; past them the node counts alone.
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return SharedQuota(client, LocalQuota(), metrics)


def _reload(services: Services) -> None:
    """SIGHUP (systemctl reload): the word lists and the archive's master keys are read again; what does not
    read leaves what was in force, and says so."""
    log = logging.getLogger("app")
    if services.content_filter is not None:
        services.content_filter.reload()
    if services.archive is not None and services.settings.archive_key_file is not None:
        try:
            master = MasterKeys.from_file(services.settings.archive_key_file)
        except ArchiveKeyError as exc:
            log.error("archive keys not reloaded, the previous ones stay in force: %s", exc)
        else:
            services.archive.use_keys(master)
            log.info("archive keys reloaded", extra={"fields": {"primary": master.primary_id}})


def _content_filter(settings: Settings, metrics: Metrics) -> ContentFilter | None:
    if not settings.sensitive_word_files:
        return None
    return ContentFilter(settings.sensitive_word_files, settings.sensitive_word_allow_files, metrics)


def serve(settings: Settings) -> int:
    configure_logging(settings.log_level)
    # A fatal signal (systemd's watchdog sends SIGABRT) leaves every thread's stack in the journal.
    faulthandler.enable()
    try:
        database = open_database(settings.keys_db, settings.database_url)
    except OperationalError as exc:
        # Not reachable yet (a database server starting too): systemd starts the app again.
        logging.getLogger("app").error("cannot open the database: %s", exc.orig)
        return 1
    auth: Authenticator | None = None
    if not settings.insecure_no_auth:
        keys = KeyStore(database)
        if keys.usable_count() == 0:
            logging.getLogger("app").error(
                "refusing to start: no usable API key in %s (none, or all revoked or expired): create one "
                "with 'python -m app keys create --name NAME --tenant TENANT --keys-db %s', "
                "or start with --insecure-no-auth for local development",
                settings.keys_db,
                settings.keys_db,
            )
            return 2
        auth = Authenticator(keys, _token_service(settings))
    ledger = UsageLedger(database, settings.node_name, settings.ledger_flush_interval_s)
    metrics = Metrics()
    try:
        content_filter = _content_filter(settings, metrics)
    except WordListError as exc:
        logging.getLogger("app").error("refusing to start: %s", exc)
        return 2
    archive = None
    if settings.archive_on:
        assert settings.archive_key_file is not None  # the settings check requires it
        archive = Archive(
            database,
            MasterKeys.from_file(settings.archive_key_file),
            settings.archive_retention_days,
            settings.ledger_flush_interval_s,
            metrics,
        )
    services = Services(
        settings=settings,
        metrics=metrics,
        auth=auth,
        ledger=ledger,
        quota=_quota(settings, metrics),
        content_filter=content_filter,
        archive=archive,
    )
    app = create_app(services, build_engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    server = DrainingServer(config, services)
    # Done off the signal handler: compiling large lists takes a moment, and requests go on meanwhile.
    signal.signal(
        signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(services,), name="reload", daemon=True).start()
    )
    server.run()
    return server.supervisor.exit_code
