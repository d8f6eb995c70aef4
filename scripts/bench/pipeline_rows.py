"""The pipeline row (shared by the students): scripts/benchmark_data.py's rows, input-pipeline images/s per
data-loader worker for each source against the official DeiT pipeline in the same run, and deit-shard's
seconds."""

import benchmark_data  # scripts/benchmark_data.py, the data benchmark beside scripts/benchmark.py

from bench.setting import Bench

# figure -> (label in the Markdown table, unit)
FIGURES = {
    "ips_per_worker_official": (
        "input images/s per worker, official DeiT pipeline (torchvision ImageFolder + timm create_transform)",
        "ips",
    ),
    "ips_per_worker_loader_imagefolder": ("input images/s per worker, deit-train, ImageFolder", "ips"),
    "ips_per_worker_loader_hf": ("input images/s per worker, deit-train, HF Arrow (save_to_disk)", "ips"),
    "ips_per_worker_loader_shards": ("input images/s per worker, deit-train, WebDataset shards as written", "ips"),
    "ips_per_worker_loader_shards_256": ("input images/s per worker, deit-train, shards re-encoded at 256 px", "ips"),
    "ips_per_worker_end_to_end_imagefolder": (
        "input images/s per worker, deit-train training a trivial student, ImageFolder",
        "ips",
    ),
    "x_official_loader_imagefolder": ("deit-train, ImageFolder / official pipeline", "ratio"),
    "x_official_loader_hf": ("deit-train, HF Arrow (save_to_disk) / official pipeline", "ratio"),
    "x_official_loader_shards": ("deit-train, WebDataset shards as written / official pipeline", "ratio"),
    "x_official_loader_shards_256": ("deit-train, shards re-encoded at 256 px / official pipeline", "ratio"),
    "x_official_end_to_end_imagefolder": (
        "deit-train training a trivial student, ImageFolder / official pipeline",
        "ratio",
    ),
    "shard_write_s_jpegs": ("deit-shard seconds, the pipeline JPEGs", "s"),
    "shard_write_s_jpegs_resize256": ("deit-shard seconds, the pipeline JPEGs re-encoded at 256 px", "s"),
    "shard_write_s_demo": ("deit-shard seconds, the demo set", "s"),
    "shm_bytes_per_batch_official": ("bytes of one training batch through shared memory, official (fp32)", "bytes"),
    "shm_bytes_per_batch_deit": ("bytes of one training batch through shared memory, deit-train (uint8)", "bytes"),
}


def pipeline_rows(bench: Bench) -> dict[str, float]:
    """scripts/benchmark_data.py's rows: images/s per data-loader worker (JPEG decode + augment=deit at the image
    size) for ImageFolder, HF Arrow and shards (raw and re-encoded at 256 px), each against the official DeiT
    pipeline, deit-train end to end, and deit-shard's seconds."""
    preset = bench.preset
    return benchmark_data.data_rows(
        preset.img_size, preset.jpegs, preset.repeats, batch=min(32, preset.jpegs // 12 * 2)
    )  # 6 batches, even
