"""The tiny settings, in one place: the suite's configs (conftest.py) and scripts/benchmark.py's dry preset
both import them, so that "a CPU-sized run" means the same thing in each. Plain data, no imports: a script
can take it without pytest or the fixtures."""

# A CPU-sized run: 16x16 demo images, 8 per class, one epoch.
TINY_RUN = [
    "experiment=demo",
    "model.img_size=16",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.pin_memory=false",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_model_summary=false",
    "callbacks.progress_bar=null",
]
# A CPU-sized DeiT student: 4x4 patches, 2 blocks of width 32 (as timm.create_model's keyword arguments, and
# as model.* overrides of any DeiT model config).
TINY_VIT_SIZES = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_VIT = [f"model.{name}={value}" for name, value in TINY_VIT_SIZES.items()]
# The demo data at 16x16, 8 training images per class.
TINY_DEMO = ["data.image_size=16", "data.train_per_class=8", "data.val_per_class=4"]
TINY = TINY_RUN + TINY_DEMO + TINY_VIT
# A small timm convnet teacher (random weights in the tests and the dry benchmark).
TINY_TEACHER = "resnet10t"
