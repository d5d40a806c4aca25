"""`/search`: LoRAs for a query: full-text search over names, trigger words, tags and descriptions (`db.search`),
search by what the LoRAs' weights do (the served model's LoRA encoder), or both fused (`app.finder`)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.api.schemas import ErrorResponse, SearchHit, SearchResults, to_read
from app.api.service import StudioDep

router = APIRouter(tags=["search"], responses={401: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})


@router.get(
    "/search",
    response_model=SearchResults,
    responses={
        400: {
            "model": ErrorResponse,
            "description": "weight search asked of a model without a LoRA encoder (text search still works)",
        }
    },
)
def search(
    studio: StudioDep,
    q: Annotated[str, Query(min_length=1, max_length=500, description="words to find")],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    mode: Annotated[
        Literal["hybrid", "text", "weights"],
        Query(description="hybrid: full text and weights fused by reciprocal rank; text; weights"),
    ] = "hybrid",
    tag: Annotated[str | None, Query(max_length=200, description="exact tag")] = None,
) -> SearchResults:
    """The served model's LoRAs for a query or a prompt, best first. Full text matches every word of the query
    (as a word prefix) in a name, trigger word, tag or description; weight search compares the prompt with
    what each LoRA's weights do. Each hit has its score (hybrid: the fused one), its full-text score and its
    weight cosine (null where that side did not find it)."""
    hits = studio.search_loras(q, mode, limit, tag=tag)
    return SearchResults(
        query=q,
        mode=mode,
        results=[
            SearchHit(
                lora=to_read(h.info),
                score=round(h.score, 6),
                text_score=None if h.text_score is None else round(h.text_score, 6),
                weight_score=None if h.weight_score is None else round(h.weight_score, 6),
            )
            for h in hits
        ],
    )
