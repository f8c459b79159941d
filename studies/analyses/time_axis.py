"""The released time axis of ``survival`` and ``cox``: declared bins, node segments, one grid.

Event and censoring days are person-level data: one person's day, or the covariates of the one
person who leaves the risk set at a time (``dS1/dS0`` of a Cox risk set), are given away by a
time axis that follows the data. So time leaves a node only like this:

1. **Declared bins.** The study fixes ``time_bin_days`` (``w``, at least the node policy's
   ``min_time_bin_days``); a follow-up time of ``days`` becomes the end of its bin,
   ``ceil(days / w) * w`` (0, w, 2w, ...). Nothing finer exists after this step.
2. **Node segments** (round 0, on the node, ``segment_ends``): the node merges adjacent bins
   into segments, cut only at the boundaries of one dyadic hierarchy of the declared bins (so
   different nodes' cuts line up), until in every series it releases (Cox: one; survival:
   every target cohort x stratum) each segment's events and its censorings are each 0 or at
   least ``k`` (the gate's minimum cell count, which the gate hands to ``local``). A sparse
   block joins its neighbour's segment. The node releases its events and its leavers (events +
   censorings: so every difference of two released counts is 0 or ``>= k`` too) per segment and series,
   keyed by the segment's last bin: every count it releases is 0 or ``>= k``, and no released
   count is a part of another released count at a finer split, so nothing small is derivable
   by differencing within the release (nor between strata: they share the node's segments).
3. **One grid** (``combine``, from the signed round-0 releases, ``merged_grid``): a cut between
   two bins is allowed for a node when it lies at one of its segment ends or after its last one;
   the grid is the set of segment ends that every node allows. Each node's segments then fall
   whole into merged bins, so between two grid times every node has 0 or at least ``k`` persons
   leaving the risk set, events and censorings alike. The rule is a pure function of the
   released tables (in node-name order), so every node recomputes the same grid.

Later rounds (Cox's risk sets) are computed on that grid only: a time is coarsened to the first
grid time at or after it (``coarsen_sql``), and a node checks that a grid it is asked to answer
on cuts none of its own segments (``check_grid``) before it reads anything else. Pooled results
are the exact pooled method (Kaplan–Meier, Breslow Cox) on times coarsened to the grid.

Combine needs no ``k``: what it merges are the node's own released segments, already ``0 or
>= k`` each, and sums of such counts are again ``0 or >= k``; a node with a stricter policy
simply releases coarser segments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import polars as pl

#: ``variable_name`` of the per-segment rows (``variable_level``: the segment's last bin).
TIME_VARIABLE = "time"
#: Follow-up when a study sets none (``TIME_TO_EVENT_CTE``'s cap of 36600 days).
MAX_FOLLOW_UP_DAYS = 36600


def _releasable(totals: np.ndarray, k: int) -> bool:
    """Every count (events and censorings of every series) 0 or at least ``k``."""
    return bool(np.all((totals == 0) | (totals >= k)))


def axis_bins(bin_days: int, follow_up_days: int | None) -> int:
    """The last declared bin index: follow-up (or the 100-year cap) rounded up to a bin."""
    return math.ceil((follow_up_days or MAX_FOLLOW_UP_DAYS) / bin_days)


def segment_ends(
    bins: pl.DataFrame, k: int, bin_days: int, follow_up_days: int | None = None
) -> list[int]:
    """The node's segment ends (days of each segment's last bin) over its binned counts.

    ``bins`` has one row per series and bin with leavers: ``series`` (any key), ``t`` (bin end,
    days), ``n_event``, ``n_censor``. Segments are cut only at the boundaries of a fixed dyadic
    hierarchy of the declared bins (halves, quarters... of the axis, the same at every node), so
    the segments of different nodes line up and their common grid stays fine where all of them
    are dense: a block is split in halves when both halves can be cut into releasable segments
    (every series' events and censorings 0 or ``>= k``); a half that cannot joins the segment of
    its sibling next to it. Empty segments are kept (their zero counts are released) up to the
    last segment with leavers. If no cut passes, the one segment is returned and the gate
    withholds its counts.
    """
    if bins.height == 0:
        return []
    last = axis_bins(bin_days, follow_up_days)
    size = 1 << max(0, last).bit_length()
    series = sorted(set(bins["series"].to_list()), key=str)
    index = {s: i for i, s in enumerate(series)}
    counts = np.zeros((size + 1, len(series), 2))
    for t, key, e, c in bins.select("t", "series", "n_event", "n_censor").iter_rows():
        counts[min(int(t) // bin_days, last) + 1, index[key]] += (e, c)
    cum = np.cumsum(counts, axis=0)
    cuts = _cuts(cum, 0, size, k)
    bounds = [0, *(cuts or []), size]
    ends = [min(b - 1, last) * bin_days for b in bounds[1:]]
    filled = [bool((cum[b] - cum[a]).any()) for a, b in zip(bounds, bounds[1:], strict=False)]
    keep = max(i for i, f in enumerate(filled) if f) + 1
    return sorted(set(ends[:keep]))


def _cuts(cum: np.ndarray, a: int, b: int, k: int) -> list[int] | None:
    """Cut positions inside bins ``[a, b)`` leaving releasable segments, None when the block
    itself is not releasable (its parent then keeps it inside a larger segment)."""
    total = cum[b] - cum[a]
    if not total.any():
        return []
    whole = _releasable(total, k)
    if b - a == 1:
        return [] if whole else None
    mid = (a + b) // 2
    left, right = _cuts(cum, a, mid, k), _cuts(cum, mid, b, k)
    if left is not None and right is not None:
        return [*left, mid, *right]
    if not whole:
        return None
    if left is not None:  # the right half joins the left half's last segment
        while left and not _releasable(cum[b] - cum[left[-1]], k):
            left.pop()
        return left
    if right is not None:  # the left half joins the right half's first segment
        while right and not _releasable(cum[right[0]] - cum[a], k):
            right.pop(0)
        return right
    return []


def merged_grid(node_ends: Sequence[Iterable[int]]) -> list[int]:
    """The common grid: segment ends that no node's segment spans (see the module docstring).

    A cut at ``c`` is allowed for a node when ``c`` is one of its ends or at or after its last
    one (nodes without segments allow every cut); the largest end of all is always allowed, so
    the grid covers every node's times.
    """
    ends = [sorted(set(e)) for e in node_ends]
    members = [set(e) for e in ends]
    candidates = sorted({c for e in ends for c in e})
    return [
        c
        for c in candidates
        if all(not e or c >= e[-1] or c in m for e, m in zip(ends, members, strict=True))
    ]


def allows(ends: Sequence[int], cut: int) -> bool:
    """Whether a grid time ``cut`` leaves every one of a node's segments (``ends``) whole."""
    return not ends or cut >= ends[-1] or cut in ends


def check_grid(grid: object, ends: Sequence[int], bin_days: int, what: str) -> list[int]:
    """The grid of a state, checked on the node before any risk set is read: a list of
    increasing multiples of ``bin_days`` that cuts none of this node's segments (``ends``) and
    reaches its last one. ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(grid, list) or not grid:
        raise ValueError(f"{what}: state grid must be a non-empty list of bin ends")
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in grid):
        raise ValueError(f"{what}: state grid holds a value that is not a whole day")
    if any(b <= a for a, b in zip(grid, grid[1:], strict=False)) or grid[0] < 0:
        raise ValueError(f"{what}: state grid is not increasing from day 0")
    if any(g % bin_days for g in grid):
        raise ValueError(f"{what}: state grid has a time off the study's {bin_days}-day bins")
    if ends and grid[-1] < ends[-1]:
        raise ValueError(f"{what}: state grid ends before this node's last segment")
    cutting = [g for g in grid if not allows(ends, g)]
    if cutting:
        raise ValueError(
            f"{what}: state grid cuts {len(cutting)} of this node's released segments: "
            "a grid comes from the round-0 releases only"
        )
    return grid


def coarsen_sql(column: str = "t") -> str:
    """SQL: ``column`` rounded up to the first time of ``$grid`` (BIGINT[]) at or after it."""
    return f"list_filter($grid::BIGINT[], lambda g: g >= {column})[1]"


def segment_table(node: pl.DataFrame) -> pl.DataFrame:
    """One node's released per-segment rows (``variable_name`` ``time``) with ``end`` as int."""
    return node.filter(pl.col("variable_name") == TIME_VARIABLE).with_columns(
        pl.col("variable_level").cast(pl.Int64).alias("end")
    )


def to_grid(node: pl.DataFrame, grid: Sequence[int]) -> pl.DataFrame:
    """One node's per-segment rows re-keyed to the merged grid time holding each segment and
    summed there (NaN stays NaN: a withheld segment withholds its merged bin for that node)."""
    rows = segment_table(node)
    if rows.height == 0:
        return node
    target = np.asarray(grid, dtype=np.int64)
    position = np.searchsorted(target, rows["end"].to_numpy(), side="left")
    if np.any(position >= target.size):
        raise ValueError("a node released a segment after the end of the merged grid")
    bounds = [c for c in ("lower", "upper") if c in node.columns]  # NaN: not a grouping key
    keys = [c for c in node.columns if c not in ("variable_level", "value", *bounds)]
    merged = (
        rows.with_columns(pl.Series("variable_level", target[position].astype(str)))
        .group_by([*keys, "variable_level"], maintain_order=True)
        .agg(pl.col("value").sum(), *(pl.col(c).first() for c in bounds))
        .select(node.columns)
    )
    return pl.concat([node.filter(pl.col("variable_name") != TIME_VARIABLE), merged])


def per_segment(bins: pl.DataFrame, ends: Sequence[int], keys: Sequence[str]) -> pl.DataFrame:
    """Binned counts (``t``, ``n_event``, ``n_censor`` per ``keys``) summed per node segment:
    ``t`` becomes the segment's last bin (``ends`` from ``segment_ends`` on the same rows), and
    ``n_leave`` (events + censorings) is added: a node releases ``n_event`` and ``n_leave``, two
    counts whose difference (the censorings) is 0 or >= k too, as the gate's linked-count rule
    asks of every group."""
    if bins.height == 0:
        return bins.with_columns(pl.lit(0, dtype=bins.schema["n_event"]).alias("n_leave"))
    end = np.asarray(ends, dtype=np.int64)
    position = np.searchsorted(end, bins["t"].to_numpy(), side="left")
    return (
        bins.with_columns(pl.Series("t", end[position]))
        .group_by([*keys, "t"], maintain_order=True)
        .agg(pl.col("n_event").sum(), pl.col("n_censor").sum())
        .with_columns((pl.col("n_event") + pl.col("n_censor")).alias("n_leave"))
        .sort([*keys, "t"])
    )


def withheld(node: pl.DataFrame) -> bool:
    """Whether a node's gate withheld any of its per-segment counts (NaN or null)."""
    values = segment_table(node)["value"]
    return bool(values.is_nan().any() or values.is_null().any())


def tables_on_grid(tables: Sequence[pl.DataFrame]) -> tuple[list[int], list[pl.DataFrame]]:
    """The merged grid of the nodes that released their segments whole, and every node's table
    re-keyed to it. A node whose gate withheld a segment cannot be split onto any grid (its
    withheld counts are unknown), so it takes no part in choosing the grid and is marked
    withheld (NaN) at every grid time of every series it sent: ``pool`` leaves it out there
    and ``partial_pool_rows`` names it, instead of one withheld node coarsening everyone."""
    whole = [t for t in tables if not withheld(t)]
    grid = merged_grid([segment_table(t)["end"].to_list() for t in whole or tables])
    out = []
    for table in tables:
        if not withheld(table):
            out.append(to_grid(table, grid))
            continue
        rows = segment_table(table).drop("end", "variable_level").unique(maintain_order=True)
        rows = rows.drop("value").unique(maintain_order=True)
        marks = rows.join(pl.DataFrame({"variable_level": [str(g) for g in grid]}), how="cross")
        marks = marks.with_columns(pl.lit(float("nan")).alias("value")).select(table.columns)
        out.append(pl.concat([table.filter(pl.col("variable_name") != TIME_VARIABLE), marks]))
    return grid, out
