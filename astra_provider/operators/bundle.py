"""Bundling over dynamic task mapping: plan bundles of tasks for a mapped :class:`ExecuteBundleOperator`.

One Airflow task instance costs ~0.2-0.4 s of scheduling and ``[core] max_map_length`` (1024 by default)
caps a mapped task, so tasks are grouped into bundles first: :class:`BundleTasksOperator` takes one set of
keyword arguments per task (or data products, one task each), groups them by the task class's bundled
parameters, chunks each group to ``bundle_size`` and caps the number of bundles at ``max_bundles`` (growing
the bundle size instead). Its XCom is a list of ``{"bundle": {...}}`` for ``expand_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from astra_provider.operators._inputs import materialize, resolve_data_products, skip_unless_enabled
from astra_provider.operators.task import task_class_path

if TYPE_CHECKING:
    from airflow.sdk import Context


class BundleTasksOperator(BaseOperator):
    """Plan the bundles of a task class; the XCom feeds ``ExecuteBundleOperator.expand_kwargs``.

    :param task_class: the task class (or its dotted path); its bundled parameters decide the groups.
    :param items: (templated) one dict of keyword arguments per task: parameter values and, optionally,
        ``input_data_products``; typically the XCom of an upstream ``@task``.
    :param data_products: (templated) data products to run one task on each: pks (``[first, last]`` pairs
        are ranges), paths, the data product sensor's XCom, or an astra operator's XCom (the output data
        products of its completed tasks; a mapped operator's XCom works too).
    :param input_filetypes: keep only ``data_products`` of these filetypes.
    :param parameters: (templated) parameter values for every task; an item's own values take precedence.
    :param bundle_size: (templated) the preferred number of tasks per bundle.
    :param max_bundles: (templated) the most bundles (mapped task instances) to make; the bundle size grows
        to respect it. It is also capped by ``[core] max_map_length``.
    :param astra_conn_id: the astra database connection (to look up upstream outputs and filetypes).
    :param enabled: (templated) false skips the planner, so the mapped task and the steps that need it are
        skipped too; the planner's log says why (an optional step).
    """

    template_fields: Sequence[str] = (
        *("items", "data_products", "parameters", "bundle_size", "max_bundles", "enabled"),
    )
    template_fields_renderers = {"parameters": "json"}
    ui_color = "#f5ecd8"

    def __init__(
        self,
        *,
        task_class: str | type,
        items: Any = None,
        data_products: Any = None,
        input_filetypes: Sequence[str] | None = None,
        parameters: dict[str, Any] | None = None,
        bundle_size: int | str = 500,
        max_bundles: int | str = 100,
        astra_conn_id: str = "astra_default",
        enabled: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.enabled, self.enabled_source = enabled, enabled
        self.task_class = task_class_path(task_class)
        self._task_class_object = None if isinstance(task_class, str) else task_class
        self.items = items
        self.data_products = data_products
        self.input_filetypes = list(input_filetypes) if input_filetypes else None
        self.parameters = parameters or {}
        self.bundle_size = bundle_size
        self.max_bundles = max_bundles
        self.astra_conn_id = astra_conn_id

    def execute(self, context: Context) -> list[dict[str, Any]]:
        from airflow.sdk.configuration import conf

        from astra_provider.base import import_task_class
        from astra_provider.bundling import plan_bundles
        from astra_provider.hooks.astra import AstraHook

        skip_unless_enabled(self.enabled, self.enabled_source, self.task_id)
        cls = self._task_class_object or import_task_class(self.task_class)
        items = list(materialize(self.items) or [])
        if self.data_products is not None:
            hook = AstraHook(astra_conn_id=self.astra_conn_id)
            hook.configure()
            inputs = resolve_data_products(self.data_products, hook, self.input_filetypes)
            items.extend({"input_data_products": value} for value in inputs)
        if not items:
            self.log.info("No tasks to bundle: the mapped task that runs the bundles will be skipped")
            return []

        bundle_size, max_bundles = int(self.bundle_size), int(self.max_bundles)
        max_map_length = conf.getint("core", "max_map_length", fallback=1024)
        if max_bundles > max_map_length:
            self.log.warning(
                "max_bundles=%d exceeds [core] max_map_length=%d; using the latter",
                max_bundles,
                max_map_length,
            )
            max_bundles = max_map_length
        bundles = plan_bundles(
            cls, items, parameters=self.parameters, bundle_size=bundle_size, max_bundles=max_bundles
        )
        largest = max(bundle["size"] for bundle in bundles)
        if largest > bundle_size:
            self.log.info(
                "bundle_size grown from %d to %d so that %d tasks make at most max_bundles=%d bundles",
                bundle_size,
                largest,
                len(items),
                max_bundles,
            )
        self.log.info(
            "%d %s task(s) in %d bundle(s):\n%s",
            len(items),
            cls.__name__,
            len(bundles),
            "\n".join(f"  [{index}] {bundle['label']}" for index, bundle in enumerate(bundles)),
        )
        return [{"bundle": bundle} for bundle in bundles]
