"""fedomop: federated secondary use of OMOP CDM data, shaped like the EHDS and HealthData@EU.

The distribution's rooms are the top-level packages ``omop_etl``, ``studies``, ``privacy``,
``node`` and ``coordinator``; this package only holds the version and the ``fedomop`` command.
"""

__version__ = "0.1.0"
