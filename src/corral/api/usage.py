"""Usage per business, key and hour (issue 28, metering): `GET /api/usage`, as JSON or CSV (corral.metering)."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from corral.api.schemas import errors
from corral.domain.usage import TIME_TEXT_MAX, GroupBy, UsageRow, usage_window

router = APIRouter(prefix="/api", tags=["serving"])


class UsageEntry(BaseModel):
    business: str | None = Field(description="the business (finetune tasks: their businessTag, `(finetune)` without one)")
    keyId: str | None = Field(description="the API key's id (groupBy=key); null: requests without a key, and GPU time")
    hour: datetime | None = Field(description="the hour's start (groupBy=hour)")
    requests: int
    promptTokens: int
    completionTokens: int
    errors: int
    held: int = Field(description="requests that waited in the gateway's hold for a free replica")
    rejected: int = Field(description="requests the gateway answered itself (no replica, limits, bad requests)")
    replicaSeconds: float = Field(description="seconds its replicas were assigned to it, summed over replicas")
    gpuSeconds: float = Field(description="the GPUs of those replicas integrated over that time (and finetune GPUs)")


class UsageReport(BaseModel):
    start: datetime = Field(alias="from")
    to: datetime
    groupBy: GroupBy
    rows: list[UsageEntry]

    model_config = {"populate_by_name": True}


COLUMNS = ("business", "keyId", "hour", "requests", "promptTokens", "completionTokens", "errors", "held", "rejected",
           "replicaSeconds", "gpuSeconds")


def entry(row: UsageRow) -> UsageEntry:
    c, h = row.counts, row.held
    return UsageEntry(business=row.business, keyId=row.key_id,
                      hour=datetime.fromtimestamp(row.hour, timezone.utc) if row.hour is not None else None,
                      requests=c.requests, promptTokens=c.prompt_tokens, completionTokens=c.completion_tokens,
                      errors=c.errors, held=c.held, rejected=c.rejected, replicaSeconds=round(h.replica_seconds, 3),
                      gpuSeconds=round(h.gpu_seconds, 3))


def as_csv(entries: list[UsageEntry]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for e in entries:
        wire = e.model_dump(mode="json")
        writer.writerow(["" if wire[c] is None else wire[c] for c in COLUMNS])
    return out.getvalue()


@router.get("/usage", response_model=UsageReport, response_model_by_alias=True, responses={
    **errors(400), 200: {"description": "the usage, as JSON or (format=csv, or Accept: text/csv) CSV",
                         "content": {"text/csv": {"schema": {"type": "string"}}}}})
async def usage(request: Request,
                start: str | None = Query(default=None, alias="from", max_length=TIME_TEXT_MAX,
                                          description="ISO 8601 start (default: 24 hours before `to`); no zone: UTC"),
                to: str | None = Query(default=None, max_length=TIME_TEXT_MAX, description="ISO 8601 end (default: now)"),
                groupBy: GroupBy = Query(default=GroupBy.BUSINESS, description="business, key (business and key) or "
                                         "hour (hour and business)"),
                format: Literal["json", "csv"] | None = Query(default=None, description="csv: the rows as CSV")) -> Any:
    """What each business used over [from, to): requests, prompt and completion tokens, errors, held and rejected
    requests (hourly counts: an hour overlapping the window counts whole), and GPU-seconds integrated exactly from
    the assignment history. At most 366 days at once."""
    frm, end = usage_window(start, to, datetime.now(timezone.utc))
    rows = [entry(r) for r in await request.app.state.runtime.metering.report_now(frm, end, groupBy)]
    if format == "csv" or (format is None and "text/csv" in request.headers.get("accept", "")):
        return Response(as_csv(rows), media_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="corral-usage-{groupBy}.csv"'})
    return UsageReport(start=frm, to=end, groupBy=groupBy, rows=rows)
