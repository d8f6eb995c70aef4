"""Students (DeiT or any timm classifier), frozen teachers, and safe checkpoint reading."""

from deit_train.models.student import (
    average_heads,
    build_student,
    compile_student,
    forward_heads,
    is_distilled,
)
from deit_train.models.teacher import build_teacher

__all__ = [
    "average_heads",
    "build_student",
    "compile_student",
    "build_teacher",
    "forward_heads",
    "is_distilled",
]
