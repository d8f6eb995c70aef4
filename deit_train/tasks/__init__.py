"""What a run can train: the built-in tasks, each registered as a typed conf/task/ entry. A new task is one file with
a Task subclass (tasks/task.py) and one `register` call (tests/test_tasks.py defines one inside a test). task=mim lives
with the rest of SimMIM in mim/ and registers itself there (mim/task.py imports tasks.task: registering it here would
be an import cycle); config.register_schemas imports both."""

from deit_train.tasks.classify import Classify
from deit_train.tasks.task import Built, Task, register
from deit_train.tasks.teacher_cache import FillTeacherCache

register("classify", Classify)
register("teacher_cache", FillTeacherCache)

__all__ = ["Built", "Task", "register"]
