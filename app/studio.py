"""The Studio: the one service object that wires catalog, backbones, adapters and rendering together."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import PngImagePlugin
from sqlalchemy.orm import Session

import toyworld
from app.accounts import Accounts
from app.bundled import import_bundled
from app.library import AdapterInfo, Library
from app.settings import Settings
from composer.adapters import blora
from composer.adapters.host import AdapterHost
from composer.backbones import TINY, Backbone, get_backbone, load_pipeline
from composer.errors import FamilyMismatchError, StudioError
from composer.formats.readers import read_lora
from composer.methods import METHODS, params_to_json
from composer.render import Progress, RenderRequest, render_batch
from db.errors import AdapterNotFoundError
from db.repository import RenderRepository
from db.session import default_sqlite_url, make_engine, make_session_factory, unit_of_work, upgrade

log = logging.getLogger(__name__)


@dataclass
class RenderResult:
    images: list  # PIL images
    provenance: dict
    render_id: int
    paths: list[Path] = field(default_factory=list)
    pictures: list = field(default_factory=list)  # (caption, PIL image): what the method used, e.g. masks


@dataclass
class _Loaded:
    pipe: object
    host: AdapterHost
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)  # sha256, LRU order


def resolve_backbone(name: str, model: str | None) -> tuple[Backbone, str]:
    """A backbone name as users type it, and the model to load: "toy" is SDXL with the shipped toy model;
    "sdxl" and "flux" default to their tiny random-weight variants."""
    if name == "toy":  # measured best guidance for the toy model (docs/BENCHMARKS.md)
        return replace(get_backbone("sdxl"), default_guidance=7.5), str(model or toyworld.model_dir())
    return get_backbone(name), str(model or TINY)


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]
    except KeyError:
        raise ValueError(f"unknown dtype {setting!r}: float32, float16 or bfloat16") from None


class Studio:
    """Catalog + pipelines. Build one per process with `Studio.open(settings)`."""

    def __init__(self, settings: Settings, library: Library, sessions):
        self.settings = settings
        self.library = library
        self.sessions = sessions
        self.accounts = Accounts(sessions)
        self._pipelines: dict[tuple[str, str], _Loaded] = {}

    @classmethod
    def open(cls, settings: Settings) -> Studio:
        """Create the data dir, migrate the catalog to head, and return a ready Studio."""
        settings.root.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url or default_sqlite_url(settings.root))
        upgrade(engine)
        sessions = make_session_factory(engine)
        library = Library(sessions, settings.lora_dir)
        if settings.bundled:
            import_bundled(library, toyworld.loras_dir(), settings.root / "bundled.json")
        return cls(settings, library, sessions)

    def composition_methods(self) -> dict[str, type]:
        """The registered composition methods: name -> parameters dataclass (`composer.methods.METHODS`)."""
        return dict(METHODS)

    # --- pipelines ------------------------------------------------------------------------------------
    def pipeline(self, backbone: str, model: str | None = None) -> _Loaded:
        bb, model = resolve_backbone(backbone, model)
        key = (backbone, model)
        if key not in self._pipelines:
            device = resolve_device(self.settings.device)
            pipe = load_pipeline(bb, model, dtype=resolve_dtype(self.settings.dtype, device), device=device)
            self._pipelines[key] = _Loaded(pipe, AdapterHost.for_pipeline(pipe, bb))
        return self._pipelines[key]

    def resident_loras(self) -> set[str]:
        """SHA-256 of every LoRA file resident in a loaded pipeline (a B-LoRA half by its file's hash)."""
        return {key.partition("#")[0] for loaded in self._pipelines.values() for key in loaded.resident}

    def resolve_lora(self, name: str) -> tuple[AdapterInfo, str | None]:
        """A stack entry: a catalog name, or NAME.content / NAME.style for one half of a B-LoRA.

        Raises:
            AdapterNotFoundError: no such adapter (close names suggested).
            StudioError: a half asked of an adapter that is not a B-LoRA.
        """
        try:
            return self.library.get(name), None
        except AdapterNotFoundError:
            stem, dot, role = name.rpartition(".")
            if not dot or role not in blora.ROLES:
                raise
            try:
                info = self.library.get(stem)
            except AdapterNotFoundError:
                raise AdapterNotFoundError(
                    f"no adapter named {name!r}, nor a B-LoRA named {stem!r} to take the {role} half of",
                    name,
                    [],
                ) from None
            if info.adapter_type != "blora":
                raise StudioError(
                    f"{stem!r} is a {info.adapter_type} adapter, not a B-LoRA; it has no {role} half"
                ) from None
            return info, role

    def _make_resident(self, loaded: _Loaded, entries: list[tuple[AdapterInfo, str | None]]) -> list[str]:
        """Make the entries resident (LRU beyond max_resident_loras); their resident names, in order."""
        keys = []
        for info, role in entries:
            key = info.sha256 if role is None else f"{info.sha256}#{role}"
            keys.append(key)
            if key in loaded.resident:
                loaded.resident.move_to_end(key)
                continue
            lora = read_lora(Path(info.file_path))
            loaded.host.add(key, lora if role is None else blora.half(lora, role))
            loaded.resident[key] = None
        evictable = [k for k in loaded.resident if k not in set(keys)]  # least recently used first
        for victim in evictable[: max(0, len(loaded.resident) - self.settings.max_resident_loras)]:
            loaded.host.remove(victim)
            del loaded.resident[victim]
        return keys

    # --- rendering ------------------------------------------------------------------------------------
    def render(
        self,
        request: RenderRequest,
        backbone: str | None = None,
        model: str | None = None,
        out: Path | None = None,
        progress: Progress | None = None,
        on_record: Callable[[Session, RenderResult], None] | None = None,
    ) -> RenderResult:
        """Resolve the LoRAs, make them resident, render, record provenance, optionally save PNGs.

        `on_record(session, result)` runs inside the transaction that records the render, so what it writes
        commits together with the render record, or neither does (render jobs record results so).

        Raises:
            AdapterNotFoundError: a LoRA name is not in the catalog (close names suggested).
            FamilyMismatchError: a LoRA is for another family than the backbone.
            StudioError: the request is invalid.
        """
        hook = None if on_record is None else lambda session, _i, result: on_record(session, result)
        outs = None if out is None else [out]
        return self.render_batch([request], backbone, model, outs, progress, hook)[0]

    def render_batch(
        self,
        requests: Sequence[RenderRequest],
        backbone: str | None = None,
        model: str | None = None,
        outs: Sequence[Path] | None = None,
        progress: Progress | None = None,
        on_record: Callable[[Session, int, RenderResult], None] | None = None,
    ) -> list[RenderResult]:
        """`render` for requests of one `composer.render.batch_key`, in one pipeline call: the LoRAs resolved
        once, then each request recorded as `render` records it (its PNGs at `outs[i]`), each in its own
        transaction with `on_record(session, i, result)`, so a request is recorded with its result or not.

        Raises:
            as `render`.
        """
        if not requests:
            raise StudioError("no requests to render")
        if outs is not None and len(outs) != len(requests):
            raise StudioError(f"{len(outs)} output paths for {len(requests)} requests")
        for request in requests:
            request.validate()
        backbone = backbone or self.settings.backbone
        bb, model = resolve_backbone(backbone, model or self.settings.model)
        stack = requests[0].loras
        entries = [self.resolve_lora(lw.name) for lw in stack]
        infos = [info for info, _ in entries]
        for info in infos:
            if info.family != bb.family:
                raise FamilyMismatchError(
                    f"LoRA {info.name!r} is for {info.family}; the backbone is {bb.family}"
                )
        loaded = self.pipeline(backbone, model)
        keys = self._make_resident(loaded, entries)
        names = {lw.name: key for lw, key in zip(stack, keys, strict=True)}
        pictures: list = []
        images = render_batch(
            loaded.pipe,
            bb,
            loaded.host,
            requests,
            adapter_names=names,
            progress=progress,
            pictures=pictures,
            triggers={lw.name: info.trigger_words for lw, info in zip(stack, infos, strict=True)},
        )
        results = []
        for i, request in enumerate(requests):
            n = request.num_images
            mine = images[i * n : (i + 1) * n]
            provenance = {
                "backbone": backbone,
                "model": str(model),
                "method": request.method,
                "method_params": params_to_json(request.params()),
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt,
                "seed": request.seed,
                "num_inference_steps": request.num_inference_steps or bb.default_steps,
                "guidance_scale": bb.default_guidance
                if request.guidance_scale is None
                else request.guidance_scale,
                "height": mine[0].height,
                "width": mine[0].width,
                "loras": [
                    {"name": lw.name, "sha256": info.sha256, "autov2": info.autov2, "weight": lw.weight}
                    for info, lw in zip(infos, request.loras, strict=True)
                ],
            }
            paths = save_images(mine, outs[i], provenance) if outs is not None else []
            with unit_of_work(self.sessions) as session:
                record = RenderRepository(session).add(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt,
                    backbone=backbone,
                    model=str(model),
                    method=request.method,
                    params={
                        k: provenance[k]
                        for k in ("num_inference_steps", "guidance_scale", "height", "width", "method_params")
                    },
                    seed=request.seed,
                    loras=[
                        {"name": x["name"], "sha256": x["sha256"], "weight": x["weight"]}
                        for x in provenance["loras"]
                    ],
                    output_path=str(paths[0]) if paths else None,
                    status="done",
                )
                result = RenderResult(mine, provenance, record.id, paths, pictures)
                if on_record is not None:
                    on_record(session, i, result)
            results.append(result)
        return results


def save_images(images: list, out: Path, provenance: dict) -> list[Path]:
    """PNG files with the provenance as JSON text (key "lora_studio") and A1111-style "parameters"."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    loras = " ".join(f"<lora:{x['name']}:{x['weight']}>" for x in provenance["loras"])
    a1111 = (
        f"{provenance['prompt']} {loras}".strip()
        + f"\nNegative prompt: {provenance['negative_prompt']}\nSteps: {provenance['num_inference_steps']}, "
        + f"CFG scale: {provenance['guidance_scale']}, Seed: {provenance['seed']}, "
        + f"Size: {provenance['width']}x{provenance['height']}, Model: {provenance['model']}"
    )
    paths = []
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
        info = PngImagePlugin.PngInfo()
        info.add_text("lora_studio", json.dumps(provenance, sort_keys=True))
        info.add_text("parameters", a1111)
        image.save(path, format="PNG", pnginfo=info)
        paths.append(path)
    return paths
