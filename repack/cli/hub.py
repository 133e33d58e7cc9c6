"""Commands towards the hub: push (arguments and options as ``hf upload``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from repack.cli import _output
from repack.errors import UserError


def default_local_path(repo_id: str, local_path: Optional[Path]) -> Path:
    """``hf upload``'s rule: without LOCAL_PATH, the folder ``./NAME`` of repo ``org/NAME``."""
    if local_path is not None:
        return local_path
    name = Path(repo_id.partition("@")[0].rpartition("/")[2])
    if name.is_dir():
        return name
    raise UserError(f"{repo_id}: no LOCAL_PATH given and ./{name} is not a folder; run `w3repack push {repo_id} DST`")


def push(
    repo_id: str = typer.Argument(..., help="Hub repo to create or update (org/name), first as in `hf upload`."),
    local_path: Optional[Path] = typer.Argument(None, help="A finished w3repack output folder (default: ./NAME for repo org/NAME)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to (created if missing)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", help="Summary of the commit."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing to the branch."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the saved login)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (when it does not exist yet)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the model card and the files to upload; upload nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Upload a converted checkpoint with a generated model card, as one commit: `w3repack push REPO_ID [LOCAL_PATH]`."""
    from repack.output import MANIFEST_NAME
    from repack.push import push as run_push

    if local_path is not None and (Path(repo_id) / MANIFEST_NAME).is_file() and not (local_path / MANIFEST_NAME).exists():
        raise UserError(f"{repo_id} is a local w3repack output: push takes the repo id first, like `hf upload`: "
                        f"w3repack push {local_path} {repo_id}")
    dst = default_local_path(repo_id, local_path)
    _output.pushed(run_push(dst, repo_id, private=private, dry_run=dry_run, revision=revision, commit_message=commit_message,
                            create_pr=create_pr, token=token), json_out)


def register(app: typer.Typer) -> None:
    app.command()(push)
