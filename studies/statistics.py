"""The statistics table contract, re-exported: it lives in ``privacy.statistics``, below studies,
because the gate's disclosure control and DP read it without knowing any analysis."""

from privacy.statistics import (  # noqa: F401
    GROUP_KEYS,
    RELEASE_CLASSES,
    STATISTICS_SCHEMA,
    STRATA_SEP,
    WITHHELD_KEYS,
    empty_statistics,
    from_ipc,
    make_statistics,
    to_ipc,
    validate_statistics,
)
