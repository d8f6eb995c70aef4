"""The benchmark's settings: cpu (the CI machine), gpu (the paper's sizes) and dry (gpu's rows at the test
suite's tiny sizes, any machine, seconds)."""

from dataclasses import dataclass, field

from tests.tiny import TINY_TEACHER, TINY_VIT


@dataclass(frozen=True)
class Preset:
    students: dict[str, int]  # model config name -> batch per device
    teacher: str  # timm name of the teacher of the train rows
    cache_teacher: str  # timm name of the heavy teacher of the cache rows
    img_size: int
    precision: str
    num_classes: int
    warmup: int  # steps before the timed ones
    steps: int  # timed steps
    repeats: int  # interleaved repeats of each measurement; the best counts
    eval_batches: int
    jpegs: int  # images of the pipeline row
    # the real_run row: training steps per epoch and rank (1 warm-up, the timed ones, then the profiler's window)
    run_steps: int = 12
    run_window: int = 3
    run_compile: bool = False
    model_overrides: tuple[str, ...] = ()
    compile_backend: str | None = None  # None: torch.compile's own (inductor)
    skip: dict[str, tuple[str, ...]] = field(default_factory=dict)  # student -> rows it leaves out


PRESETS = {
    # A few minutes on a 2-core CPU.
    "cpu": Preset(
        students={"deit_tiny": 32},
        teacher="resnet18",
        cache_teacher="regnety_160",
        img_size=224,
        precision="32-true",
        num_classes=1000,
        warmup=2,
        steps=6,
        repeats=3,
        eval_batches=4,
        jpegs=96,
        # inductor compiles DeiT-Ti for minutes on 2 cores, and the compiled CPU step is no faster: --rows compile
        skip={"deit_tiny": ("compile",)},
    ),
    # The paper's sizes (Touvron et al. 2021: global batch 1024 on 224 px, hard distillation from RegNetY-16GF);
    # per GPU as the official README's commands: DeiT-S 4 GPUs x 256, DeiT-B 2 nodes x 8 GPUs x 64. bf16 autocast.
    # scripts/gpu_check.sh runs DeiT-S only (--students deit_small), without the CPU's pipeline row, to hold its 5
    # minutes on one GPU.
    "gpu": Preset(
        students={"deit_small": 256, "deit_base": 64},
        skip={"deit_base": ("compile",)},  # a second minute of compilation would not fit the 5 minutes
        teacher="regnety_160",
        cache_teacher="regnety_160",
        img_size=224,
        precision="bf16-mixed",
        num_classes=1000,
        warmup=5,
        steps=20,
        repeats=1,
        eval_batches=10,
        jpegs=256,
        run_compile=True,
    ),
    # The gpu preset's rows at tiny sizes: the dry run that proves the script on any machine. The student and
    # the teacher are the test suite's (tests/tiny.py). aot_eager: dynamo and AOTAutograd capture the student
    # as under inductor, without a minute of C++ compilation on 2 cores.
    "dry": Preset(
        students={"deit_small": 8},
        teacher=TINY_TEACHER,
        cache_teacher="regnety_002",
        img_size=32,
        precision="bf16-mixed",
        num_classes=10,
        warmup=1,
        steps=2,
        repeats=1,
        eval_batches=2,
        jpegs=32,
        run_steps=5,
        run_window=2,
        model_overrides=tuple(TINY_VIT),
        compile_backend="aot_eager",
    ),
}
