"""Auto mode's cost beside a render, and embedding one LoRA (issue 21).

OMP_NUM_THREADS=1 python -m bench.auto_mode [--repeat 5] [--steps 30]

A toy studio (bundled LoRAs and the zoo sample imported) times, round-robin:
- embed: one catalog entry embedded from its file (read, resident on the pipeline, encoded, stored);
- pick: auto mode's selection for a prompt (the prompt's text embedding, the vector index, full-text search,
  fusion), K = 2;
- render: the toy model's render of that prompt with the two picks, `merge`, at --steps;
- render+pick: what `render --auto-loras 2` does, both together.
Prints min / median / max seconds with the repeat count, and pick / render as a ratio per round.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import toyworld
from app.settings import Settings
from app.studio import Studio
from bench.common import ratio, round_robin, spread

PROMPT = "a red star on the left, white background"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio.open(Settings(data_dir=Path(tmp) / "data", bundled=True))
        sample = toyworld.PACKAGE_DIR / "zoo_sample"
        for line in (sample / "zoo.jsonl").read_text().splitlines():
            studio.library.import_file(sample / json.loads(line)["file"])
        finder = studio.finder()
        entries = len(finder.index())
        some = studio.library.list(limit=1)[0]
        picks = [name for name, _ in studio.auto_stack(PROMPT, 2)[1]]
        out = Path(tmp) / "r.png"

        def render():
            studio.render_image(prompt=PROMPT, loras=[(n, 1.0) for n in picks], steps=args.steps, out=out)

        times = round_robin(
            {
                "embed": lambda: finder.embed(some),
                "pick": lambda: studio.auto_stack(PROMPT, 2),
                "render": render,
                "render+pick": lambda: studio.render_image(
                    prompt=PROMPT, auto_loras=2, method="merge", steps=args.steps, out=out
                ),
            },
            args.repeat,
        )
    result = {
        "catalog_entries": entries,
        "steps": args.steps,
        "seconds": {name: spread(t, digits=4) for name, t in times.items()},
        **ratio(times, "pick", "render", "pick_over_render"),
        **ratio(times, "render+pick", "render", "auto_over_plain"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
