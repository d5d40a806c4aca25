"""Runtime settings: environment variables LORA_STUDIO_*, built once by the entry point, never at import."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORA_STUDIO_", extra="ignore")

    data_dir: Path = Field(
        default=Path("~/.lora-studio"), description="catalog, stored LoRA files and renders"
    )
    database_url: str | None = Field(default=None, description="default: SQLite file in data_dir")
    backbone: str = Field(default="toy", description="default backbone: 'toy' (bundled), 'sdxl' or 'flux'")
    model: str | None = Field(
        default=None,
        description="default model: 'tiny', a diffusers directory or a hub id (None: the backbone's own)",
    )
    device: str = Field(default="auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    dtype: str = Field(
        default="auto", description="'auto' (fp16 on cuda, fp32 on cpu), 'float32', 'float16', 'bfloat16'"
    )
    bundled: bool = Field(
        default=True, description="import the toy world's bundled concept adapters on first start"
    )
    max_resident_loras: int = Field(default=32, ge=1, description="LoRAs kept resident per pipeline (LRU)")
    max_upload_mb: int = Field(
        default=512, ge=1, description="largest LoRA file the REST API accepts, in MiB"
    )

    @property
    def root(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def lora_dir(self) -> Path:
        return self.root / "loras"
