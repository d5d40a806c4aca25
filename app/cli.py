"""`lora-studio`: import, list, show, export, render and train from the command line; API keys; serve."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from app.cli_admin import admin_app, apikey_app
from app.cli_common import (
    COMPILE_HELP,
    DataDir,
    _fail,
    _guard,
    _settings,
    _studio,
    compile_mode,
    configure_logging,
    full_traces,
    loss_progress,
)
from app.cli_gates import train_gates
from app.handoff import render_via_server
from composer.prompt_tags import parse_lora_weight

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LoRA Studio: train, catalog, retrieve and compose LoRAs.",
)


@app.command("import")
@_guard
def import_(
    paths: Annotated[list[Path], typer.Argument(help="safetensors files or folders (searched recursively)")],
    tag: Annotated[list[str] | None, typer.Option("--tag", help="tag to add (repeatable)")] = None,
    data_dir: DataDir = None,
):
    """Import LoRA files into the catalog. Re-importing the same tensors is a no-op."""
    studio = _studio(data_dir)
    outcomes = studio.library.import_paths(paths, tags=tag or [])
    colors = {"imported": typer.colors.GREEN, "duplicate": typer.colors.YELLOW, "failed": typer.colors.RED}
    for o in outcomes:
        detail = o.name if o.status == "imported" else o.message
        typer.secho(f"{o.status:9} {o.path}  {detail}", fg=colors[o.status])
    counts = {s: sum(o.status == s for o in outcomes) for s in colors}
    typer.echo(
        f"{counts['imported']} imported, {counts['duplicate']} already in the catalog, {counts['failed']} failed"
    )
    if counts["failed"] or not outcomes:
        raise typer.Exit(1)


@app.command("list")
@_guard
def list_(
    query: Annotated[
        str | None, typer.Argument(help="words to find in names, trigger words, tags, descriptions")
    ] = None,
    family: Annotated[str | None, typer.Option(help="sdxl or flux")] = None,
    tag: Annotated[str | None, typer.Option(help="exact tag")] = None,
    limit: int = 100,
    data_dir: DataDir = None,
):
    """List catalogued LoRAs."""
    rows = _studio(data_dir).library.list(query=query, family=family, tag=tag, limit=limit)
    if not rows:
        typer.echo("no LoRAs found")
        return
    width = max(len(r.name) for r in rows)
    for r in rows:
        triggers = ", ".join(r.trigger_words[:3])
        typer.echo(
            f"{r.name:{width}}  {r.family:5} {r.adapter_type:6} r={r.rank or '-':<4} {r.autov2}  {triggers}"
        )


@app.command()
@_guard
def search(
    query: Annotated[
        str,
        typer.Argument(help="words to find, or a prompt to find LoRAs for (a weight search reads it as one)"),
    ],
    mode: Annotated[
        str,
        typer.Option(
            help="hybrid (full text and weight search, fused), text (names, trigger words, tags, descriptions; "
            "word prefixes) or weights (what the LoRAs' weights do, from the served model's LoRA encoder)"
        ),
    ] = "hybrid",
    family: Annotated[
        str | None, typer.Option(help="sdxl or flux (text mode; weight search is the served model's)")
    ] = None,
    tag: Annotated[str | None, typer.Option(help="exact tag")] = None,
    limit: int = 20,
    data_dir: DataDir = None,
):
    """Find LoRAs for some words or a prompt, best match first, with their scores (hybrid: the fused score, then
    the full-text and the weight cosine, '-' where that side did not find it)."""
    from composer.errors import StudioError

    studio = _studio(data_dir)
    if mode == "text":
        hits = [
            (info, score, score, None)
            for info, score in studio.library.search(query, family=family, tag=tag, limit=limit)
        ]
    else:
        if family is not None and family != studio.served_family():
            raise StudioError(
                f"weight search serves {studio.served_family()} LoRAs; use --mode text for {family}"
            )
        hits = [
            (h.info, h.score, h.text_score, h.weight_score)
            for h in studio.search_loras(query, mode, limit, tag=tag)
        ]
    if not hits:
        typer.echo("no LoRAs found")
        return
    width = max(len(info.name) for info, *_ in hits)

    def side(value):
        return "      -" if value is None else f"{value:7.3f}"

    for info, score, text, weight in hits:
        triggers = ", ".join(info.trigger_words[:3])
        typer.echo(
            f"{score:7.4f} {side(text)} {side(weight)}  {info.name:{width}}  {info.family:5} {info.adapter_type:6} {triggers}"
        )


@app.command()
@_guard
def similar(
    name: Annotated[str, typer.Argument(help="name or hash of a catalog LoRA")],
    limit: int = 10,
    data_dir: DataDir = None,
):
    """The LoRAs whose weights do the most alike to NAME's (cosine of their weight embeddings)."""
    rows = _studio(data_dir).similar_loras(name, limit)
    if not rows:
        typer.echo("no other LoRAs to compare with")
        return
    width = max(len(info.name) for info, _ in rows)
    for info, score in rows:
        typer.echo(
            f"{score:7.3f}  {info.name:{width}}  {info.adapter_type:6} {', '.join(info.trigger_words[:3])}"
        )


@app.command()
@_guard
def show(name: Annotated[str, typer.Argument(help="name or hash")], data_dir: DataDir = None):
    """Show one LoRA's catalog entry."""
    info = _studio(data_dir).library.get(name)
    for key in (
        "name",
        "family",
        "adapter_type",
        "source_format",
        "rank",
        "alpha",
        "sha256",
        "autov2",
        "tensor_sha256",
        "file_path",
        "file_size",
        "trigger_words",
        "tags",
        "description",
        "created_at",
    ):
        typer.echo(f"{key:14} {getattr(info, key)}")
    success = (info.training_config or {}).get("success")
    if isinstance(success, dict) and "rate" in success:  # a bundled adapter's own measured success
        typer.echo(
            f"{'success':14} {success['rate']:.3f} ± {success.get('se') or 0:.3f} over {success['prompts']} prompts "
            f"(by size {success.get('by_size')}; base model {success.get('base_rate')})"
        )


@app.command()
@_guard
def export(
    name: Annotated[str, typer.Argument(help="name or hash")],
    format: Annotated[str, typer.Option("--format", help="kohya or diffusers")] = "kohya",
    out: Annotated[Path, typer.Option("--out", help="file or folder")] = Path("."),
    data_dir: DataDir = None,
):
    """Export a LoRA as kohya- or diffusers-format safetensors with ss_* and modelspec metadata."""
    path = _studio(data_dir).library.export(name, format, out)
    typer.echo(str(path))


@app.command("render")
@_guard
def render_(
    prompt: Annotated[str, typer.Option(help="what to draw; <lora:NAME:WEIGHT> tags add catalog LoRAs")],
    lora: Annotated[list[str] | None, typer.Option("--lora", help="NAME or NAME:WEIGHT (repeatable)")] = None,
    negative_prompt: str = "",
    backbone: Annotated[str | None, typer.Option(help="toy (the bundled toy model), sdxl or flux")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="'tiny' (random weights), a diffusers directory, a single-file .safetensors checkpoint "
            "or a hub id; default: the backbone's own"
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale")] = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    num_images: int = 1,
    method: Annotated[
        str | None,
        typer.Option(
            help="composition method (an unknown name is refused, naming the registered ones); default merge, "
            "gated with --auto-loras"
        ),
    ] = None,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", help="method parameter KEY=VALUE, e.g. feather=4 (repeatable)"),
    ] = None,
    mask: Annotated[
        list[str] | None,
        typer.Option("--mask", help="regional: NAME=PICTURE, the LoRA's region (white = inside; repeatable)"),
    ] = None,
    auto_loras: Annotated[
        int,
        typer.Option(
            "--auto-loras",
            help="auto mode: add the K LoRAs that search finds for the prompt (weights and text, fused), with "
            "their trigger words; the picks are printed with their scores",
            min=0,
            max=8,
        ),
    ] = 0,
    out: Annotated[Path, typer.Option(help="PNG file to write")] = Path("render.png"),
    compile: Annotated[
        bool, typer.Option("--compile", help=COMPILE_HELP + " (renders in this process)")
    ] = False,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="render in this process even when a `lora-studio serve` runs on the data dir (by default the "
            "render is handed to it: no imports or model load here; the method's pictures, such as its masks, "
            "are written by in-process renders only)",
        ),
    ] = False,
    data_dir: DataDir = None,
):
    """Render a prompt with a stack of catalogued LoRAs, composed by a method (default: merge). When a `lora-studio
    serve` runs on the same data dir, the render is handed to it (warm: seconds faster); else it runs here."""
    from app.catalog import AUTO_METHOD

    method = method or (AUTO_METHOD if auto_loras else "merge")
    params = _method_params(param or [], mask or [])
    stack = [parse_lora_weight(x) for x in lora or []]
    if not (in_process or compile):
        request = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
            "seed": seed,
            "num_images": num_images,
            "loras": [{"name": n, "weight": w} for n, w in stack],
            "method": method,
            "method_params": params,
            "auto_loras": auto_loras or None,
        }
        request = {k: v for k, v in request.items() if v is not None}
        report: dict = {}
        with _progress_bar() as (bar, task):
            handed = render_via_server(
                _settings(data_dir).root,
                request,
                out,
                backbone=backbone,
                model=model,
                progress=lambda fraction: bar.update(task, completed=fraction * 100, total=100),
                report=report,
            )
        if handed is not None:
            _print_picks(report.get("auto_loras") or [])
            paths, url = handed
            for p in paths:
                typer.echo(str(p))
            typer.secho(f"rendered by the server at {url} (--in-process to render here)", err=True, dim=True)
            return
    from composer.methods import params_from_json

    studio = _studio(data_dir, compile=compile_mode(compile))
    with _progress_bar() as (bar, task):
        result = studio.render_image(
            prompt=prompt,
            negative_prompt=negative_prompt,
            loras=stack,
            method=method,
            params=params_from_json(method, params),
            seed=seed,
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            num_images=num_images,
            backbone=backbone,
            model=model,
            out=out,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            auto_loras=auto_loras,
        )
    _print_picks(result.provenance.get("auto_loras") or [])
    for p in result.paths:
        typer.echo(str(p))
    for i, (caption, picture) in enumerate(result.pictures):  # what the method used, e.g. its masks
        path = out.with_name(f"{out.stem}.{method}{i}.png")
        picture.save(path)
        typer.echo(f"{path}  ({caption})")


def _print_picks(picks: list[dict]) -> None:
    """Auto mode's picks, one line each, on stderr (stdout holds the PNG paths)."""
    for pick in picks:
        sides = ", ".join(
            f"{side} {pick[f'{side}_score']:.3f}"
            for side in ("text", "weight")
            if pick.get(f"{side}_score") is not None
        )
        typer.secho(f"auto: {pick['name']} (score {pick['score']:.4f}; {sides})", err=True)


@contextmanager
def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=not sys.stderr.isatty(),
    ) as bar:
        yield bar, bar.add_task("denoising", total=None)


def _method_params(pairs: list[str], masks: list[str]) -> dict:
    """--param KEY=VALUE (VALUE read as JSON when it parses, else as text) and --mask NAME=PICTURE."""
    import base64
    import json

    params: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--param {pair!r}: write KEY=VALUE, e.g. feather=4")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    regions = {}
    for entry in masks:
        name, sep, file = entry.partition("=")
        if not sep or not name.strip() or not file:
            _fail(f"--mask {entry!r}: write NAME=PICTURE, e.g. --mask star=left.png")
        path = Path(file).expanduser()
        if not path.is_file():
            _fail(f"--mask {entry!r}: no file {path}")
        regions[name.strip()] = base64.b64encode(path.read_bytes()).decode("ascii")
    if regions:
        params["regions"] = regions
    return params


@app.command()
@_guard
def train(
    images: Annotated[
        Path, typer.Option("--images", help="folder of training images (IMG.txt captions optional)")
    ],
    prompt: Annotated[str, typer.Option(help="instance prompt, e.g. 'a photo of sks dog'")],
    name: Annotated[str, typer.Option(help="catalog name of the new adapter")],
    type_: Annotated[
        str, typer.Option("--type", help="a trainable adapter type (an unknown one lists them)")
    ] = "lora",
    steps: Annotated[
        int | None, typer.Option(help="default: the type's recipe (500; B-LoRA 1000; TLoRA 2000)")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="learning rate (default: the type's recipe)")
    ] = None,
    batch_size: int = 1,
    rank: Annotated[int | None, typer.Option(help="LoRA / B-LoRA rank (default 4; B-LoRA 64)")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: rank)")] = None,
    kron: Annotated[str, typer.Option(help="Kronecker factor A1xA2, e.g. 16x16")] = "16x16",
    tensor_rank: Annotated[int, typer.Option(help="TLoRA residual rank")] = 1,
    transform_rank: Annotated[int, typer.Option(help="TLoRA transform rank")] = 1,
    resolution: Annotated[
        int | None, typer.Option(help="training size (default: the model's native)")
    ] = None,
    seed: int = 0,
    class_prompt: Annotated[str, typer.Option(help="prior preservation class prompt")] = "",
    prior_weight: Annotated[float, typer.Option(help="prior preservation loss weight (0: off)")] = 0.0,
    checkpoint_every: int = 100,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (GPU)")] = "no",
    gradient_checkpointing: bool = False,
    targets: Annotated[
        str,
        typer.Option(help="attention, transformer (all its Linears) or full (and convs; lora, kron, tensor)"),
    ] = "attention",
    train_text_encoder: Annotated[
        bool, typer.Option(help="also adapt the CLIP text encoders' attention (not blora)")
    ] = False,
    snr_gamma: Annotated[
        float | None, typer.Option(help="Min-SNR-gamma loss weighting, e.g. 5 (SDXL; default off)")
    ] = None,
    trigger: Annotated[list[str] | None, typer.Option("--trigger", help="trigger word (repeatable)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="tag (repeatable)")] = None,
    description: str = "",
    resume: Annotated[bool, typer.Option(help="continue the run's last checkpoint")] = False,
    backbone: Annotated[str | None, typer.Option(help="toy, sdxl or flux")] = None,
    model: Annotated[
        str | None, typer.Option(help="'tiny', a diffusers directory, a .safetensors checkpoint or a hub id")
    ] = None,
    data_dir: DataDir = None,
):
    """Train an adapter on a folder of images and add it to the catalog."""
    from composer.train import TrainConfig

    try:
        a1, a2 = (int(x) for x in kron.lower().split("x"))
    except ValueError:
        _fail(f"--kron {kron!r}: write the factor as A1xA2, e.g. 16x16")
    config = TrainConfig(
        kind=type_,
        prompt=prompt,
        steps=steps,
        learning_rate=lr,
        batch_size=batch_size,
        seed=seed,
        resolution=resolution,
        rank=rank,
        alpha=alpha,
        kron_factors=(a1, a2),
        tensor_rank=tensor_rank,
        transform_rank=transform_rank,
        class_prompt=class_prompt,
        prior_weight=prior_weight,
        checkpoint_every=checkpoint_every,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        targets=targets,
        snr_gamma=snr_gamma,
        text_encoder=train_text_encoder,
    ).validate()
    studio = _studio(data_dir)
    with loss_progress(f"training {name}", config.steps) as progress:
        outcome = studio.train(
            config,
            images,
            name,
            backbone=backbone,
            model=model,
            trigger_words=trigger or [],
            tags=tag or [],
            description=description,
            resume=resume,
            progress=progress,
        )
    typer.echo(
        f"{outcome.adapter.name}: {outcome.adapter.adapter_type}, {outcome.parameters:,} parameters, "
        f"{outcome.steps} steps in {outcome.seconds:.0f} s, final loss {outcome.final_loss:.4f}"
    )
    typer.echo(f"run folder {outcome.run_dir}")


app.add_typer(apikey_app, name="apikey")
app.add_typer(admin_app, name="admin")
app.command("train-gates")(train_gates)


@app.command()
@_guard
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    executor: Annotated[
        str | None, typer.Option(help="render jobs run by 'local' worker threads or on 'ray'")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address, e.g. ray://head:10001 (default: a local Ray)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="render workers (threads, or Ray actors)")] = None,
    no_login: Annotated[
        bool,
        typer.Option(
            "--no-login",
            help="serve the studio with no login even beyond loopback (anyone who can reach it can render, "
            "train and change the catalog)",
        ),
    ] = False,
    compile: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    data_dir: DataDir = None,
):
    """Serve the studio (/), the admin page (/admin) and the REST API (/api/v1, docs at /api/v1/docs) over one
    Studio, with a render-job executor. Beyond loopback (--host 0.0.0.0) the studio asks for a catalog user's
    login, and serve refuses to start while no user exists, unless --no-login."""
    import uvicorn

    full_traces()
    from app.handoff import loopback_url
    from app.jobs import make_executor
    from app.serving import ServeRefused, decide_access, summary
    from app.web import create_web_app

    studio = _studio(data_dir, compile=compile_mode(compile))
    given = {"executor": executor, "ray_address": ray_address, "workers": workers}
    settings = studio.settings.model_copy(update={k: v for k, v in given.items() if v is not None})
    if settings.executor not in ("local", "ray"):
        _fail(f"--executor {settings.executor!r}: choose local or ray")
    if settings.workers < 1:
        _fail(f"--workers {settings.workers}: at least 1")
    users = studio.accounts.list_users()
    try:
        access = decide_access(host, "never" if no_login else settings.studio_login, len(users))
    except ServeRefused as exc:
        _fail(str(exc))
    for line in summary(studio, host, port, access, studio.imported_on_open, users):
        typer.secho(
            line, err=line.startswith("WARNING"), fg=typer.colors.RED if line.startswith("WARNING") else None
        )
    app_ = create_web_app(
        studio,
        make_executor(studio, settings),
        login=access.login,
        previews=settings.previews_on_start,
        handoff_url=loopback_url(host, port),
    )
    uvicorn.run(app_, host=host, port=port, log_level="info")


def main() -> None:
    configure_logging(os.environ.get("LORA_STUDIO_LOG", "WARNING"))
    app()


if __name__ == "__main__":
    main()
