"""The cache row: a heavy convnet teacher run online against read from teacher.cache, and the student alone
(loss=ce): what the cache buys, and the teacher's share of deit-train's step."""

from bench.setting import Bench

# figure -> (label in the Markdown table, unit)
FIGURES = {
    "train_ips_heavy_teacher_online": ("train images/s, heavy teacher online", "ips"),
    "train_ips_heavy_teacher_cached": ("train images/s, heavy teacher read from teacher.cache", "ips"),
    "train_ips_student_alone": ("train images/s, student alone (loss=ce)", "ips"),
    "cached_over_online": ("teacher.cache speed-up, cached / online", "ratio"),
    "cached_over_student_alone": ("cached / student alone", "ratio"),
    "teacher_share_online": ("teacher's share of deit-train's step, online", "share"),
    "teacher_share_cached": ("teacher's share of deit-train's step, cached", "share"),
}


def cache_rows(bench: Bench) -> dict[str, float]:
    """The heavy teacher online against read from teacher.cache (filled by a first run), and the student alone."""
    heavy = bench.preset.cache_teacher
    bench.deit_train(bench.config(teacher=heavy, cache=True))  # fills the cache
    online, cached, alone = [], [], []
    for _ in range(bench.preset.repeats):
        online.append(bench.deit_train(bench.config(teacher=heavy)).ips)
        cached.append(bench.deit_train(bench.config(teacher=heavy, cache=True)).ips)
        alone.append(bench.deit_train(bench.config(loss="ce")).ips)
    online_ips, cached_ips, alone_ips = max(online), max(cached), max(alone)
    return {
        "train_ips_heavy_teacher_online": online_ips,
        "train_ips_heavy_teacher_cached": cached_ips,
        "train_ips_student_alone": alone_ips,
        "cached_over_online": cached_ips / online_ips,
        "cached_over_student_alone": cached_ips / alone_ips,
        # a step's time is 1 / ips: the teacher's share is what the student alone does not spend
        "teacher_share_online": 1 - online_ips / alone_ips,
        "teacher_share_cached": 1 - cached_ips / alone_ips,
    }
