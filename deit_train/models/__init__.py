"""Students (DeiT or any timm classifier: student.py) and safe checkpoint reading (checkpoints.py); the teacher has its
own package. Nothing is imported here, so that reading a checkpoint's record (checkpoints.py) needs torch alone."""
