"""Everything about the teacher: its network (network.py), the frozen module whose forward returns its logits
(teacher.py) and the cache of its outputs on the training views (cache.py)."""

from deit_train.teacher.cache import CacheSettings, Encoding, TeacherCache
from deit_train.teacher.network import build_teacher_network, check_teacher_classes
from deit_train.teacher.teacher import Teacher, build_teacher

__all__ = [
    "CacheSettings",
    "Encoding",
    "Teacher",
    "TeacherCache",
    "build_teacher",
    "build_teacher_network",
    "check_teacher_classes",
]
