"""Runtime settings: environment variables LORA_STUDIO_*, built once by the entry point, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
        description="default model: 'tiny', a diffusers directory, a single-file .safetensors checkpoint or a hub id "
        "(None: the backbone's own)",
    )
    device: str = Field(default="auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    dtype: str = Field(
        default="auto", description="'auto' (fp16 on cuda, fp32 on cpu), 'float32', 'float16', 'bfloat16'"
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        default="off",
        description="compile the denoiser with torch.compile in this mode ('reduce-overhead' adds CUDA graphs): "
        "the first render of a size compiles (minutes on a CPU), later ones run faster, and switching LoRAs or "
        "weights never recompiles; methods with per-sample weights (regional, clora) are refused while on",
    )
    compile_rank: int = Field(
        default=64, ge=1, description="with compile: the most LoRA rank active at once on one layer"
    )
    bundled: bool = Field(
        default=True, description="import the toy world's bundled concept adapters on first start"
    )
    previews_on_start: bool = Field(
        default=True,
        description="serve renders a preview for each LoRA of its family that has none, in the background",
    )
    max_resident_loras: int = Field(default=32, ge=1, description="LoRAs kept resident per pipeline (LRU)")
    max_upload_mb: int = Field(
        default=512, ge=1, description="largest LoRA file the REST API accepts, in MiB"
    )
    max_json_kb: int = Field(
        default=1024, ge=1, description="largest JSON request body the REST API reads, in KiB"
    )
    # render jobs (REST batches) and their executor
    executor: Literal["local", "ray"] = Field(
        default="local", description="'local' (worker threads in this process) or 'ray' (a Ray cluster)"
    )
    workers: int = Field(default=1, ge=1, description="render workers (threads, or Ray actors)")
    max_batch: int = Field(
        default=4,
        ge=1,
        description="consecutive compatible single-image requests of a job rendered in one pipeline call "
        "(1: each request alone)",
    )
    ray_address: str | None = Field(default=None, description="Ray cluster address (None: a local Ray)")
    max_queued_jobs: int = Field(default=100, ge=1, description="queued render jobs before 429")
    max_queued_jobs_per_key: int = Field(
        default=20, ge=1, description="queued render jobs of one API key before 429 (its share of the queue)"
    )
    max_job_megapixel_steps: float = Field(
        default=5000.0,
        gt=0,
        description="largest render job: width x height in megapixels x steps x images, summed over its "
        "requests (5000: about 160 SDXL images at 1024 px and 30 steps)",
    )
    job_max_attempts: int = Field(default=2, ge=1, description="runs of a job whose worker dies, at most")
    job_heartbeat_s: float = Field(default=2.0, gt=0, description="seconds between a worker's heartbeats")
    job_stale_after_s: float = Field(
        default=30.0, gt=0, description="a running job silent this long has lost its worker: requeued"
    )
    import_dir: Path | None = Field(
        default=None,
        description="server folder the admin page imports folders from (default: <data_dir>/import)",
    )
    studio_login: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="the studio at / asks for a username and password: 'auto' when serving beyond loopback, "
        "'always', or 'never' (serve --no-login)",
    )
    admin_session_hours: float = Field(default=12, gt=0, description="admin login lifetime, in hours")
    admin_login_attempts: int = Field(
        default=5, ge=1, description="failed admin logins per address and username before it must wait"
    )
    admin_login_window_s: float = Field(
        default=900, gt=0, description="how long a failed admin login counts against its address, in seconds"
    )

    @property
    def root(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def lora_dir(self) -> Path:
        return self.root / "loras"

    @property
    def import_root(self) -> Path:
        return (self.import_dir or self.root / "import").expanduser().resolve()

    @property
    def session_secret_path(self) -> Path:
        """The admin page's cookie-signing key, created on first start (mode 0600)."""
        return self.root / "session_secret"
