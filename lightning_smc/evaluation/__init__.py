"""Evaluation: running named methods over prompts, their results and reports (DESIGN §2).

(Transitional: re-exports from ``lightning_smc.methods`` while the split is under way.)
"""

from ..methods import MethodResult, evaluate_method, read_prompts, run_method

__all__ = ["MethodResult", "evaluate_method", "read_prompts", "run_method"]
