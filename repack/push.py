"""Hub out: upload a finished output folder with a generated model card."""

from __future__ import annotations

import os
import stat
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


def _entries(dst: Path) -> dict[str, os.stat_result]:
    """Every entry under DST by relative path, links not followed (a linked folder is an entry, not descended)."""
    out: dict[str, os.stat_result] = {}
    for top, dirs, files in os.walk(dst, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            p = Path(top) / name
            out[p.relative_to(dst).as_posix()] = p.lstat()
    return out


def upload_files(dst: Path) -> list[UploadOp]:
    """Every visible file of DST but README.md. Regular files inside DST only: a visible symbolic link (wherever
    it points), FIFO, socket or device is refused."""
    from huggingface_hub.utils import filter_repo_objects

    entries = _entries(dst)
    keep = list(filter_repo_objects(sorted(rel for rel, st in entries.items() if not stat.S_ISDIR(st.st_mode)),
                                    ignore_patterns=UPLOAD_IGNORE))
    for rel in keep:
        mode = entries[rel].st_mode
        if stat.S_ISLNK(mode):
            raise UserError(f"{dst / rel}: a symbolic link (to {os.readlink(dst / rel)}); push uploads regular files "
                            "inside the folder only: replace it by the file or remove it")
        if not stat.S_ISREG(mode):
            raise UserError(f"{dst / rel}: not a regular file (a FIFO, socket or device); push uploads regular files only")
    return [UploadOp(rel, dst / rel, entries[rel].st_size) for rel in keep]


def push(dst: Path, repo_id: str, private: bool = False, dry_run: bool = False, verify_report: dict | None = None,
         revision: str | None = None, commit_message: str | None = None, create_pr: bool = False,
         token: str | None = None) -> dict:
    """Upload DST to ``repo_id`` with a generated model card, as one commit (``hf upload``'s options:
    ``revision`` a branch, created if missing; ``create_pr`` opens a pull request instead). ``dry_run`` builds the
    card and file list only. Re-running after an interruption uploads again only what the hub lacks (large files
    are stored by content hash)."""
    from repack import card

    dst = Path(dst)
    if parse_repo_id(repo_id) is None and not REPO_RE.match(repo_id):
        raise UserError(f"{repo_id}: not a hub repo id (org/name)")
    finished_output(dst)
    files = upload_files(dst)  # links and special files refused before anything else reads DST
    text = card.build_card(dst, repo_id, verify_report=verify_report)
    ops = [*files, UploadOp("README.md", None, len(text.encode()))]
    message = commit_message or "Upload w3repack 4-bit GPTQ repack"
    summary = {"repo": repo_id, "private": private, "dry_run": dry_run, "revision": revision or "main",
               "create_pr": create_pr, "commit_message": message, "card": text,
               "files": [{"path": o.path_in_repo, "bytes": o.size, "generated": o.local is None} for o in ops],
               "bytes": sum(o.size for o in ops)}
    if dry_run:
        return summary
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with hub_errors(f"push to {repo_id}"):
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        adds = [CommitOperationAdd(path_in_repo=o.path_in_repo, path_or_fileobj=str(o.local) if o.local else text.encode())
                for o in ops]
        info = api.create_commit(repo_id, adds, commit_message=message, repo_type="model", revision=revision,
                                 create_pr=create_pr)
    summary["url"] = str(getattr(info, "pr_url", None) or getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
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
