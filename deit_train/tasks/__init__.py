"""What a run can train: the built-in tasks, each registered as a typed conf/task/ entry. A new task is one file with
a Task subclass (tasks/task.py) and one `register` call (tests/test_tasks.py defines one inside a test)."""

from deit_train.tasks.classify import Classify
from deit_train.tasks.mim import MaskedImageModeling
from deit_train.tasks.task import Built, Task, register
from deit_train.tasks.teacher_cache import FillTeacherCache

register("classify", Classify)
register("mim", MaskedImageModeling)
register("teacher_cache", FillTeacherCache)

__all__ = ["Built", "Task", "register"]
