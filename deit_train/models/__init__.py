"""Students (DeiT or any timm classifier) and safe checkpoint reading; the teacher has its own package."""

from deit_train.models.student import (
    average_heads,
    build_student,
    compile_student,
    describe,
    forward_heads,
    heads_on,
    is_distilled,
)

__all__ = [
    "average_heads",
    "build_student",
    "compile_student",
    "describe",
    "forward_heads",
    "heads_on",
    "is_distilled",
]
