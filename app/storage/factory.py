"""Building the configured backend: the one place that knows both backends by name."""

from __future__ import annotations

from app.config import Config, ConfigError, spool_dir
from app.storage import Storage


def make_storage(config: Config) -> Storage:
    """Build the backend STORAGE_BACKEND names."""
    if config.storage_backend == "fs":
        from app.storage.fs import FilesystemStorage

        return FilesystemStorage(config.fs_root, skip=spool_dir(config))
    if config.storage_backend == "s3":
        from app.storage.s3 import S3Storage

        return S3Storage.from_config(config)
    raise ConfigError("STORAGE_BACKEND", config.storage_backend, "allowed values are s3, fs")
