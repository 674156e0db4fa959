"""The example tasks of the user's guide, runnable as written there."""

from __future__ import annotations

import time

from astra_provider.base import Parameter, TaskInstance
from astra_provider.database.astradb import RandomNumberGenerator


class GreedyPrimes(TaskInstance):
    """The primes in ``[min_value, max_value)``, by trial division."""

    min_value = Parameter(default=2, type=int)
    max_value = Parameter(type=int)

    def execute(self):
        primes = []
        for n in range(self.min_value, self.max_value):
            for i in range(2, n):
                if n % i == 0:
                    break
            else:
                primes.append(n)
        return primes


class RandomNumberGeneratorTask(TaskInstance):
    """Draw ``draws`` normal deviates with ``seed`` and write them to ``astra.random_number_generator``."""

    task_namespace = "RNG"  # as in the user's guide: task_ids read RNG.RandomNumberGeneratorTask_...

    seed = Parameter(type=int, description="The random seed to use.")
    draws = Parameter(default=1, type=int, description="The number of draws to make.")
    delay_time = Parameter(default=0, type=float, description="Seconds to wait before drawing.")

    def execute(self):
        import numpy as np

        results = []
        for task, _ in self.iterable():
            time.sleep(task.parameters["delay_time"])
            samples = np.random.default_rng(task.parameters["seed"]).normal(size=task.parameters["draws"])
            self.add_result(task, RandomNumberGenerator, samples=samples)
            results.append(samples.tolist())
        return results


class ScaledSum(TaskInstance):
    """A bundled toy task: every task adds its ``value`` to a shared, bundled ``offset`` loaded once."""

    offset = Parameter(bundled=True, description="Loaded once per bundle (stands in for a model).")
    value = Parameter(description="The per-task value.")
    scale = Parameter(default=1, description="A per-task multiplier.")

    def pre_execute(self):
        self.loaded_offset = float(self.offset)

    def execute(self):
        results = []
        for task, _ in self.iterable():
            if task.parameters["value"] is None:
                raise ValueError("value is None")
            results.append(self.loaded_offset + task.parameters["scale"] * task.parameters["value"])
        return results
