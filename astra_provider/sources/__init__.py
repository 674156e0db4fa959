"""Sources (stars) and the data products that observe them.

When a data product is registered, the identifiers its file carries (``SDSS_ID``, ``CATALOGID``, the
APOGEE ``OBJID``/2MASS designation, ``THING_ID``; see :mod:`astra_provider.sdss.headers`) link it to a row
of ``astra.source``, created if needed. The modules:

* :mod:`~astra_provider.sources.linking`: the bulk get-or-create of sources and links, and the conflicts;
* :mod:`~astra_provider.sources.registration`: where the identifiers come from (the sensor's header read,
  the spectrum readers of a task, the inputs of a task for the files it writes);
* :mod:`~astra_provider.sources.lookup`: a source's data products and every result for them
  (``astra source ID``).
"""

from astra_provider.sdss.headers import SourceIdentifiers
from astra_provider.sources.linking import Conflict, LinkReport, SourceConflictError, link_sources

__all__ = ["Conflict", "LinkReport", "SourceConflictError", "SourceIdentifiers", "link_sources"]
