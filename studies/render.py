"""A study in words, for the permit body that reviews it (``fedomop study render FILE``).

The text says who enters each cohort and when they leave (calendar windows included), which
analyses run with which parameters and strata, what statistics a node releases, and the study
hash the permit binds. Circe cohorts are described by circepy's own print-friendly renderer and
their concept sets by concept id with the vocabulary's names (a set named "Gastrointestinal
hemorrhage" holding cystic fibrosis says so). Cohorts that differ in one or two fields are
flagged, and the exact definition the hash covers closes the text, so two studies with different
hashes never render alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circe.api import cohort_expression_from_json, cohort_print_friendly

from studies.canonical import canonical_study_json, study_hash
from studies.model import (
    CirceCohort,
    Cohort,
    ConceptSet,
    EventCriterion,
    Events,
    Exit,
    Inclusion,
    Range,
    Study,
)

if TYPE_CHECKING:
    from studies.dcat import CatalogueDataset

DOMAIN_WORDS = {
    "condition": "condition occurrence",
    "drug": "drug exposure",
    "drug_era": "drug era",
    "measurement": "measurement",
    "procedure": "procedure",
    "observation": "observation",
    "visit": "visit",
    "death": "death",
    "observation_period": "observation period",
}


def describe_concept_set(concept_set: ConceptSet) -> str:
    """``gi_bleed: 192671 with descendants, excluding 4 (and descendants)``."""
    ids = ", ".join(str(c) for c in concept_set.concepts)
    words = f"{concept_set.name}: concept(s) {ids}"
    if concept_set.include_descendants:
        words += " with descendants"
    if concept_set.excludes:
        words += ", excluding " + ", ".join(str(c) for c in concept_set.excludes)
        words += " (and descendants)" if concept_set.include_descendants else ""
    return words


def _range(value: Range, unit: str) -> str:
    if value.min is not None and value.max is not None:
        return f"between {value.min:g} and {value.max:g}{unit}"
    if value.min is not None:
        return f"at least {value.min:g}{unit}"
    return f"at most {value.max:g}{unit}"


def describe_events(events: Events) -> str:
    """``a measurement of 'hba1c' with value between 7 and 20``."""
    what = DOMAIN_WORDS[events.domain]
    words = f"a {what} of concept set '{events.concept_set}'" if events.concept_set else f"a {what}"
    if events.value is not None:
        words += f" with value {_range(events.value, '')}"
    return words


def _window(rule: EventCriterion) -> str:
    start, end = rule.window.start, rule.window.end

    def day(d: int) -> str:
        if d == 0:
            return "the index date"
        return f"{abs(d)} days {'before' if d < 0 else 'after'} index"

    if start is None and end is None:
        span = "at any time"
    elif start is None:
        span = f"any time up to {day(end)}"
    elif end is None:
        span = f"any time from {day(start)}"
    else:
        span = f"from {day(start)} to {day(end)}"
    return span + (" (within the observation period)" if rule.within_observation else "")


def describe_rule(rule: EventCriterion) -> str:
    """``no condition occurrence of 'ra' at any time``."""
    if rule.max_count == 0:
        count = "no"
    elif rule.max_count is None:
        count = f"at least {rule.min_count}"
    elif rule.min_count == rule.max_count:
        count = f"exactly {rule.min_count}"
    else:
        count = f"between {rule.min_count} and {rule.max_count}"
    event = describe_events(rule).removeprefix("a ")
    return f"{count} {event} starting {_window(rule)}"


def describe_inclusion(inclusion: Inclusion) -> list[str]:
    """One line per inclusion criterion."""
    lines = []
    if inclusion.age is not None:
        lines.append(f"aged {_range(inclusion.age, ' years')} at index")
    if inclusion.sex:
        lines.append("sex " + " or ".join(inclusion.sex))
    if inclusion.prior_observation_days:
        lines.append(
            f"at least {inclusion.prior_observation_days} days of observation before index"
        )
    if inclusion.post_observation_days:
        lines.append(f"at least {inclusion.post_observation_days} days of observation after index")
    lines += [describe_rule(rule) for rule in inclusion.events]
    return lines


def describe_exit(exit_: Exit) -> str:
    """``leave at the end of the observation period, or at the first 'death' if sooner``."""
    if exit_.type == "end_of_observation":
        words = "at the end of the observation period"
    elif exit_.type == "fixed_offset" and exit_.offset_days == 0:
        words = f"at the entry event's {exit_.anchor} date"
    elif exit_.type == "fixed_offset":
        words = f"{exit_.offset_days} days after the entry event's {exit_.anchor} date"
    else:
        words = f"at the end of the drug era (records at most {exit_.gap_days} days apart)" + (
            f" plus {exit_.offset_days} days" if exit_.offset_days else ""
        )
    if exit_.censor:
        words += ", or sooner at the first " + " or ".join(
            describe_events(c).removeprefix("a ") for c in exit_.censor
        )
    return words


def describe_cohort(cohort: Cohort) -> list[str]:
    """The cohort in a few sentences."""
    entry = cohort.entry
    which = "the first" if entry.events == "first" else "every"
    inside = entry.within_observation and entry.domain != "observation_period"
    where = " inside an observation period" if inside else ""
    lines = [
        f"Entry: {which} {describe_events(entry).removeprefix('a ')}{where}; its start date is "
        "the index date."
    ]
    criteria = describe_inclusion(cohort.inclusion)
    if criteria:
        lines.append("Inclusion (all must hold):")
        lines += [f"  - {c}" for c in criteria]
    cap = " (never after the observation period ends)" if entry.within_observation else ""
    lines.append(f"Exit: {describe_exit(cohort.exit)}{cap}.")
    gap = f" or less than {cohort.collapse_days} days apart" if cohort.collapse_days else ""
    lines.append(f"Periods of a person that overlap{gap} are merged.")
    calendar = cohort.calendar
    if calendar.start is not None or calendar.end is not None:
        since = f"from {calendar.start}" if calendar.start else "from any date"
        until = f"to {calendar.end}" if calendar.end else "to any date"
        lines.append(f"Calendar: periods are cut to {since} {until}; empty ones are dropped.")
    return lines


def describe_circe(cohort: CirceCohort) -> list[str]:
    """circepy's print-friendly Markdown for an ATLAS/Circe cohort, then its concept sets by
    concept id with the vocabulary's names: a set's own name is the author's word only."""
    text = cohort_print_friendly(cohort_expression_from_json(json.dumps(cohort.circe)))
    lines = ["ATLAS/Circe cohort definition:"] + [f"  {line}" for line in text.splitlines() if line]
    lines.append("Concept sets as compiled (concept ids; names from the shipped vocabulary):")
    names = vocabulary_names(_circe_concept_ids(cohort.circe))
    for concept_set in cohort.circe.get("ConceptSets", []):
        lines.append(f"  - '{concept_set.get('name', '')}':")
        for item in concept_set.get("expression", {}).get("items", []):
            lines.append(f"    {_circe_item(item, names)}")
    return lines


def _circe_concept_ids(circe: dict[str, Any]) -> list[int]:
    return [
        int(item["concept"]["CONCEPT_ID"])
        for concept_set in circe.get("ConceptSets", [])
        for item in concept_set.get("expression", {}).get("items", [])
    ]


def _circe_item(item: dict[str, Any], names: dict[int, str]) -> str:
    """``441267 Cystic fibrosis (with descendants) -- the set calls it 'GI bleed'!``."""
    concept = item["concept"]
    concept_id = int(concept["CONCEPT_ID"])
    known = names.get(concept_id)
    words = f"{concept_id} {known or '(not in the vocabulary)'}"
    flags = [
        label
        for key, label in (
            ("isExcluded", "excluded"),
            ("includeDescendants", "with descendants"),
            ("includeMapped", "with mapped"),
        )
        if item.get(key)
    ]
    words += f" ({', '.join(flags)})" if flags else ""
    given = str(concept.get("CONCEPT_NAME", ""))
    if known and given and given.casefold() != known.casefold():
        words += f" -- the definition calls it {given!r}, the vocabulary {known!r}"
    return words


def vocabulary_names(concept_ids: list[int]) -> dict[int, str]:
    """Names of concept ids in the vocabulary shipped with fedomop (GiBleed's subset)."""
    import polars as pl

    path = Path(__file__).resolve().parents[1] / "omop_etl" / "vocabulary" / "CONCEPT.csv"
    if not concept_ids or not path.is_file():
        return {}
    table = pl.scan_csv(path, separator="\t", quote_char=None, infer_schema=False)
    wanted = [str(c) for c in set(concept_ids)]
    found = table.filter(pl.col("concept_id").is_in(wanted)).select("concept_id", "concept_name")
    return {int(i): name for i, name in found.collect().iter_rows()}


def near_twins(study: Study) -> list[str]:
    """Pairs of cohorts with the same entry events whose definitions differ in one or two fields
    only: their difference may be a handful of persons, which a researcher could single out by
    subtracting results."""
    flat = {
        c.name: _leaves(c.model_dump(mode="json", exclude={"name", "description"}))
        for c in study.cohorts
    }
    names = list(flat)
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            keys = sorted(set(flat[a]) | set(flat[b]))
            differ = [k for k in keys if flat[a].get(k) != flat[b].get(k)]
            other_entry = any(k in ("entry.domain", "entry.concept_set") for k in differ)
            if 0 < len(differ) <= 2 and not other_entry:
                shown = "; ".join(f"{k}: {flat[a].get(k)} vs {flat[b].get(k)}" for k in differ)
                lines.append(f"- cohorts {a} and {b} differ only in {shown}")
    return lines


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its dotted path."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= _leaves(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out |= _leaves(item, f"{path}[{i}]")
        return out or {path: "[]"}
    return {path: value}


def describe_analysis(spec: Any) -> list[str]:
    """Kind, what it releases (the class docstring's first line), parameters and strata."""
    from studies.analyses import REGISTRY

    summary = (REGISTRY[spec.kind].__doc__ or "").strip().splitlines()
    lines = [f"Analysis {spec.id} ({spec.kind}): {summary[0] if summary else ''}".rstrip(": ")]
    params = spec.model_dump(mode="json", exclude={"id", "kind"})
    strata = params.pop("strata", None)
    for key, value in params.items():
        lines.append(f"  - {key}: {_value(value)}")
    if strata is not None:
        lines.append(f"  - strata: {_strata(strata)}")
    return lines


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_value(v) for v in value) or "(none)"
    if isinstance(value, dict):
        return "; ".join(f"{k} {_value(v)}" for k, v in value.items())
    return str(value)


def _strata(strata: list[Any]) -> str:
    parts = ["overall"] + [" x ".join(s) if isinstance(s, list) else s for s in strata]
    return ", ".join(parts)


def render_datasets(datasets: list[CatalogueDataset], nodes: list[str] | None) -> str:
    """The catalogue datasets a study uses: those of the permit's nodes, or all as candidates."""
    if nodes is None:
        lines = ["", "## Candidate datasets (catalogue; no permit given, so no node list)"]
        chosen = datasets
    else:
        lines = [
            "",
            f"## Datasets used (catalogue datasets of the permit's nodes: {', '.join(nodes)})",
        ]
        chosen = [d for d in datasets if d.node in nodes]
        missing = sorted(set(nodes) - {d.node for d in chosen})
        if missing:
            lines.append(f"(no catalogue dataset for node(s): {', '.join(missing)})")
    lines += [f"- {d.title} [{d.identifier}] at node {d.node or '?'}" for d in chosen]
    if not chosen:
        lines.append("(none)")
    return "\n".join(lines) + "\n"


def render_study(study: Study) -> str:
    """The whole study as plain text (Markdown-friendly) for a permit review."""
    lines = [
        f"# Study {study.name} (schema version {study.schema_version})",
        f"Study hash (SHA-256, bound by the permit): {study_hash(study)}",
    ]
    if study.description:
        lines += ["", study.description.strip()]
    lines += ["", "## Concept sets"]
    lines += [f"- {describe_concept_set(c)}" for c in study.concept_sets] or ["(none)"]
    lines += ["", "## Cohorts"]
    for i, cohort in enumerate(study.cohorts, start=1):
        lines += ["", f"### {cohort.name} (cohort_definition_id {i})"]
        if cohort.description:
            lines.append(cohort.description.strip())
        lines += describe_cohort(cohort) if isinstance(cohort, Cohort) else describe_circe(cohort)
    lines += [
        "",
        "## Analyses and released outputs",
        "Nodes release aggregate statistics only (counts, bounded sums and model terms), after "
        "the gate's disclosure control; never person-level rows.",
    ]
    for spec in study.analyses:
        lines += [""] + describe_analysis(spec)
    twins = near_twins(study)
    if twins:
        lines += ["", "## Cohorts that differ only slightly (check they cannot single someone out)"]
        lines += twins
    lines += [
        "",
        "## Exact definition (what the study hash covers)",
        canonical_study_json(study),
    ]
    return "\n".join(lines) + "\n"
