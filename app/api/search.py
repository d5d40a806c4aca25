"""`/search`: LoRAs for a query, ranked by full-text search over names, trigger words, tags and descriptions
(`db.search`); retrieval by what the weights do will join it (issue 21)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.schemas import ErrorResponse, SearchHit, SearchResults, to_read
from app.api.service import StudioDep

router = APIRouter(tags=["search"], responses={401: {"model": ErrorResponse}, 429: {"model": ErrorResponse}})


@router.get("/search", response_model=SearchResults)
def search(
    studio: StudioDep,
    q: Annotated[str, Query(min_length=1, max_length=500, description="words to find")],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> SearchResults:
    """LoRAs whose name, trigger words, tags or description hold every word of the query (as a word prefix),
    best first, each with its full-text score (higher is better)."""
    items = studio.library.search(q, limit=limit)
    return SearchResults(
        query=q, results=[SearchHit(lora=to_read(info), score=round(score, 6)) for info, score in items]
    )
