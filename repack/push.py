"""Hub out: upload a finished output folder with a generated model card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from repack.errors import Mismatch, UserError
from repack.hubclient import REPO_RE, hub_errors, parse_repo_id
from repack.output import finished_output

UPLOAD_IGNORE = [".*", ".*/**", "**/.*", "**/.*/**", "README.md"]


@dataclass
class UploadOp:
    path_in_repo: str
    local: Path | None
    size: int


def upload_ops(dst: Path, card_text: str) -> list[UploadOp]:
    """What a push uploads: every visible file of DST (README.md replaced by the generated card)."""
    from huggingface_hub.utils import filter_repo_objects

    files = {p.relative_to(dst).as_posix(): p for p in sorted(dst.rglob("*")) if p.is_file()}
    keep = filter_repo_objects(list(files), ignore_patterns=UPLOAD_IGNORE)
    ops = [UploadOp(rel, files[rel], files[rel].stat().st_size) for rel in keep]
    ops.append(UploadOp("README.md", None, len(card_text.encode())))
    return ops


def push(dst: Path, repo_id: str, private: bool = False, dry_run: bool = False, verify_report: dict | None = None) -> dict:
    """Upload DST to ``repo_id`` with a generated model card. ``dry_run`` builds the card and file list only."""
    from repack import card

    dst = Path(dst)
    if parse_repo_id(repo_id) is None and not REPO_RE.match(repo_id):
        raise UserError(f"{repo_id}: not a hub repo id (org/name)")
    finished_output(dst)
    text = card.build_card(dst, repo_id, verify_report=verify_report)
    ops = upload_ops(dst, text)
    summary = {"repo": repo_id, "private": private, "dry_run": dry_run, "card": text,
               "files": [{"path": o.path_in_repo, "bytes": o.size, "generated": o.local is None} for o in ops],
               "bytes": sum(o.size for o in ops)}
    if dry_run:
        return summary
    from huggingface_hub import HfApi

    api = HfApi()
    with hub_errors(f"push to {repo_id}"):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        large = getattr(api, "upload_large_folder", None)
        if large is not None:
            large(repo_id=repo_id, folder_path=str(dst), repo_type="model", ignore_patterns=UPLOAD_IGNORE)
        else:
            api.upload_folder(repo_id=repo_id, folder_path=str(dst), repo_type="model", ignore_patterns=UPLOAD_IGNORE,
                              commit_message="Upload w3repack 4-bit GPTQ repack")
        info = api.upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=repo_id,
                               repo_type="model", commit_message="Model card (w3repack)")
    summary["url"] = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    return summary


def push_converted(src_root: Path, shard_names: list[str], dst: Path, repo_id: str, private: bool = False,
                   workers: int | None = None) -> dict:
    """Push a conversion just made: verified against its source first where every source shard is still there
    (a run with ``--delete-source-shards`` verified each shard before deleting it; its manifest says so)."""
    report = None
    if all((src_root / n).is_file() for n in shard_names):
        from repack.verify import verify

        report = verify(src_root, dst, workers=workers).to_json()
        if not report.get("ok"):
            raise Mismatch(f"{dst} does not verify against its source; not pushed")
    return push(dst, repo_id, private=private, verify_report=report)
