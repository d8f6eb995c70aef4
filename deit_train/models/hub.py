"""A Hugging Face Hub model id (OWNER/NAME) where a checkpoint path is taken (model.init, teacher.checkpoint,
teacher=hf's teacher.name): huggingface_hub downloads the repo's weights and configs into its cache (offline, its
cache alone: HF_HUB_OFFLINE=1) and the path is that snapshot; a repo deit-export pushed (README.md, transformers/,
timm/) gives its transformers/ folder, else timm/. A path that exists is always the local one."""

from pathlib import Path

from deit_train.errors import DeitTrainError
from deit_train.schema import HUB_ID


def local_path(source: str | Path, flag: str) -> Path:
    """`source` as a local path: itself where it exists or is not a Hub id, else the Hub repo's downloaded folder;
    a repo that cannot be had ends in one line naming why and the fix."""
    path = Path(source).expanduser()
    text = str(source)
    if path.exists() or not HUB_ID.fullmatch(text):
        return path
    import httpx2  # huggingface_hub's HTTP client: its transport errors
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    named = f"{flag}={text}: no such local path, and"
    try:
        folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as error:
        raise DeitTrainError(
            f"{named} the Hub model {text} is not in huggingface_hub's cache while HF_HUB_OFFLINE is set (or the Hub "
            f"cannot be reached): unset HF_HUB_OFFLINE to download it, or pass a local path"
        ) from error
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise DeitTrainError(
            f"{named} the Hub has no model {text} you may read (private or gated: hf auth login): check the name"
        ) from error
    except (httpx2.HTTPError, OSError) as error:
        detail = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise DeitTrainError(f"{named} its download from the Hub failed ({detail}): pass a local path") from error
    if not (folder / "config.json").is_file():
        for exported in ("transformers", "timm"):  # a repo deit-export pushed
            if (folder / exported / "config.json").is_file():
                return folder / exported
    return folder
