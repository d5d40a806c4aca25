"""The Studio: the one service object that wires catalog, backbones, adapters and rendering together."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

import toyworld
from app.accounts import Accounts
from app.bundled import import_bundled
from app.catalog import JobInfo, JobPage, RenderInfo, RenderPage
from app.facade import SamplingDefaults
from app.finder import NEAR_DUPLICATE, Finder, Hit, with_triggers
from app.gates import GateSetInfo, GateStore, default_caption, resolve_gate_set
from app.jobs.board import JobBoard
from app.library import AdapterInfo, Library
from app.rendering import (
    RenderResult,
    name_lora,
    render_errors,
    resolve_backbone,
    resolve_device,
    resolve_dtype,
    save_images,
)
from app.settings import Settings
from app.training import TrainingRuns, TrainOutcome
from composer.adapters import blora
from composer.adapters.host import AdapterHost
from composer.adapters.registry import trainable_kinds
from composer.adapters.static import compile_denoiser
from composer.backbones import TINY, load_pipeline
from composer.errors import FamilyMismatchError, OverBudgetError, StudioError
from composer.formats.readers import read_lora
from composer.formats.safetensors_io import FileHashes, file_hashes
from composer.gates import StoredGates
from composer.methods import METHODS, missing_trigger, params_to_json
from composer.render import LoraWeight, Progress, RenderRequest, render_batch, sampling_defaults
from composer.train import TrainConfig, load_images
from composer.train.data import count_images
from composer.train.gates import train_gates
from composer.train.loop import Progress as TrainProgress
from db.errors import AdapterNotFoundError, CatalogError
from db.repository import RenderRepository
from db.session import default_sqlite_url, make_engine, make_session_factory, unit_of_work, upgrade

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    pipe: object
    host: AdapterHost
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)  # sha256, LRU order


def _profile_key(model: str, role: str | None) -> str:
    """Where an entry keeps its frequency profile for a base model (a B-LoRA half under its own key)."""
    return model if role is None else f"{model}#{role}"


def _resident_key(info: AdapterInfo, role: str | None) -> str:
    """The name a catalog entry (or one B-LoRA half) is resident under: its file hash (#role)."""
    return info.sha256 if role is None else f"{info.sha256}#{role}"


def check_family(info: AdapterInfo, backbone: str, family: str) -> None:
    """Raises FamilyMismatchError unless the adapter is for the backbone's family."""
    if info.family != family:
        raise FamilyMismatchError(
            f"LoRA {info.name!r} is for {info.family}; the backbone {backbone!r} is {family}"
        )


class Studio:
    """Catalog, pipelines, rendering, training and render jobs: the one service object every front end talks
    to (typed as `app.facade.StudioFacade`). Build one per process with `Studio.open(settings)`.

    Every entry that uses a pipeline holds the Studio's lock, so a pipeline is never used by two threads at
    once; a job worker renders through its own `view()` (its own pipelines and lock)."""

    def __init__(self, settings: Settings, library: Library, sessions):
        self.settings = settings
        self.library = library
        self.sessions = sessions
        self.accounts = Accounts(sessions)
        self.jobs = JobBoard(settings, sessions, self.check_requests)
        self.training = TrainingRuns(settings, library, self.pipeline)
        self.gates = GateStore(sessions)  # gated fusion's trained gates per LoRA set and base model
        self._pipelines: dict[tuple[str, str], _Loaded] = {}
        self._lock = threading.RLock()  # one pipeline user at a time (re-entered: render -> pipeline)
        self._finders: dict[tuple[str, str | None], Finder] = {}
        self.imported_on_open: list[str] = []  # bundled adapters `open` imported (serve's start-up summary)

    @classmethod
    def open(cls, settings: Settings) -> Studio:
        """Create the data dir, migrate the catalog to head, and return a ready Studio."""
        settings.root.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url or default_sqlite_url(settings.root))
        upgrade(engine)
        sessions = make_session_factory(engine)
        library = Library(sessions, settings.lora_dir)
        imported = []
        if settings.bundled:
            imported = import_bundled(library, toyworld.loras_dir(), settings.root / "bundled.json")
        studio = cls(settings, library, sessions)
        studio.imported_on_open = imported
        return studio

    def view(self) -> Studio:
        """The same catalog, sessions and job board's table, with pipelines (and a lock) of its own: what a
        render worker renders through, so that no pipeline is shared between threads."""
        return Studio(self.settings, self.library, self.sessions)

    # --- pipelines ------------------------------------------------------------------------------------
    def pipeline(self, backbone: str, model: str | None = None) -> _Loaded:
        bb, model = resolve_backbone(backbone, model)
        key = (backbone, model)
        with self._lock:
            if key not in self._pipelines:
                device = resolve_device(self.settings.device)
                pipe = load_pipeline(
                    bb, model, dtype=resolve_dtype(self.settings.dtype, device), device=device
                )
                host = AdapterHost.for_pipeline(pipe, bb)
                if self.settings.compile != "off":
                    compile_denoiser(pipe, bb, host, self.settings.compile_rank, self.settings.compile)
                self._pipelines[key] = _Loaded(pipe, host)
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

    def resolve_stack(self, request: RenderRequest) -> list[tuple[AdapterInfo, str | None]]:
        """`resolve_lora` for each LoRA of the request's stack; an unknown name that came from a prompt tag is
        refused naming the tag.

        Raises:
            AdapterNotFoundError, StudioError: as `resolve_lora`.
        """
        tagged = {lw.name: lw for lw in request.prompt_tags}
        entries = []
        for lw in request.loras:
            try:
                entries.append(self.resolve_lora(lw.name))
            except AdapterNotFoundError as exc:
                if lw.name not in tagged:
                    raise
                tag = f"<lora:{lw.name}:{tagged[lw.name].weight:g}>"
                raise AdapterNotFoundError(f"prompt tag {tag}: {exc}", exc.ref, exc.suggestions) from None
        return entries

    def _make_resident(self, loaded: _Loaded, entries: list[tuple[AdapterInfo, str | None]]) -> list[str]:
        """Make the entries resident (LRU beyond max_resident_loras); their resident names, in order."""
        keys = []
        for info, role in entries:
            key = _resident_key(info, role)
            keys.append(key)
            if key in loaded.resident:
                loaded.resident.move_to_end(key)
                continue
            lora = read_lora(Path(info.file_path))
            try:
                loaded.host.add(key, lora if role is None else blora.half(lora, role))
            except StudioError as exc:  # the host knows the file hash; the user knows the name
                name_lora(exc, key, info.name)
                raise
            loaded.resident[key] = None
        evictable = [k for k in loaded.resident if k not in set(keys)]  # least recently used first
        for victim in evictable[: max(0, len(loaded.resident) - self.settings.max_resident_loras)]:
            loaded.host.remove(victim)
            del loaded.resident[victim]
        return keys

    # --- finding LoRAs (app.finder) -------------------------------------------------------------------
    def finder(self, backbone: str | None = None, model: str | None = None) -> Finder:
        """Search for a base model's LoRAs (default: the served one's)."""
        backbone = backbone or self.settings.backbone
        model = model or self.settings.model
        key = (backbone, model)
        if key not in self._finders:
            bb, path = resolve_backbone(backbone, model)
            self._finders[key] = Finder(
                self.library,
                bb.family,
                path,
                lambda: self.pipeline(backbone, model),
                self._lock,
                ready=lambda: (backbone, path) in self._pipelines,
            )
        return self._finders[key]

    def search_loras(
        self, query: str, mode: str = "hybrid", limit: int = 20, *, tag=None, adapter_type=None
    ) -> list[Hit]:
        """The served model's LoRAs for a query: "hybrid" (full text and weights fused), "text" or
        "weights" (`app.finder`)."""
        return self.finder().search(query, mode, limit, tag=tag, adapter_type=adapter_type)

    def similar_loras(self, ref: str, limit: int = 10) -> list[tuple[AdapterInfo, float]]:
        return self.finder().similar(ref, limit)

    def near_duplicates(self) -> dict | None:
        """{"threshold", "groups": [{"names", "cosine"}]}: entries whose weights do nearly the same (one concept
        in two files); None when the served model has no LoRA encoder."""
        finder = self.finder()
        if not finder.available():
            return None
        return {"threshold": NEAR_DUPLICATE, "groups": finder.near_duplicates()}

    def auto_stack(
        self,
        prompt: str,
        k: int,
        backbone: str | None = None,
        model: str | None = None,
        stacked: Sequence[str] = (),
    ) -> tuple[str, list[tuple[str, float]], list[dict]]:
        """Auto mode: (the prompt with the picks' trigger words, the picks to add at weight 1, those already
        `stacked` left out, the picks as reported: name, score and each side's score)."""
        hits = self.finder(backbone, model).pick(prompt, k)
        if not hits:
            raise StudioError(f"auto mode found no LoRA for {prompt!r} in the catalog")
        report = [
            {
                "name": h.info.name,
                "score": h.score,
                "text_score": h.text_score,
                "weight_score": h.weight_score,
            }
            for h in hits
        ]
        added = [(h.info.name, 1.0) for h in hits if h.info.name not in stacked]
        return with_triggers(prompt, [h.info for h in hits]), added, report

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

    def _stored_profiles(self, request: RenderRequest, union: dict, model: str) -> dict[str, dict]:
        """The stack's stored frequency profiles for this base model, for a method that orders by them."""
        if not type(request.params()).needs_profiles:
            return {}
        out = {}
        for name, (info, role) in union.items():
            stored = self.library.frequency_profile(info, _profile_key(model, role))
            if stored is not None:
                out[name] = stored
        return out

    def _store_new_profiles(self, union: dict, profiles: dict[str, dict], model: str) -> None:
        """Keep the profiles a render measured with their catalog entries (the next render reuses them)."""
        for name, profile in profiles.items():
            info, role = union[name]
            key = _profile_key(model, role)
            if self.library.frequency_profile(info, key) is None:
                self.library.set_frequency_profile(info.name, key, profile, info.sha256)  # the file measured

    def _stored_gates(
        self, request: RenderRequest, union: dict, backbone: str, model: str
    ) -> StoredGates | None:
        """The stack's trained gates for this base model (gated), or None when the set has none."""
        if not type(request.params()).needs_gates:
            return None
        entries = [(name, _resident_key(info, role)) for name, (info, role) in union.items()]
        return self.gates.find(backbone, model, entries)

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
        resolved: dict[tuple, list[tuple[AdapterInfo, str | None]]] = {}  # each distinct stack looked up once
        for request in requests:  # a merge batch: each request its own LoRAs
            if request.loras not in resolved:
                resolved[request.loras] = self.resolve_stack(request)
        stacks = [resolved[request.loras] for request in requests]
        union: dict[str, tuple[AdapterInfo, str | None]] = {}  # catalog name -> (entry, B-LoRA half)
        for request, entries in zip(requests, stacks, strict=True):
            for lw, entry in zip(request.loras, entries, strict=True):
                union.setdefault(lw.name, entry)
        for info, _ in union.values():
            check_family(info, backbone, bb.family)
        pictures: list = []
        first = requests[0]
        users = {_resident_key(info, role): name for name, (info, role) in union.items()}
        setting = (
            f"{backbone} {model}, {first.width or 'default'}x{first.height or 'default'}, {first.method}"
        )
        with self._lock, render_errors(users, setting, progress) as relay:
            loaded = self.pipeline(backbone, model)
            keys = self._make_resident(loaded, list(union.values()))
            names = dict(zip(union, keys, strict=True))
            profiles = self._stored_profiles(first, union, str(model))
            report: dict = {}  # what the method says about the call (gated: trained gates or not)
            images = render_batch(
                loaded.pipe,
                bb,
                loaded.host,
                requests,
                adapter_names=names,
                progress=relay,
                pictures=pictures,
                triggers={name: info.trigger_words for name, (info, _) in union.items()},
                profiles=profiles,
                gates=self._stored_gates(first, union, backbone, str(model)),
                report=report,
            )
        self._store_new_profiles(union, profiles, str(model))
        results = []
        for i, request in enumerate(requests):
            infos = [info for info, _ in stacks[i]]
            n = request.num_images
            mine = images[i * n : (i + 1) * n]
            steps, guidance = sampling_defaults(request, bb)
            provenance = {
                "backbone": backbone,
                "model": str(model),
                "method": request.method,
                "method_params": params_to_json(request.params()),
                "prompt": request.prompt,
                "prompt_tags": [{"name": lw.name, "weight": lw.weight} for lw in request.prompt_tags],
                "negative_prompt": request.negative_prompt,
                "seed": request.seed,
                "num_inference_steps": steps,
                "guidance_scale": guidance,
                "height": mine[0].height,
                "width": mine[0].width,
                "loras": [
                    {"name": lw.name, "sha256": info.sha256, "autov2": info.autov2, "weight": lw.weight}
                    for info, lw in zip(infos, request.loras, strict=True)
                ],
            }
            if report:
                provenance["method_report"] = report
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
                        for k in (
                            "num_inference_steps",
                            "guidance_scale",
                            "height",
                            "width",
                            "method_params",
                            "prompt_tags",
                        )
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

    def check_requests(self, requests: list[dict[str, Any]], backbone: str, model: str | None) -> int:
        """Check a batch of JSON requests as `render` would, before anything is stored; the number of images
        it makes.

        Raises:
            StudioError, CatalogError: naming the request (`requests[i]`) and what is wrong.
        """
        settings = self.settings
        if model not in (None, TINY, settings.model):
            raise StudioError(
                f"model {model!r} is not served here; leave it out for the server's model "
                f"({settings.model or 'the backbone default'}) or use {TINY!r}"
            )
        spec, served = resolve_backbone(backbone, model)
        own = settings.model == TINY or (backbone == settings.backbone and settings.model is None)
        if served == TINY and not own:  # random weights: noise, never what a client asking for FLUX wants
            raise StudioError(
                f"backbone {backbone!r} has no real weights on this server (it would render {TINY!r}, a "
                f"random-weight test model); use the server's backbone {settings.backbone!r}, or start a server "
                f"for it: LORA_STUDIO_BACKBONE={backbone} LORA_STUDIO_MODEL=<weights> lora-studio serve"
            )
        total, cost = 0, 0.0
        for i, data in enumerate(requests):
            try:
                request = RenderRequest.from_json(data)
                request.validate()
                stack = self.resolve_stack(request)
                for info, _role in stack:
                    check_family(info, backbone, spec.family)
                if type(request.params()).needs_triggers:
                    triggers = {
                        lw.name: info.trigger_words
                        for lw, (info, _) in zip(request.loras, stack, strict=True)
                    }
                    problem = missing_trigger(request.method, request.prompt, triggers)
                    if problem:
                        raise StudioError(problem)
            except (StudioError, CatalogError) as exc:
                exc.args = (f"requests[{i}]: {exc.args[0] if exc.args else exc}", *exc.args[1:])
                raise
            total += request.num_images
            cost += request.megapixel_steps(spec)
        if cost > settings.max_job_megapixel_steps:
            raise OverBudgetError(
                f"this job costs {cost:,.0f} megapixel-steps (width x height x steps x images, summed over its "
                f"requests), over this server's limit of {settings.max_job_megapixel_steps:,.0f} "
                "(max_job_megapixel_steps); split it into smaller jobs or ask for fewer pixels or steps"
            )
        return total

    # --- what the front ends call (app.facade.StudioFacade) -------------------------------------------
    @property
    def renders_dir(self) -> Path:
        return self.settings.root / "renders"

    @property
    def thumbs_dir(self) -> Path:
        """Card thumbnails of the LoRAs' previews (`app.previews.thumbnail`), served by the studio."""
        return self.settings.root / "thumbs"

    def render_image(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        loras: Sequence[tuple[str, float]] = (),
        method: str = "merge",
        params: object = None,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        backbone: str | None = None,
        model: str | None = None,
        out: Path | None = None,
        progress: Progress | None = None,
        auto_loras: int = 0,
    ) -> RenderResult:
        """One render of plain values (backbone and model default to the settings'), saved as PNG at `out`
        (several images: `out` numbered) or under `renders_dir`. `auto_loras` = K > 0: the K LoRAs that
        search finds for the prompt join the stack (`auto_stack`), reported in the provenance."""
        picks: list[dict] = []
        if auto_loras:
            stacked = [n for n, _ in loras]
            prompt, added, picks = self.auto_stack(prompt, auto_loras, backbone, model, stacked)
            loras = [*loras, *added]
        request = RenderRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            seed=seed,
            num_images=num_images,
            loras=tuple(LoraWeight(name, float(weight)) for name, weight in loras),
            method=method,
            method_params=params,
        )
        out = out if out is not None else self.renders_dir / f"{uuid.uuid4().hex[:16]}.png"
        result = self.render(request, backbone=backbone, model=model, out=out, progress=progress)
        if picks:
            result.provenance["auto_loras"] = picks
        return result

    def regenerate_preview(self, ref: str) -> AdapterInfo:
        """Render the adapter's trigger words (or its name) with it at weight 1 and keep that as its preview."""
        info = self.library.get(ref)
        result = self.render_image(
            prompt=", ".join(info.trigger_words) or info.name, loras=[(info.name, 1.0)], seed=0
        )
        return self.library.set_preview(info.name, result.paths[0])

    def train(self, config: TrainConfig, images: Path, name: str, **options: Any) -> TrainOutcome:
        """`app.training.TrainingRuns.run` with the pipeline held (same arguments)."""
        with self._lock:
            return self.training.run(config, images, name, **options)

    def train_adapter(
        self,
        *,
        images: Path,
        name: str,
        kind: str,
        prompt: str,
        steps: int | None = None,
        trigger_words: list[str] | None = None,
        progress: TrainProgress | None = None,
    ) -> TrainOutcome:
        """Train an adapter of type `kind` with its recipe's settings and catalog it (plain values)."""
        config = TrainConfig(kind=kind, prompt=prompt, steps=steps).validate()
        return self.train(config, images, name, trigger_words=trigger_words or [], progress=progress)

    def train_gates(
        self,
        loras: Sequence[str],
        images: Path,
        *,
        steps: int = 300,
        lr: float = 5e-3,
        seed: int = 0,
        prompt: str | None = None,
        backbone: str | None = None,
        model: str | None = None,
        progress: TrainProgress | None = None,
    ) -> GateSetInfo:
        """Train gated fusion's gates for a set of two or more catalog LoRAs on a folder of images showing
        their concepts together (IMG.txt captions; else `prompt`, else the LoRAs' trigger words), each LoRA at
        weight 1, and store them with the set for this base model (replacing what the set had).

        Raises:
            AdapterNotFoundError: a LoRA the catalog does not have (close names suggested).
            StudioError, TrainingDataError: fewer than two LoRAs, one named twice, another family than the
                backbone's, no readable images, or bad training settings (named).
        """
        entries = resolve_gate_set(loras, self.resolve_lora)
        backbone = backbone or self.settings.backbone
        bb, model = resolve_backbone(backbone, model or self.settings.model)
        for info, _ in entries.values():
            check_family(info, backbone, bb.family)
        count_images(images, 1)  # before loading a model: a bad folder fails in a second
        with self._lock:
            loaded = self.pipeline(backbone, model)
            keys = self._make_resident(loaded, list(entries.values()))
            data = load_images(images, prompt or default_caption(entries), bb.native_size(loaded.pipe))
            residents = dict.fromkeys(keys, 1.0)
            trained = train_gates(
                loaded.pipe, bb, loaded.host, residents, data, steps, lr, seed, progress=progress
            )
        record = {**trained.record, "weights": dict.fromkeys(entries, 1.0)}  # by catalog name
        pairs = list(zip(entries, keys, strict=True))
        return self.gates.store(backbone, str(model), pairs, StoredGates(trained.gates.tensors, record))

    def served_family(self) -> str:
        """The LoRA family the server's own backbone takes ("sdxl" for the toy model)."""
        return resolve_backbone(self.settings.backbone, self.settings.model)[0].family

    def composition_methods(self) -> Mapping[str, type]:
        """Composition method name -> its parameters dataclass."""
        return dict(METHODS)

    def adapter_types(self) -> tuple[str, ...]:
        """The adapter types the trainer can train."""
        return tuple(trainable_kinds())

    def default_sampling(self) -> SamplingDefaults:
        """The default backbone's steps and guidance."""
        bb, _ = resolve_backbone(self.settings.backbone, self.settings.model)
        return SamplingDefaults(bb.default_steps, bb.default_guidance)

    def file_hashes(self, path: Path) -> FileHashes:
        """A file's SHA-256, AutoV2 and tensor hash."""
        return file_hashes(path)

    # --- render jobs (app.jobs.board) -----------------------------------------------------------------
    def expand_auto(
        self, requests: list[dict[str, Any]], backbone: str | None = None, model: str | None = None
    ) -> list[list[dict]]:
        """Replace each request's `auto_loras` (K) by the LoRAs auto mode picks (in place: the job is stored
        with what was picked); returns the picks per request ([] where none was asked)."""
        picks = []
        for request in requests:
            k = int(request.pop("auto_loras", 0) or 0)
            if not k:
                picks.append([])
                continue
            stacked = [entry["name"] for entry in request.get("loras") or []]
            prompt, added, report = self.auto_stack(request["prompt"], k, backbone, model, stacked)
            request["prompt"] = prompt
            request["loras"] = [*(request.get("loras") or []), *({"name": n, "weight": w} for n, w in added)]
            picks.append(report)
        return picks

    def submit_job(
        self,
        requests: list[dict[str, Any]],
        *,
        backbone: str | None = None,
        model: str | None = None,
        api_key_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[JobInfo, bool]:
        """`JobBoard.submit`: check the batch in full and queue it as one job."""
        return self.jobs.submit(
            requests, backbone=backbone, model=model, api_key_id=api_key_id, idempotency_key=idempotency_key
        )

    def get_job(self, job_id: int, api_key_id: int | None = None) -> JobInfo:
        return self.jobs.get(job_id, api_key_id)

    def list_renders(self, limit: int = 12, offset: int = 0) -> RenderPage:
        """Finished renders, newest first (the studio's history), and how many there are."""
        with self.sessions() as session:
            repo = RenderRepository(session)
            rows = repo.list(limit, offset, status="done")
            return RenderPage([RenderInfo.of(r, self.renders_dir) for r in rows], repo.count("done"))

    def get_render(self, render_id: int) -> RenderInfo:
        """A finished render by id.

        Raises:
            StudioError: no finished render with that id.
        """
        with self.sessions() as session:
            try:
                render = RenderRepository(session).get(render_id)
            except CatalogError:
                render = None
            if render is None or render.status != "done":
                raise StudioError(f"no finished render with id {render_id}")
            return RenderInfo.of(render, self.renders_dir)

    def list_jobs(
        self, status: str | None = None, api_key_id: int | None = None, limit: int = 50, offset: int = 0
    ) -> JobPage:
        return self.jobs.list(status, api_key_id, limit, offset)

    def job_image(self, job_id: int, n: int, api_key_id: int | None = None) -> Path:
        return self.jobs.image(job_id, n, api_key_id)

    def cancel_job(self, job_id: int, api_key_id: int | None = None) -> JobInfo:
        return self.jobs.cancel(job_id, api_key_id)
