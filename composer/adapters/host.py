"""AdapterHost: makes LoRA files resident on a pipeline's models and switches between them by context."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

from composer.adapters import static
from composer.adapters.base import MixingContext, Scale
from composer.adapters.layer import AdaptedModule
from composer.adapters.registry import build_adapter
from composer.errors import AdapterError, FamilyMismatchError, UnknownKeysError
from composer.formats.model import LoraFile


class AdapterHost:
    """Holds any number of resident adapters on a set of component models (unet/transformer, text encoders).

    Each target module is wrapped once, on first use; adapters are added and removed by name; which are
    active, and how strongly, is a context change. `detach()` puts the original modules back.
    """

    def __init__(self, components: Mapping[str, nn.Module], family: str | None = None):
        self.components = dict(components)
        self.family = family
        self.context = MixingContext()
        self._wrapped: dict[str, AdaptedModule] = {}  # "component.path" -> wrapper
        self._resident: dict[str, list[AdaptedModule]] = {}  # adapter name -> the wrappers it lives on
        self._static: dict[str, int] = {}  # component -> slot rank, for a compiled denoiser (`make_static`)
        self.context.listeners.append(self._load_slots)

    @classmethod
    def for_pipeline(cls, pipe, backbone) -> AdapterHost:
        return cls(backbone.components(pipe), backbone.family)

    # --- residency ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._resident)

    def add(self, name: str, lora: LoraFile) -> None:
        """Make `lora` resident under `name`. All or nothing: on any error nothing is attached.

        Raises:
            FamilyMismatchError: the file is for another base family.
            UnknownKeysError: modules in the file that this model does not have (named).
            AdapterError: the name is taken, or shapes do not fit a module.
        """
        if name in self._resident:
            raise AdapterError(f"an adapter named {name!r} is already resident")
        if lora.family and self.family and lora.family != self.family:
            raise FamilyMismatchError(f"LoRA {name!r} is for {lora.family}; this backbone is {self.family}")
        missing: list[str] = []
        built: list[tuple[str, nn.Module, nn.Module]] = []  # (key, target, adapter)
        for key, delta in lora.modules.items():
            target = self._find(delta.component, delta.path)
            if target is None:
                missing.append(key)
                continue
            base = target.base if isinstance(target, AdaptedModule) else target
            try:
                built.append((key, target, build_adapter(base, delta)))
            except AdapterError as exc:
                raise AdapterError(f"LoRA {name!r}, module {key}: {exc}") from None
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise UnknownKeysError(
                f"LoRA {name!r}: {len(missing)} modules match nothing in this model: {shown}", missing
            )
        if not built:
            raise AdapterError(f"LoRA {name!r} holds no adapter weights")
        self.attach(name, [(key, adapter) for key, _, adapter in built])

    def attach(self, name: str, built: list[tuple[str, nn.Module]]) -> None:
        """Make ready-built adapter modules resident under `name`: ("component.path" key, adapter) pairs.

        The trainer attaches fresh trainable adapters this way; `add` attaches the ones it built from a file.
        """
        if name in self._resident:
            raise AdapterError(f"an adapter named {name!r} is already resident")
        resolved = []
        for key, adapter in built:  # check everything before changing anything
            component, _, path = key.partition(".")
            target = self._find(component, path)
            if target is None:
                raise UnknownKeysError(f"adapter {name!r}: {key} matches nothing in this model", [key])
            if isinstance(target, AdaptedModule) and target.context is not self.context:
                raise AdapterError(
                    f"{key} is already wrapped by another AdapterHost; use that host (one host per pipeline)"
                )
            resolved.append((component, target, adapter))
        wrappers: list[AdaptedModule] = []
        paths: dict[str, dict[int, str]] = {}  # component -> id(module) -> the model's own path
        try:
            for component, target, adapter in resolved:
                if component not in paths:
                    paths[component] = {id(m): n for n, m in self.components[component].named_modules()}
                wrapper = self._wrap(component, paths[component][id(target)], target)
                wrapper.add(name, adapter)
                wrappers.append(wrapper)
        except BaseException:  # all or nothing, also when interrupted
            for wrapper in wrappers:
                wrapper.remove(name)
            raise
        self._resident[name] = wrappers

    def find(self, key: str) -> nn.Module | None:
        """The module a "component.path" key names (the original, also when it is already wrapped)."""
        component, _, path = key.partition(".")
        target = self._find(component, path)
        return target.base if isinstance(target, AdaptedModule) else target

    def adapter_modules(self, name: str) -> dict[str, nn.Module]:
        """The resident adapter `name` by "component.path" key of the module it adapts."""
        return {key: layer.adapters[name] for key, layer in self.layers(name).items()}

    def layers(self, name: str) -> dict[str, AdaptedModule]:
        """The wrapped layers the resident adapter `name` lives on, by "component.path" key."""
        if name not in self._resident:
            raise AdapterError(f"not resident: {name}")
        keys = {id(w): k for k, w in self._wrapped.items()}
        return {keys[id(w)]: w for w in self._resident[name]}

    def remove(self, name: str) -> None:
        """Drop a resident adapter and free its weights."""
        if name in self.context.fused:
            raise AdapterError(f"adapter {name!r} is fused; unfuse first")
        for wrapper in self._resident.pop(name, []):
            wrapper.remove(name)
        if name in self.context.active:
            self.context.active = {n: s for n, s in self.context.active.items() if n != name}

    def _find(self, component: str, path: str) -> nn.Module | None:
        model = self.components.get(component)
        if model is None:
            return None
        # transformers 5 flattened CLIPTextModel (no `text_model.`); files from every era name it
        for candidate in (path, path.removeprefix("text_model."), f"text_model.{path}"):
            try:
                return model.get_submodule(candidate)
            except AttributeError:
                continue
        return None

    def _wrap(self, component: str, path: str, target: nn.Module) -> AdaptedModule:
        if isinstance(target, AdaptedModule):
            return target
        model = self.components[component]
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = AdaptedModule(target, self.context, f"{component}.{path}")
        if component in self._static:
            static.make_static(wrapper, self._static[component])
        setattr(parent, attr, wrapper)
        self._wrapped[f"{component}.{path}"] = wrapper
        return wrapper

    # --- mixing -------------------------------------------------------------------------------------
    def set_active(self, scales: Mapping[str, Scale]) -> None:
        """Make exactly these adapters active (name -> scale, a number or a per-sample (B,) tensor)."""
        unknown = [n for n in scales if n not in self._resident]
        if unknown:
            raise AdapterError(
                f"not resident: {', '.join(unknown)} (resident: {', '.join(self._resident) or 'none'})"
            )
        self.context.active = dict(scales)

    @contextmanager
    def activate(self, scales: Mapping[str, Scale]) -> Iterator[None]:
        """Activate a set for the duration of a block; the previous set comes back afterwards."""
        previous = dict(self.context.active)
        self.set_active(scales)
        try:
            yield
        finally:
            self.context.active = previous

    # --- a compiled denoiser -------------------------------------------------------------------------
    def make_static(self, component: str, rank: int = static.DEFAULT_SLOT_RANK) -> None:
        """Prepare `component` (the denoiser) for torch.compile: its wrapped layers get fixed-shape slots of
        `rank` and every later switch writes the active set into them in place, so one compiled graph
        serves every set and weight (composer.adapters.static). Layers wrapped later get slots too."""
        if component not in self.components:
            raise AdapterError(f"no component {component!r} (have: {', '.join(self.components)})")
        if rank < 1:
            raise AdapterError(f"slot rank must be >= 1, got {rank}")
        if self.context.fused:
            raise AdapterError("adapters are fused; unfuse before making the denoiser static")
        for key, wrapper in self._wrapped.items():
            if key.partition(".")[0] == component:
                static.drop_static(wrapper)
                static.make_static(wrapper, rank)
        self._static[component] = rank

    def _load_slots(self) -> None:
        """The context changed: write the new set into every static layer (all checked before any write)."""
        if not self._static:
            return
        layers = [w for w in self._wrapped.values() if w.slot_rank]
        plans = [static.plan(w) for w in layers]
        for layer, planned in zip(layers, plans, strict=True):
            static.load(layer, planned)

    # --- fusing -------------------------------------------------------------------------------------
    def fuse(self, scales: Mapping[str, float]) -> None:
        """Fold adapters into the base weights (fast path for a static stack). Forward stays equivalent."""
        if self.context.fused:
            raise AdapterError("adapters are already fused; unfuse first")
        if self._static:
            raise AdapterError("a compiled denoiser applies its LoRAs on each switch; fusing is not needed")
        unknown = [n for n in scales if n not in self._resident]
        if unknown:
            raise AdapterError(f"not resident: {', '.join(unknown)}")
        per_wrapper: dict[int, tuple[AdaptedModule, dict[str, float]]] = {}
        for name, scale in scales.items():
            for wrapper in self._resident[name]:
                per_wrapper.setdefault(id(wrapper), (wrapper, {}))[1][name] = float(scale)
        for wrapper, todo in per_wrapper.values():  # all of one layer's deltas at once, from its base weight
            wrapper.fuse(todo)
        self.context.fused = {n: float(s) for n, s in scales.items()}

    def unfuse(self) -> None:
        """Restore the exact base weights kept at fuse time."""
        for wrapper in self._wrapped.values():
            wrapper.unfuse()
        self.context.fused = {}

    def detach(self) -> None:
        """Unfuse, drop every adapter and put the original modules back."""
        self.unfuse()
        for wrapper in self._wrapped.values():
            if wrapper.slot_rank:
                static.drop_static(wrapper)
        self._static.clear()
        for key, wrapper in self._wrapped.items():
            component, path = key.split(".", 1)
            parent_path, _, attr = path.rpartition(".")
            model = self.components[component]
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, wrapper.base)
        self._wrapped.clear()
        self._resident.clear()
        self.context.active = {}

    def parameter_count(self, name: str) -> int:
        return sum(w.adapters[name].parameter_count() for w in self._resident.get(name, []))
