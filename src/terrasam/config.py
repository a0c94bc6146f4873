"""Options from a TOML or YAML config file.

The ``[amg]`` table holds automatic-mask-generator options under their upstream names
(``points_per_side``, ``pred_iou_thresh``, ...; dashes are accepted for underscores) and is
validated here; other tables (tool options) are returned as read, for their owners to check.

Example (TOML)::

    [amg]
    points_per_side = 48
    pred_iou_thresh = 0.86
    crop_n_layers = 1
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from pathlib import Path

from terrasam.errors import TerrasamError

AMG_TABLE = "amg"


def _read(path: Path) -> object:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TerrasamError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TerrasamError(f"cannot read config file {path}: {e}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TerrasamError(f"config file {path} is not valid TOML: {e}") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise TerrasamError(f"config file {path} is not valid YAML{at}") from None
        return {} if data is None else data
    raise TerrasamError(f"config file {path} must end in .toml, .yaml or .yml")


def amg_options(table: object, source: str = "config") -> dict:
    """Validated ``[amg]`` options: known names (dashes -> underscores), sane values."""
    from terrasam.amg import AMGParams

    if not isinstance(table, dict):
        raise TerrasamError(f"{source}: [{AMG_TABLE}] must be a table of options")
    names = [f.name for f in dataclasses.fields(AMGParams)]
    options = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}" if close else ""
            raise TerrasamError(f"{source}: unknown [{AMG_TABLE}] option {key!r}{hint}")
        options[name] = value
    try:
        AMGParams.for_family("sam", **options)  # values are family-independent
    except TerrasamError as e:
        raise TerrasamError(f"{source}: [{AMG_TABLE}] {e}") from None
    return options


def load_config(path: str | Path) -> dict:
    """Read a .toml/.yaml/.yml config file; returns its tables with ``amg`` validated."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict):
        raise TerrasamError(f"config file {path} must hold tables of options, "
                            f"not a {type(data).__name__}")
    out = dict(data)
    if AMG_TABLE in out:
        out[AMG_TABLE] = amg_options(out[AMG_TABLE], source=f"config file {path.name}")
    return out


def amg_params(family: str, config: str | Path | dict | None = None, **overrides):
    """AMGParams for a model family: upstream defaults, then the config file's ``[amg]``
    table, then ``overrides`` (e.g. command-line flags; None values are ignored)."""
    from terrasam.amg import AMGParams

    options = {}
    if config is not None:
        cfg = config if isinstance(config, dict) else load_config(config)
        options.update(cfg.get(AMG_TABLE, {}))
    options.update({k: v for k, v in overrides.items() if v is not None})
    return AMGParams.for_family(family, **options)
