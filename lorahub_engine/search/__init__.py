"""LoraHub search: gradient-free weights for a factor-linear composition, one batched forward per population.

    from lorahub_engine.search import lorahub_search
    result = lorahub_search(model, tokenizer, adapters, examples, budget=40, population=1, seed=0)
"""

from lorahub_engine.search.config import SearchConfig
from lorahub_engine.search.errors import SearchError
from lorahub_engine.search.lorahub import lorahub_search, run_search
from lorahub_engine.search.modules import random_modules, retrieved_modules
from lorahub_engine.search.objective import FewShotObjective, encode_pairs, l1_penalty
from lorahub_engine.search.optimizers import AskTellOptimizer, NevergradOptimizer, make_optimizer
from lorahub_engine.search.result import Evaluation, SearchResult

__all__ = [
    "AskTellOptimizer",
    "Evaluation",
    "FewShotObjective",
    "NevergradOptimizer",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "encode_pairs",
    "l1_penalty",
    "lorahub_search",
    "make_optimizer",
    "random_modules",
    "retrieved_modules",
    "run_search",
]
