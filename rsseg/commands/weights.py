"""``rsseg weights``: the initial weights each paper configuration starts from, and whether
they are on this machine. A thin layer over :mod:`rsseg.weights`."""

from __future__ import annotations

import click


@click.command("weights")
@click.argument("names", nargs=-1)
@click.option("--download", "download_name", metavar="NAME",
              help="Fetch NAME from the Hugging Face hub into its cache (needs the network).")
@click.option("--checksum", is_flag=True,
              help="Also compute the SHA-256 of present files and check the publisher's prefix.")
def weights(names: tuple[str, ...], download_name: str | None, checksum: bool) -> None:
    """List initial weights: for each, the models that start from it, the official source, the
    file name rsseg expects, the published checksum and whether the file is present.

    NAMES may be weights names or model names (e.g. `rsseg weights segman-v2-s`).
    """
    from rsseg.errors import unknown_name
    from rsseg.models.registry import list_models
    from rsseg.weights import CATALOGUE, default_weights, download, find_weights, verify_checksum, weights_dir

    if download_name:
        path = download(download_name)
        click.echo(f"{download_name}: {path}")
        return
    entries = []
    for name in names or CATALOGUE:
        if name in CATALOGUE:
            entries.append(CATALOGUE[name])
        elif default_weights(name):
            entries.append(CATALOGUE[default_weights(name)])
        elif name in list_models():
            click.echo(f"{name}: no paper weights (pass a local file with --pretrained FILE)")
        else:
            raise unknown_name("weights or model", name, [*CATALOGUE, *list_models()])
    click.echo(f"weights store: {weights_dir()} (set RSSEG_WEIGHTS to move it)")
    for entry in entries:
        found = find_weights(entry)
        state = f"present: {found}" if found else "MISSING"
        click.echo(f"\n{entry.name}  [{state}]")
        click.echo(f"  {entry.description}")
        click.echo(f"  models:   {', '.join(entry.models)}")
        click.echo(f"  source:   {entry.source}")
        click.echo(f"  file:     {' or '.join(entry.files)}")
        published = f"SHA-256 starts {entry.sha256_prefix}" if entry.sha256_prefix else "none published"
        click.echo(f"  checksum: {published}")
        if checksum and found:
            click.echo(f"  sha256:   {verify_checksum(entry, found)}")
