"""Everything about the teacher: its network (network.py), the frozen module whose forward returns its logits
(teacher.py) and the cache of its outputs on the training views (cache.py)."""

from deit_train.teacher.cache import CacheSettings, Encoding, TeacherCache, TeacherCacheCallback
from deit_train.teacher.network import build_teacher_network, check_teacher_classes, teacher_members
from deit_train.teacher.teacher import (
    Teacher,
    TeacherNetwork,
    TeacherOutput,
    build_teacher,
    ensemble_logits,
    ensemble_tau,
)

__all__ = [
    "CacheSettings",
    "Encoding",
    "Teacher",
    "TeacherCache",
    "TeacherCacheCallback",
    "TeacherNetwork",
    "TeacherOutput",
    "build_teacher",
    "build_teacher_network",
    "check_teacher_classes",
    "ensemble_logits",
    "ensemble_tau",
    "teacher_members",
]
