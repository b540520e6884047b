"""Deploy the app as a Hugging Face Space: assemble its folder, create the Space, upload.

    python spaces_app/deploy.py USER/SPACE_NAME [--private] [--token T]
    python spaces_app/deploy.py --bundle-only FOLDER     # write the folder and stop (to inspect or upload yourself)

A Space installs requirements.txt before the repository's files are in place, so the folder carries the
hf_gradprune package itself (with its model card template) next to app.py; requirements.txt brings its
dependencies.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP_FILES = ("app.py", "job.py", "README.md", "requirements.txt")


def bundle(dest: Path) -> Path:
    """The Space's files in dest: the app, its README (Space front matter), requirements and the package."""
    import hf_gradprune
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        shutil.copy2(HERE / name, dest / name)
    package = Path(hf_gradprune.__file__).resolve().parent
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "model_cards")
    shutil.copytree(package, dest / "hf_gradprune", ignore=skip, dirs_exist_ok=True)
    cards = dest / "hf_gradprune" / "model_cards"  # a subpackage in the wheel; a separate folder in the repo
    cards.mkdir(exist_ok=True)
    for f in resources.files("hf_gradprune.model_cards").iterdir():
        if f.name.endswith((".md", ".py")) and f.is_file():
            (cards / f.name).write_bytes(f.read_bytes())
    return dest


def deploy(space_id: str, token: str | None = None, private: bool = False) -> str:
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = bundle(Path(tmp) / "space")
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private or None, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=space_id, repo_type="space",
                                 commit_message="Deploy hf-gradprune app")
    return f"https://huggingface.co/spaces/{space_id} ({info.commit_url})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("space_id", nargs="?", help="USER/SPACE_NAME")
    ap.add_argument("--bundle-only", type=Path, metavar="FOLDER")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--token", help="default: HF_TOKEN or the cached login; never printed")
    args = ap.parse_args(argv)
    if args.bundle_only:
        print(bundle(args.bundle_only))
        return 0
    if not args.space_id:
        ap.error("give USER/SPACE_NAME, or --bundle-only FOLDER")
    try:
        print(deploy(args.space_id, args.token, args.private))
    except Exception as e:
        from hf_gradprune.hub import failure_reason
        print(f"deploy: error: upload to {args.space_id} failed ({failure_reason(e, args.token)}); "
              "nothing local changed, run the same command again", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
