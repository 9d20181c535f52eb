"""MetaSchedule's search pieces, configured for graphopt's task-by-task loop.

MetaSchedule's own (evolutionary search, XGBoost cost model) over one search space at a
time (``_space.py``: graphopt's rules or MetaSchedule's post-order-apply),
with a smaller search per batch and only the CPU tensor intrinsics loaded: see each
function for why.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import tvm
from tvm.s_tir.meta_schedule import TuneContext
from tvm.s_tir.meta_schedule.cost_model import CostModel, RandomModel, XGBModel
from tvm.s_tir.meta_schedule.feature_extractor import PerStoreFeature
from tvm.s_tir.meta_schedule.logging import get_logger
from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

from graphopt.tuning._options import TuneOptions
from graphopt.tuning._space import space_generator
from graphopt.tuning._tasks import Task

__all__ = ["cost_model", "tune_context"]


def _search_strategy(population: int) -> EvolutionarySearch:
    # MetaSchedule's defaults (population 512, 4 generations) cost ~1 min of search per
    # batch on 2 cores; these keep search a fraction of build + measure time.
    return EvolutionarySearch(
        population_size=population,
        init_measured_ratio=0.2,
        init_min_unmeasured=min(50, population),
        genetic_num_iters=3,
        genetic_max_fail_count=4,
    )


def cost_model(cores: int) -> CostModel:
    """XGBoost's learned model, or a random one when xgboost is not installed."""
    try:
        import xgboost  # noqa: F401
    except ImportError:  # tuning still works, the search is just blinder
        return RandomModel()
    return XGBModel(extractor=PerStoreFeature(), adaptive_training=True, num_tuning_cores=cores)


def _cpu_intrinsics_only() -> None:
    """Register only the CPU tensor intrinsics before MetaSchedule imports them all.

    Making a ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` builds every
    target's intrinsics: 20-35 s on a loaded 2-core machine, almost all of it CUDA's.
    A bare package module in its place lets each submodule still import on demand.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(found.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    import tvm.s_tir

    tvm.s_tir.tensor_intrin = package
    importlib.import_module(f"{name}.x86")
    importlib.import_module(f"{name}.arm_cpu")


def tune_context(
    task: Task, target: tvm.target.Target, *, cores: int, options: TuneOptions, space: str
) -> TuneContext:
    """A MetaSchedule ``TuneContext`` for one task in one search space ("graphopt" or
    "generic")."""
    _cpu_intrinsics_only()  # before the first TuneContext imports every target's intrinsics
    logger = get_logger("graphopt.tuning")
    logger.setLevel("WARNING")
    return TuneContext(
        task.mod,
        target=target,
        space_generator=space_generator(space, target),
        search_strategy=_search_strategy(options.population),
        task_name=task.name,
        rand_state=options.seed,
        num_threads=cores,
        logger=logger,
    )
