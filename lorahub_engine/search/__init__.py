"""LoraHub search: weights for a composition of N adapters on a few examples, by Adam through the grouped op (the
default) or gradient-free (LoraHub's NGOpt, CMA-ES; one batched forward per population); and fit_weights, the
gradient fit with its own losses (AdaMerging's entropy).

    from lorahub_engine.search import lorahub_search
    result = lorahub_search(model, tokenizer, adapters, examples, budget=40, seed=0)  # defaults: DEFAULTS
"""

from lorahub_engine.search.answers import HeldOutAnswers
from lorahub_engine.search.config import DEFAULTS, VALIDATIONS, FitConfig, SearchConfig
from lorahub_engine.search.descent import descend
from lorahub_engine.search.errors import SearchError
from lorahub_engine.search.fit import first_token_entropy, fit_weights
from lorahub_engine.search.lorahub import lorahub_search, search_with
from lorahub_engine.search.loop import check_search, evaluate, run_search, search_history
from lorahub_engine.search.modules import random_modules, retrieved_modules
from lorahub_engine.search.objective import FewShotObjective, encode_pairs, l1_penalty
from lorahub_engine.search.optimizers import AskTellOptimizer, CMAOptimizer, NevergradOptimizer, make_optimizer
from lorahub_engine.search.validate import Choice, cross_validate, folds_of
from lorahub_engine.search.result import Evaluation, SearchResult

__all__ = [
    "AskTellOptimizer",
    "CMAOptimizer",
    "Choice",
    "DEFAULTS",
    "FitConfig",
    "HeldOutAnswers",
    "Evaluation",
    "FewShotObjective",
    "NevergradOptimizer",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "VALIDATIONS",
    "check_search",
    "cross_validate",
    "descend",
    "encode_pairs",
    "evaluate",
    "first_token_entropy",
    "fit_weights",
    "folds_of",
    "l1_penalty",
    "lorahub_search",
    "make_optimizer",
    "random_modules",
    "retrieved_modules",
    "run_search",
    "search_history",
    "search_with",
]
