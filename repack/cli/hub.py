"""Commands towards the hub: push."""

from __future__ import annotations

from pathlib import Path

import typer

from repack.cli import _output


def push(
    dst: Path = typer.Argument(..., help="A finished w3repack output folder."),
    repo_id: str = typer.Argument(..., help="Hub repo to create or update (org/name)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the model card and the files to upload; upload nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Upload a converted checkpoint (resumable) with a generated model card."""
    from repack.push import push as run_push

    _output.pushed(run_push(dst, repo_id, private=private, dry_run=dry_run), json_out)


def register(app: typer.Typer) -> None:
    app.command()(push)
