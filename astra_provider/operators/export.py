"""The ``export`` step at the end of the pipeline DAG: write the summary catalogues of the pipelines.

A thin operator over :func:`astra_provider.catalogue.export_catalogues`: one file per pipeline and kind
(star, visit) that has results, named as in an Astra release (``astraAllStarTheCannon-<version>.fits``),
in ``output_dir``. The XCom lists the files written with their row counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context


class ExportCatalogueOperator(BaseOperator):
    """Write the summary catalogues; XCom ``[{"path", "pipeline", "kind", "format", "rows"}, ...]``.

    :param output_dir: directory of the catalogue files (templated; created if missing); empty or ``None``:
        ``$ASTRA_HOME/catalogues`` of the worker.
    :param pipelines: result tables to export (templated; default: every one with results).
    :param kinds: ``star`` and/or ``visit`` (templated; default both).
    :param format: ``fits`` (default), ``csv`` (ECSV) or ``parquet`` (needs pyarrow).
    :param astra_conn_id: the Airflow connection of the astra database.
    """

    template_fields: Sequence[str] = ("output_dir", "pipelines", "kinds", "format")
    ui_color = "#e8daef"

    def __init__(
        self,
        *,
        output_dir: str | None = None,
        pipelines: Sequence[str] | None = None,
        kinds: Sequence[str] = ("star", "visit"),
        format: str = "fits",
        astra_conn_id: str = "astra_default",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.output_dir = output_dir
        self.pipelines = pipelines
        self.kinds = kinds
        self.format = format
        self.astra_conn_id = astra_conn_id

    def execute(self, context: Context) -> list[dict[str, Any]]:
        from astra_provider.catalogue import export_catalogues
        from astra_provider.database import astra_home
        from astra_provider.hooks.astra import AstraHook

        output_dir = self.output_dir or str(astra_home() / "catalogues")
        results = export_catalogues(
            output_dir,
            pipelines=list(self.pipelines) if self.pipelines else None,
            kinds=[self.kinds] if isinstance(self.kinds, str) else list(self.kinds),
            format=self.format,
            database_url=AstraHook(self.astra_conn_id).get_database_url(),
        )
        for result in results:
            self.log.info(
                "Wrote %d rows of %s (%s) to %s", result.rows, result.pipeline, result.kind, result.path
            )
        if not results:
            self.log.warning("No pipeline has results yet: no catalogue written to %s", output_dir)
        return [
            {"path": r.path, "pipeline": r.pipeline, "kind": r.kind, "format": r.format, "rows": r.rows}
            for r in results
        ]
