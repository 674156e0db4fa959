"""Task classes used by the Airflow tests (importable as ``astra_test_tasks`` from the tests directory)."""

from __future__ import annotations

from pathlib import Path

from astra_provider.base import Parameter, TaskInstance


class ReadScale(TaskInstance):
    """Read a number from the input file, multiply it by ``scale`` and write it to ``output_dir``.

    The written file is the task's output data product, so a second step can take it as input. A negative
    number fails the task (and only that task of the bundle).
    """

    output_dir = Parameter(bundled=True, description="Where the scaled numbers are written.")
    scale = Parameter(default=2.0, description="The multiplier.")

    def pre_execute(self):
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)

    def execute(self):
        results = []
        for task, data_products in self.iterable():
            source = Path(data_products[0].path)
            value = float(source.read_text())
            if value < 0:
                raise ValueError(f"negative value {value} in {source.name}")
            scaled = value * task.parameters["scale"]
            output = Path(task.parameters["output_dir"]) / f"{source.stem}.txt"
            output.write_text(repr(scaled))
            self.add_output_data_product(task, output)
            results.append(scaled)
        return results
