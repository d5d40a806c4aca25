"""clora: contrastive test-time composition with attention masks (CLoRA, Meral et al., ICCV 2025).

One denoising stream per LoRA (that LoRA alone) plus a base stream (no LoRA), all in one batched call per step
(`composer.seams.streams`). Each LoRA's concept is the token positions of its trigger words in the prompt, found from the
catalog's trigger words (never hand-written indices). Every step reads the streams' cross-attention maps at the
semantic resolution (`composer.seams.attention`, where the backbone says) and builds one mask per LoRA stream: the sum of its concept's min-max
normalised token maps, at or above `threshold` x its maximum. Pixels no LoRA claims go to the base stream, and
the predictions blend as eps = sum_j M_j eps_j / sum_j M_j (both guidance branches alike).

In the early steps (`update_until`), after each scheduler step the next step's latents take one gradient step on
an InfoNCE loss (cosine similarity, `temperature`) over every concept token's map in every stream: one concept's
maps are positives, the other concepts' are negatives, so the concepts' attention pulls apart. The step moves
each sample's latents by `step_size` times their RMS along its normalised gradient (schedulers scale latents
differently; a relative step means the same on each). With one LoRA there is nothing to contrast and only the
masks act.

The text encoders see the whole stack (as in merge); the prompt is the same in every stream, written with the
LoRAs' trigger words. Cost: (LoRAs + 1) denoiser passes per step, plus a backward pass on the update steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from composer.errors import StudioError
from composer.methods.base import CompositionParams, MethodRun, parse_named_lines, whole_word
from composer.methods.regional import encode_for_streams, swap_texts
from composer.seams.attention import MapStore, capture_cross_attention
from composer.seams.streams import call_latents, denoise_in_streams, map_batched

MAX_REFINE = 50
REFINE_AT = (0.0, 0.2, 0.4)  # the paper's refinement steps 0, 10 and 20, as shares of its 50 steps


@dataclass(frozen=True)
class CLoRAParams(CompositionParams):
    """CLoRA's knobs; the paper's values are the defaults."""

    needs_grad: ClassVar[bool] = True  # the latent updates take gradients
    needs_triggers: ClassVar[bool] = True  # each LoRA's concept is its trigger words' tokens

    threshold: float = field(
        default=0.3, metadata={"help": "a LoRA's mask: its attention at or above this share of its peak"}
    )
    temperature: float = field(default=0.5, metadata={"help": "contrastive loss temperature"})
    step_size: float = field(
        default=0.02,
        metadata={"help": "latent update per step, relative to the latents' RMS (0: masks only)"},
    )
    update_until: float = field(
        default=0.5, metadata={"help": "share of the steps that update the latents (the paper: 25 of 50)"}
    )
    refine: int = field(
        default=0,
        metadata={
            "help": "updates at each refinement step (the paper's steps 0, 10 and 20 of 50; 0: one update per "
            "step there too)"
        },
    )
    prompts: Literal["shared", "per-lora"] = field(
        default="shared",
        metadata={
            "help": "shared: every stream reads the prompt as written; per-lora (the paper): each LoRA's stream "
            "keeps only its own trigger words, the others' concepts in their plain words (`concepts`)"
        },
    )
    concepts: str = field(
        default="",
        metadata={
            "help": "for per-lora prompts, one line per LoRA: `name: the plain word of its concept` (e.g. "
            "`my-cat: cat`)",
            "lines": 2,
        },
    )

    def __post_init__(self):
        for name, low, high in (
            ("threshold", 0.0, 1.0),
            ("temperature", 1e-3, 10.0),
            ("step_size", 0.0, 1.0),
            ("update_until", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise StudioError(f"clora.{name} must be a number in {low}..{high}, got {value!r}")
        if (
            isinstance(self.refine, bool)
            or not isinstance(self.refine, int)
            or not 0 <= self.refine <= MAX_REFINE
        ):
            raise StudioError(f"clora.refine must be an integer in 0..{MAX_REFINE}, got {self.refine!r}")
        if not isinstance(self.concepts, str):
            raise StudioError(f"clora.concepts must be text (`name: word` per line), got {self.concepts!r}")
        parse_named_lines(self.concepts, "clora concept")

    def check(self, stack: list[str]) -> None:
        if not stack:
            raise StudioError("clora composes LoRAs: pick at least one")
        words = parse_named_lines(self.concepts, "clora concept")
        unknown = [n for n in words if n not in stack]
        if unknown:
            raise StudioError(f"clora: concepts for LoRAs not in the stack: {', '.join(unknown)}")
        if self.prompts == "per-lora":
            missing = [n for n in stack if n not in words]
            if missing:
                raise StudioError(
                    f"clora per-lora prompts write each concept in plain words in the other streams; give "
                    f"`concepts` a line for {', '.join(missing)} (e.g. `{missing[0]}: cat`)"
                )

    @property
    def one_prompt_per_call(self) -> bool:
        return self.prompts == "per-lora"  # the streams' texts are built from the one prompt of the call

    def refinement_steps(self, steps: int) -> set[int]:
        """The steps whose latents get `refine` updates: the paper's 0, 10 and 20 of 50 at this step count
        (step 0's as soon as a hook runs: before step 1)."""
        if not self.refine:
            return set()
        return {max(1, round(share * steps)) for share in REFINE_AT}

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        state = ContrastiveRun(self, run)
        run.step_end.append(state.step_end)
        with ExitStack() as stack:
            stack.enter_context(run.host.activate(run.scales))  # text encoders: the whole stack
            stack.enter_context(
                capture_cross_attention(run.backbone, state.denoiser, state.store, state.latent)
            )
            stack.enter_context(
                denoise_in_streams(
                    state.denoiser,
                    run.host,
                    state.streams,
                    state.masks,
                    state.grid,
                    state.record,
                    inputs=state.stream_texts(),
                )
            )
            yield
        state.show_masks()


def info_nce(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over labelled embeddings: for every ordered pair (i, p) of one label, -log of
    exp(s_ip / t) / (exp(s_ip / t) + sum over other labels k of exp(s_ik / t)), s the cosine similarity; the mean
    over pairs. Zero when there are no positive pairs or no negatives."""
    unit = F.normalize(embeddings.float(), dim=-1)
    logits = unit @ unit.T / temperature
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    if not bool(positive.any()) or not bool(negative.any()):
        return logits.sum() * 0.0
    negatives = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    per_pair = torch.logaddexp(logits, negatives.expand_as(logits)) - logits  # -log(e^p / (e^p + sum e^n))
    return per_pair[positive].mean()


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last two dims (rows, cols)."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp_min(1e-8)


class ContrastiveRun:
    """One CLoRA pipeline call: its streams, concepts, masks and latent updates."""

    def __init__(self, params: CLoRAParams, run: MethodRun):
        self.params, self.run = params, run
        backbone, pipe = run.backbone, run.pipe
        self.denoiser = getattr(pipe, backbone.denoiser)
        self.latent = backbone.latent_size(pipe, run.height, run.width)
        self.grid = backbone.patch_grid(pipe, run.height, run.width)
        rows, cols = backbone.semantic_grid(self.denoiser, *self.latent)
        self.store = MapStore(rows, cols)
        self.names = [entry.name for entry in run.stack]
        self.streams = [{}] + [{entry.resident: entry.weight} for entry in run.stack]  # base, then each LoRA
        self.words = parse_named_lines(params.concepts, "clora concept")  # LoRA -> its concept's plain word
        # per prompt, per stream, per LoRA: the token positions of that LoRA's concept in the stream's prompt
        self.concepts = [
            [self._concepts(text, own) for own, text in enumerate(self.stream_prompts(prompt))]
            for prompt in run.prompts
        ]
        self.samples = len(run.prompts) * run.images_per_prompt
        self.last_masks: torch.Tensor | None = None  # (S, samples, rows, cols) of the latest step
        self.call: tuple[tuple, dict] | None = None
        self.probing = False  # inside `loss_at`: the blend's masks do not matter and the maps are the loss's
        self.losses: list[tuple[int, float]] = []  # (step updated, loss before the update)
        # the render's steps: the scheduler's are set later, by the call
        self.refine_at = params.refinement_steps(run.steps)

    def stream_prompts(self, prompt: str) -> list[str]:
        """The prompt each stream reads: as written (shared), or (per-lora) with every LoRA's trigger words but
        the stream's own LoRA's replaced by that LoRA's plain concept word (the base stream: all replaced)."""
        if self.params.prompts == "shared":
            return [prompt] * len(self.streams)
        out = []
        for own in range(len(self.streams)):  # 0: base, 1 + k: LoRA k
            text = prompt
            for k, name in enumerate(self.names):
                if own != 1 + k:
                    for word in self.run.triggers.get(name) or []:
                        plain = self.words[name]
                        text = whole_word(word).sub(lambda _, p=plain: p, text)
            out.append(text)
        return out

    def stream_texts(self):
        """Per-lora prompts: the streams' `inputs` hook that gives each stream's conditional rows its prompt,
        encoded with that stream's LoRA on the text encoders (None: shared, every stream reads the call's)."""
        if self.params.prompts == "shared":
            return None
        if len(set(self.run.prompts)) > 1:
            raise StudioError("clora per-lora prompts render one prompt per call")
        texts = list(zip(self.streams, self.stream_prompts(self.run.prompts[0]), strict=True))
        requested, own = encode_for_streams(self.run, texts)
        return swap_texts(self.run.backbone, requested, own)

    def _concepts(self, prompt: str, stream: int) -> list[list[int]]:
        """Per LoRA, its concept's token positions in the prompt `stream` reads."""
        backbone, pipe = self.run.backbone, self.run.pipe
        out = []
        for k, name in enumerate(self.names):
            words = self.run.triggers.get(name) or []
            if self.params.prompts == "per-lora" and stream != 1 + k and words:
                words = [self.words[name]]
            if not words:
                raise StudioError(f"clora finds each LoRA's concept by its trigger words; {name!r} has none")
            positions = backbone.trigger_positions(pipe, prompt, words)
            if not positions:
                raise StudioError(
                    f"clora: the prompt does not contain {name!r}'s trigger word "
                    f"({', '.join(repr(w) for w in words)}); write it where that concept goes"
                )
            out.append(positions)
        return out

    def _prompt_of(self, sample: int) -> int:
        return sample // self.run.images_per_prompt

    def token_maps(self, maps: torch.Tensor, sample: int) -> list[list[torch.Tensor]]:
        """Per LoRA, per stream, its concept's min-max normalised token maps: (T, rows, cols), from the
        (S, n, rows, cols, L) maps of n conditional samples (T may differ between streams: per-lora prompts
        write a concept with other words)."""
        per_stream = self.concepts[self._prompt_of(sample)]
        return [
            [
                _normalise(maps[stream, sample, :, :, per_stream[stream][k]].permute(2, 0, 1))
                for stream in range(len(self.streams))
            ]
            for k in range(len(self.names))
        ]

    def _conditional(self, batch: int) -> tuple[slice, int]:
        """The conditional samples of a call of `batch` (the second half under classifier-free guidance)."""
        if batch == 2 * self.samples:
            return slice(self.samples, batch), 2
        if batch == self.samples:
            return slice(0, batch), 1
        raise StudioError(
            f"clora expected {self.samples} or {2 * self.samples} samples, the denoiser got {batch}"
        )

    def masks(self, batch: int) -> torch.Tensor:
        """(S, batch, rows, cols) stream masks from this call's attention: asked by the stream blend."""
        streams = len(self.streams)
        if self.probing:
            return torch.ones(streams, 1, 1)
        maps = self.store.mean().detach()  # (S * batch, rows, cols, L)
        self.store.clear()
        maps = maps.reshape(streams, batch, *maps.shape[1:])
        keep, copies = self._conditional(batch)
        conditional = maps[:, keep]
        own = torch.stack(  # (K, n, rows, cols): each LoRA's concept, summed, in its own stream
            [
                torch.stack([m[1 + k].sum(dim=0) for k, m in enumerate(self.token_maps(conditional, sample))])
                for sample in range(conditional.shape[1])
            ],
            dim=1,
        )
        peak = own.amax(dim=(-2, -1), keepdim=True)
        claimed = (own >= self.params.threshold * peak) & (peak > 0)
        base = ~claimed.any(dim=0, keepdim=True)
        regions = torch.cat([base, claimed]).float()  # (S, n, rows, cols)
        self.last_masks = regions
        return regions.repeat(1, copies, 1, 1)

    def record(self, args: tuple, kwargs: dict) -> None:
        """The latest denoiser call's arguments, as the pipeline made them (replayed by the latent update)."""
        if not self.probing:
            self.call = (args, kwargs)

    def loss_at(self, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The contrastive loss of the conditional streams at `latents` (the pipeline's, for `timestep`), with
        its graph back to `latents`."""
        args, kwargs = self._probe_inputs(latents, timestep)
        self.store.clear()
        self.probing = True
        try:
            self.denoiser(*args, **kwargs)  # the stream wrapper runs every stream; the maps land in the store
        finally:
            self.probing = False
        maps = self.store.mean()
        self.store.clear()
        maps = maps.reshape(len(self.streams), self.samples, *maps.shape[1:])
        losses = []
        for sample in range(self.samples):
            embeddings, labels = [], []
            for concept, streams in enumerate(self.token_maps(maps, sample)):  # per stream (T, rows, cols)
                for tokens in streams:
                    embeddings.append(tokens.flatten(1))
                    labels += [concept] * tokens.shape[0]
            labels_t = torch.tensor(labels, device=maps.device)
            losses.append(info_nce(torch.cat(embeddings), labels_t, self.params.temperature))
        return torch.stack(losses).sum()

    def _probe_inputs(self, latents: torch.Tensor, timestep) -> tuple[tuple, dict]:
        """The recorded call's arguments for the conditional samples at new latents and timestep."""
        if self.call is None:
            raise StudioError("clora: no denoiser call to replay")
        args, kwargs = self.call
        batch = call_latents(args, kwargs).shape[0]
        keep, _ = self._conditional(batch)
        args = tuple(map_batched(a, batch, lambda t: t[keep]) for a in args)
        kwargs = {k: map_batched(v, batch, lambda t: t[keep]) for k, v in kwargs.items()}
        return self.run.backbone.replay_inputs(self.run.pipe, args, kwargs, latents, timestep)

    def step_end(self, pipe, step: int, timestep, tensors: dict) -> dict:
        """After step `step`: contrastive updates of the latents the next step starts from: one in the early
        steps (`update_until`), `refine` at a refinement step."""
        timesteps = pipe.scheduler.timesteps
        following = step + 1
        refining = following in self.refine_at
        if (
            self.params.step_size <= 0
            or len(self.streams) < 3  # one LoRA: nothing to contrast
            or following >= len(timesteps)
            or (following >= self.params.update_until * len(timesteps) and not refining)
        ):
            return tensors
        latents = tensors["latents"]
        for _ in range(self.params.refine if refining else 1):
            latents = self._update(latents, timesteps[following], following)
        return {**tensors, "latents": latents}

    def _update(self, latents: torch.Tensor, timestep, following: int) -> torch.Tensor:
        """One gradient step of the contrastive loss on the latents, `step_size` x their RMS per sample."""
        with torch.inference_mode(False), torch.enable_grad():
            x = latents.detach().clone().requires_grad_(True)
            loss = self.loss_at(x, timestep)
            (grad,) = torch.autograd.grad(loss, x)
        self.losses.append((following, float(loss)))
        dims = tuple(range(1, grad.ndim))  # each sample's step is its own: batching changes nothing
        size = grad.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
        scale = self.params.step_size * latents.float().pow(2).mean(dim=dims, keepdim=True).sqrt()
        step = torch.where(size > 0, scale / size.clamp_min(1e-30), torch.zeros_like(size)) * grad.float()
        return (latents.float() - step).to(latents.dtype)

    def show_masks(self) -> None:
        """The last step's masks as pictures at the render's size."""
        if self.last_masks is None:
            return
        labels = ["base", *self.names]
        for sample in range(self.last_masks.shape[1]):
            prefix = f"image {sample + 1}, " if self.last_masks.shape[1] > 1 else ""
            for label, values in zip(labels, self.last_masks[:, sample], strict=True):
                array = (values.cpu().numpy() * 255).astype(np.uint8)
                picture = Image.fromarray(array).resize(
                    (self.run.width, self.run.height), Image.Resampling.NEAREST
                )
                self.run.pictures.append((f"{prefix}clora: {label} ({float(values.mean()):.0%})", picture))
