"""`terrasam models`: the model ids, their size, where weights come from, what is cached."""

from __future__ import annotations

import json

import click


def model_rows() -> list[dict]:
    """One dict per registry model, with whether its weights are in the local HF cache."""
    from terrasam.models.registry import DEFAULT_MODEL, MODELS
    from terrasam.models.weights import is_cached

    rows = []
    for spec in MODELS.values():
        rows.append({
            "id": spec.model_id, "family": spec.family, "input_size": spec.image_size,
            "params_m": spec.params_m, "hf_repo": spec.hf_repo, "meta_file": spec.meta_file,
            "meta_url": spec.meta_url, "gated": spec.gated, "cached": is_cached(spec),
            "default": spec.model_id == DEFAULT_MODEL, "description": spec.description,
        })
    return rows


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def models(as_json: bool):
    """List the models terrasam runs and which are already downloaded."""
    from terrasam.models.weights import hub_cache_dir

    rows = model_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("id", "family", "input", "params", "weights (HF repo / Meta file)", "cached")
    table = [header]
    for r in rows:
        source = r["hf_repo"] + (f" / {r['meta_file']}" if r["meta_file"] else "")
        if r["gated"]:
            source += " (gated)"
        name = r["id"] + (" *" if r["default"] else "")
        table.append((name, r["family"], str(r["input_size"]), f"{r['params_m']:.1f}M", source,
                      "yes" if r["cached"] else "no"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    click.echo(f"\n* default model. Cache: {hub_cache_dir()}. Any model also loads from a local "
               "Hugging Face folder or Meta checkpoint with --checkpoint PATH.")
