"""Pictures of results: a PNG preview of masks over the image and a self-contained HTML map.

The PNG is drawn with Pillow from the raster's overview (scaled as segmentation scales it).
The HTML map is a folium page whose Leaflet JS/CSS, raster overlay and vectors are all inlined,
so it works offline except for the base-map tiles. Leaflet's files come from the
``django-js-lib-leaflet`` wheel (a dependency-free repackaging of Leaflet 1.9.4); without it the page
falls back to the CDN.
"""

from __future__ import annotations

import base64
import io as _bytesio
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from terrasam.errors import TerrasamError
from terrasam.io import check_output

NODATA_RGB = (150, 150, 150)
FILL_ALPHA = 0.45
MARK_RGB = (255, 214, 0)  # prompt points and boxes: one bright colour over any object
_MIN_PREVIEW = 600  # small rasters are enlarged (nearest) to at least this many pixels
_MERC_LIMIT = 20037508.342789244  # web-mercator y at latitude +-85.0511
BASEMAPS = ("osm", "esri", "none")


# ---------------------------------------------------------------- shared helpers


def object_colours(ids) -> np.ndarray:
    """Deterministic, well-separated RGB colours (uint8 (n, 3)) for object ids."""
    ids = np.asarray(ids, dtype=np.float64).reshape(-1)
    hue = np.mod(ids * 0.618033988749895 + 0.12, 1.0)
    sat = np.where(np.mod(ids, 2) == 0, 0.75, 0.95)
    val = np.where(np.mod(ids // 2, 2) == 0, 1.0, 0.85)
    h6 = hue * 6.0
    sector = np.floor(h6).astype(int) % 6
    f = h6 - np.floor(h6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    table = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)]
    rgb = np.zeros((ids.size, 3))
    for s, (r, g, b) in enumerate(table):
        sel = sector == s
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], axis=1)
    return np.round(rgb * 255).astype(np.uint8)


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _open_reader(raster, bands, scale, nodata):
    if hasattr(raster, "read_overview"):
        return raster, False
    from terrasam.raster import open_raster

    return open_raster(raster, bands=bands, nodata=nodata, scale=scale), True


def _atomic_write(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _load_vectors(vectors):
    """A GeoDataFrame and its provenance dict from a path or a GeoDataFrame."""
    import geopandas as gpd

    if isinstance(vectors, gpd.GeoDataFrame):
        attrs = vectors.attrs
        return vectors, dict(attrs.get("provenance") or attrs.get("terrasam") or {})
    path = Path(vectors)
    if not path.exists():
        raise TerrasamError(f"{path} does not exist")
    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception:  # pyogrio raises many types for unreadable files
        raise TerrasamError(f"{path} is not a readable vector file") from None
    provenance = {}
    try:
        from terrasam.io import read_provenance

        provenance = dict(read_provenance(path) or {})
    except Exception:  # provenance is optional decoration for the title
        provenance = {}
    return gdf, provenance


def _model_name(gdf, provenance: dict) -> str | None:
    if "model" in gdf.columns and len(gdf):
        values = gdf["model"].dropna().astype(str)
        if len(values):
            return str(values.mode().iloc[0])
    for key in ("model", "model_id"):
        if provenance.get(key):
            return str(provenance[key])
    return None


def _to_raster_crs(gdf, crs):
    if crs is None or gdf.crs is None:
        return gdf
    if gdf.crs != crs:
        return gdf.to_crs(crs)
    return gdf


def _object_ids(gdf) -> np.ndarray:
    if "id" in gdf.columns:
        ids = np.asarray(gdf["id"])
        if np.issubdtype(ids.dtype, np.number) and not np.isnan(ids.astype(float)).any():
            return ids.astype(np.int64)
    return np.arange(1, len(gdf) + 1, dtype=np.int64)


def prompt_marks(gdf, crs) -> tuple[list, list]:
    """The point and box prompts of a prompt run's rows, in ``crs``: ``(points, boxes)``.

    ``points`` are (x, y) pairs, ``boxes`` polygons (a box reprojected from its own CRS);
    each prompt once, whatever the number of its rows. Other outputs give ([], []).
    """
    import shapely
    from pyproj import CRS, Transformer

    kind = next((c for c in ("prompt_type", "prompt_typ") if c in gdf.columns), None)  # .shp
    if kind is None or "prompt" not in gdf.columns or not len(gdf):
        return [], []
    rows = gdf[gdf[kind].isin(["point", "points", "box", "box+points"])]
    if "prompt_id" in rows.columns:
        rows = rows.drop_duplicates("prompt_id")
    points, boxes = [], []
    for wkt, src in zip(rows["prompt"], rows["prompt_crs"] if "prompt_crs" in rows.columns
                        else [""] * len(rows)):
        try:
            geom = shapely.from_wkt(str(wkt))
            src = src or gdf.crs  # no CRS of its own: the prompt was in the raster's
            if src and crs is not None and CRS.from_user_input(src) != CRS.from_user_input(crs):
                t = Transformer.from_crs(src, crs, always_xy=True)
                geom = shapely.transform(
                    shapely.segmentize(geom, _box_step(geom)),
                    lambda xy, t=t: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
        except Exception:  # a prompt written by something else: no mark, not a failure
            continue
        for part in getattr(geom, "geoms", [geom]):
            for leaf in getattr(part, "geoms", [part]):
                if leaf.geom_type == "Point":
                    points.append((leaf.x, leaf.y))
                elif leaf.geom_type == "Polygon":
                    boxes.append(leaf)
    return points, boxes


def _box_step(geom) -> float:
    x0, y0, x1, y1 = geom.bounds
    return max(x1 - x0, y1 - y0) / 16 or 1.0


# ---------------------------------------------------------------- PNG preview


def rasterize_objects(geoms, transform, shape) -> np.ndarray:
    """int32 (h, w) image of 1-based positions into ``geoms`` (0 = no object).

    Large objects are burnt first so small ones stay visible on top; objects smaller than a
    pixel are burnt with all_touched so that no object vanishes from the picture.
    """
    from rasterio.features import rasterize

    labels = np.zeros(shape, dtype=np.int32)
    items = [(g, i + 1) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    if not items:
        return labels
    items.sort(key=lambda it: -it[0].area)
    labels = rasterize(items, out_shape=shape, transform=transform, fill=0, dtype="int32")
    missing = set(v for _, v in items) - set(np.unique(labels).tolist())
    if missing:
        small = [it for it in items if it[1] in missing]
        touched = rasterize(small, out_shape=shape, transform=transform, fill=0,
                            dtype="int32", all_touched=True)
        labels = np.where(touched > 0, touched, labels)
    return labels


def _outline(labels: np.ndarray, width: int) -> np.ndarray:
    from scipy.ndimage import maximum_filter, minimum_filter

    k = 2 * width + 1
    return (maximum_filter(labels, size=k) != minimum_filter(labels, size=k)) & (labels > 0)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text(draw, xy, text: str, font, fill, anchor: str) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font, anchor=anchor)
    except ValueError:  # bitmap fallback font: no anchors, place by the top-left corner
        x, y = xy
        if anchor[0] == "r":
            x -= draw.textlength(text, font=font)
        draw.text((x, y - 5), text, fill=fill, font=font)


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def metres_per_pixel(transform, crs, width: int, height: int) -> float | None:
    """Ground distance in metres of one pixel along a row through the image centre."""
    if crs is None:
        return None
    from pyproj import Geod
    from rasterio.warp import transform as warp_transform

    cx, cy, half = width / 2.0, height / 2.0, max(width / 4.0, 1.0)
    (x0, y0), (x1, y1) = transform @ (cx - half, cy), transform @ (cx + half, cy)
    try:
        lon, lat = warp_transform(crs, "EPSG:4326", [x0, x1], [y0, y1])
        _, _, dist = Geod(ellps="WGS84").inv(lon[0], lat[0], lon[1], lat[1])
    except Exception:  # CRS without a link to WGS84 (local engineering CRS)
        try:
            unit = crs.linear_units_factor[1]
        except Exception:
            return None
        dist = math.hypot(x1 - x0, y1 - y0) * unit
    if not math.isfinite(dist) or dist <= 0:
        return None
    return dist / (2 * half)


def _nice_length(metres: float) -> float:
    exp = math.floor(math.log10(metres))
    for m in (5, 2, 1):
        if m * 10**exp <= metres:
            return m * 10**exp
    return 10**exp


def _format_length(metres: float) -> str:
    if metres >= 1000:
        return f"{metres / 1000:g} km"
    if metres >= 1:
        return f"{metres:g} m"
    return f"{metres * 100:g} cm"


def _draw_scale_bar(draw, x, y, height, max_px, mpp, font) -> None:
    length = _nice_length(mpp * max_px)
    px = max(int(round(length / mpp)), 2)
    half = px // 2
    draw.rectangle([x, y, x + half, y + height], fill=(20, 20, 20))
    draw.rectangle([x + half, y, x + px, y + height], fill=(255, 255, 255), outline=(20, 20, 20))
    _text(draw, (x + px + 8, y + height / 2), _format_length(length), font, (20, 20, 20), "lm")


def _display_grid(rgb, valid, transform):
    """Enlarge small overviews (nearest) so that the picture and its text stay readable."""
    from affine import Affine

    factor = max(1, _MIN_PREVIEW // max(valid.shape))
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
        valid = np.repeat(np.repeat(valid, factor, axis=0), factor, axis=1)
        transform = transform @ Affine.scale(1.0 / factor)
    return rgb, valid, transform


def compose_preview(rgb, valid, transform, crs, labels, ids, *, title: str, footer: str = "",
                    marks: tuple = ((), ())):
    """The preview (PIL.Image): title band, image with filled/outlined objects, scale-bar band.

    ``labels`` holds 1-based positions into ``ids`` at the image's resolution; ``marks`` the
    prompts ``(points, boxes)`` in the raster's CRS, drawn as dots and outlines.
    """
    from PIL import Image, ImageDraw

    H, W = valid.shape
    colours = np.vstack([np.zeros((1, 3), np.uint8), object_colours(ids)])
    img = rgb.astype(np.float32)
    img[~valid] = NODATA_RGB
    inside = labels > 0
    img[inside] = (1 - FILL_ALPHA) * img[inside] + FILL_ALPHA * colours[labels[inside]]
    edge = _outline(labels, 1 if max(H, W) < 1200 else 2)
    img[edge] = colours[labels[edge]]
    image_area = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")

    font_size = _font_size(W)
    font = _font(font_size)
    band = header_height(W)
    canvas = Image.new("RGB", (W, H + 2 * band), (255, 255, 255))
    canvas.paste(image_area, (0, band))
    draw = ImageDraw.Draw(canvas)
    pad = max(font_size // 2, 4)
    _text(draw, (pad, band / 2), _fit_text(draw, title, font, W - 2 * pad), font,
          (20, 20, 20), "lm")
    _draw_marks(draw, marks, ~transform, band, max(3, W // 150))

    y_foot = band + H
    mpp = metres_per_pixel(transform, crs, W, H)
    text_left = pad
    if mpp is not None:
        bar_h = max(font_size // 2, 5)
        max_px = max(W // 4, 20)
        _draw_scale_bar(draw, pad, y_foot + (band - bar_h) // 2, bar_h, max_px, mpp, font)
        text_left = pad + max_px + 8 + int(draw.textlength("000 km", font=font)) + pad
    elif crs is None:
        footer = "no CRS: no scale bar"
    if footer:
        text = _fit_text(draw, footer, font, max(W - text_left - pad, 0))
        if text != "…":
            _text(draw, (W - pad, y_foot + band / 2), text, font, (90, 90, 90), "rm")
    return canvas


def _draw_marks(draw, marks, inverse, top: int, radius: int) -> None:
    """Prompt boxes as outlines and points as dots (white ring, dark centre), over the image."""
    points, boxes = marks
    for box in boxes:
        xy = [inverse * (x, y) for x, y in np.asarray(box.exterior.coords)[:, :2]]
        draw.line([(c, r + top) for c, r in xy], fill=MARK_RGB, width=max(2, radius // 2))
    for x, y in points:
        c, r = inverse * (x, y)
        r += top
        draw.ellipse((c - radius, r - radius, c + radius, r + radius), fill=MARK_RGB,
                     outline=(255, 255, 255), width=max(1, radius // 3))


def _font_size(width: int) -> int:
    return int(min(max(width / 55, 12), 28))


def header_height(width: int) -> int:
    """Height in pixels of the title band (and of the scale-bar band) of a preview."""
    return int(_font_size(width) * 1.9)


def write_preview(raster, vectors, out_png, bands=None, scale="percentile", max_size=2048,
                  title=None, overwrite=False, nodata=None) -> Path:
    """Write a PNG of ``vectors`` drawn over the raster's overview; returns the PNG path.

    ``raster`` is a path or an open RasterReader (then bands/scale/nodata are its own);
    ``vectors`` a vector file path or a GeoDataFrame (reprojected to the raster's CRS).
    The picture is the overview (longer side <= max_size; small ones enlarged by an integer
    factor towards 600 px) between a title band and a scale-bar band, each
    ``header_height(width)`` tall. ``title`` replaces the default "file · model" part of the
    title line; the object count and coverage of valid pixels are always appended.
    """
    out = check_output(out_png, overwrite, kind="preview")
    reader, owned = _open_reader(raster, bands, scale, nodata)
    try:
        gdf, provenance = _load_vectors(vectors)
        rgb, valid, ov_transform = reader.read_overview(max_size=max_size)
        crs, name = reader.crs, Path(str(reader.path)).name
    finally:
        if owned:
            reader.close()
    gdf = _to_raster_crs(gdf, crs)
    ids = _object_ids(gdf)
    rgb, valid, transform = _display_grid(rgb, valid, ov_transform)
    labels = rasterize_objects(list(gdf.geometry.values), transform, valid.shape)
    n_valid = np.count_nonzero(valid)
    coverage = 100.0 * np.count_nonzero((labels > 0) & valid) / max(n_valid, 1)
    if title is None:
        model = _model_name(gdf, provenance)
        title = " · ".join(p for p in (name, f"model {model}" if model else "") if p)
    objects = f"{len(gdf)} object" + ("" if len(gdf) == 1 else "s")
    title = f"{title} · {objects} · {coverage:.1f}% of valid pixels covered"
    footer = crs.to_string() if crs is not None else ""
    canvas = compose_preview(rgb, valid, transform, crs, labels, ids, title=title, footer=footer,
                             marks=prompt_marks(gdf, crs))
    buf = _bytesio.BytesIO()
    canvas.save(buf, format="PNG")
    return _atomic_write(out, buf.getvalue())


# ---------------------------------------------------------------- HTML map


def warp_to_web_mercator(rgb, valid, transform, crs, max_size: int = 2048):
    """Reproject an overview to EPSG:3857.

    Returns (rgba uint8 (h, w, 4), bounds [[lat_min, lon_min], [lat_max, lon_max]]).
    Leaflet stretches an image overlay linearly in web-mercator space between the bounds'
    corners, so an image warped to EPSG:3857 over those bounds lands pixel-right.
    """
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject, transform_bounds

    h, w = valid.shape
    corners = [transform @ (c, r) for c, r in ((0, 0), (w, 0), (0, h), (w, h))]
    xs, ys = zip(*corners)
    merc = CRS.from_epsg(3857)
    try:
        left, bottom, right, top = transform_bounds(crs, merc, min(xs), min(ys), max(xs),
                                                    max(ys), densify_pts=21)
    except Exception as exc:
        raise TerrasamError(f"the raster's extent cannot be placed on a web map ({exc})") from None
    bottom, top = max(bottom, -_MERC_LIMIT), min(top, _MERC_LIMIT)
    if not (np.isfinite([left, bottom, right, top]).all() and right > left and top > bottom):
        raise TerrasamError("the raster's extent cannot be placed on a web map")
    # Same pixel count along the longer side as the overview, square mercator pixels.
    res = max(right - left, top - bottom) / max(min(max(h, w), max_size), 1)
    dw = max(int(math.ceil((right - left) / res)), 1)
    dh = max(int(math.ceil((top - bottom) / res)), 1)
    dst_transform = Affine(res, 0, left, 0, -res, top)
    src = np.concatenate([rgb.transpose(2, 0, 1), (valid * 255).astype(np.uint8)[None]], axis=0)
    dst = np.zeros((4, dh, dw), dtype=np.uint8)
    reproject(src, dst, src_transform=transform, src_crs=crs, dst_transform=dst_transform,
              dst_crs=merc, resampling=Resampling.nearest, src_nodata=None, dst_nodata=0)
    right_edge, bottom_edge = dst_transform @ (dw, dh)
    lon, lat = _merc_to_lonlat([left, right_edge], [top, bottom_edge])
    bounds = [[min(lat), min(lon)], [max(lat), max(lon)]]
    return dst.transpose(1, 2, 0), bounds


def _merc_to_lonlat(xs, ys):
    from rasterio.warp import transform as warp_transform

    return warp_transform("EPSG:3857", "EPSG:4326", xs, ys)


def _png_data_uri(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = _bytesio.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _leaflet_dir() -> Path | None:
    """Folder holding leaflet.js/leaflet.css from the installed js_lib_leaflet package."""
    import importlib.util

    spec = importlib.util.find_spec("js_lib_leaflet")  # locates without importing Django
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static" / "js_lib_leaflet"
    ok = (folder / "leaflet.js").exists() and (folder / "leaflet.css").exists()
    return folder if ok else None


def leaflet_assets() -> tuple[str, str] | None:
    """Leaflet's (JS, CSS) from the vendored wheel, the CSS's images as data URIs; None if
    absent. (The HTML map inlines them; ``terrasam serve`` serves them.)"""
    leaflet_dir = _leaflet_dir()
    if leaflet_dir is None:
        return None
    js_path, css_path = leaflet_dir / "leaflet.js", leaflet_dir / "leaflet.css"
    css = css_path.read_text(encoding="utf-8")
    for png in sorted((leaflet_dir / "images").glob("*.png")):
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        css = css.replace(f"url(images/{png.name})", f"url({uri})")
    return js_path.read_text(encoding="utf-8"), css


def _leaflet_inline() -> str | None:
    """Leaflet's JS and CSS (images as data URIs) as one HTML fragment, or None if absent."""
    assets = leaflet_assets()
    if assets is None:
        return None
    js, css = assets
    return f"<style>\n{css}\n</style>\n<script>\n{js}\n</script>\n"


def _geojson_features(gdf) -> dict:
    """WGS84 GeoJSON of the vectors with JSON-safe attribute values."""
    import pandas as pd

    gdf = gdf.copy()
    for col in gdf.columns:
        if col == gdf.geometry.name:
            continue
        if pd.api.types.is_datetime64_any_dtype(gdf[col]):
            gdf[col] = gdf[col].astype(str)
        elif gdf[col].dtype == object:
            gdf[col] = gdf[col].map(
                lambda v: v if v is None or isinstance(v, (str, int, float, bool)) else str(v))
    if gdf.crs is not None:
        gdf = gdf.to_crs(4326)
    gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
    return json.loads(gdf.to_json(na="null", drop_id=True))


def build_map(reader_data, gdf, *, name: str, title: str, max_size: int, basemap: str,
              opacity: float):
    """The folium.Map of an overview (rgb, valid, transform, crs) and a GeoDataFrame."""
    import folium

    rgb, valid, transform, crs = reader_data
    if crs is None:
        raise TerrasamError(f"{name} has no CRS, so it cannot be placed on a map")
    rgba, bounds = warp_to_web_mercator(rgb, valid, transform, crs, max_size=max_size)

    features = _geojson_features(gdf)
    n = len(features["features"])
    # SVG keeps each polygon a DOM element (crisp, hoverable); canvas scales to many objects
    m = folium.Map(tiles=None, control_scale=True, prefer_canvas=n > 2000)
    leaflet = _leaflet_inline()
    if leaflet is not None:
        # Instance-level lists replace folium's CDN links (leaflet, jquery, bootstrap, ...)
        # which none of the elements used here need.
        m.default_js, m.default_css = [], []
        m.get_root().header.add_child(_raw(leaflet), name="terrasam_leaflet")
    else:
        warnings.warn("vendored Leaflet not found: the map loads Leaflet from the internet",
                      stacklevel=3)

    folium.TileLayer("OpenStreetMap", name="OpenStreetMap", show=basemap == "osm").add_to(m)
    folium.TileLayer(
        tiles="https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/"
              "tile/{z}/{y}/{x}",
        attr="Tiles &copy; Esri, Maxar, Earthstar Geographics",
        name="Esri World Imagery", max_zoom=19, show=basemap == "esri",
    ).add_to(m)
    folium.FeatureGroup(name="No base map", overlay=False, show=basemap == "none").add_to(m)

    folium.raster_layers.ImageOverlay(
        image=_png_data_uri(rgba), bounds=bounds, name=f"image: {name}", opacity=opacity,
        pixelated=True, interactive=False,
    ).add_to(m)

    if n:
        fields = [k for k in features["features"][0]["properties"]][:25]
        ids = _object_ids(gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)])
        colour = {int(i): _hex(c) for i, c in zip(ids, object_colours(ids))}
        for feat, i in zip(features["features"], ids):
            feat["properties"]["_terrasam_colour"] = colour[int(i)]

        def style(feat):
            c = feat["properties"].get("_terrasam_colour", "#ff7800")
            return {"color": c, "weight": 2, "fillColor": c, "fillOpacity": FILL_ALPHA}

        tip_fields = [f for f in ("id", "area_m2", "predicted_iou") if f in fields] or fields[:1]
        folium.GeoJson(
            features, name=f"objects ({n})", style_function=style,
            highlight_function=lambda feat: {"weight": 4, "fillOpacity": 0.7},
            tooltip=folium.GeoJsonTooltip(fields=tip_fields) if tip_fields else None,
            popup=folium.GeoJsonPopup(fields=fields) if fields else None,
        ).add_to(m)
    _add_prompt_layer(m, gdf)
    folium.LayerControl(collapsed=False).add_to(m)
    m.fit_bounds(bounds)
    m.get_root().html.add_child(_raw(
        '<div id="terrasam-title" style="position:fixed;top:10px;left:50%;'
        "transform:translateX(-50%);z-index:1000;background:rgba(255,255,255,.85);"
        'padding:2px 8px;font:13px sans-serif;border-radius:3px">'
        f"{_escape(title)}</div>"
    ))
    return m, bounds


def _add_prompt_layer(m, gdf) -> None:
    """A "prompts" layer: point prompts as circle markers, box prompts as outlines."""
    import folium

    points, boxes = prompt_marks(gdf, "EPSG:4326" if gdf.crs is not None else None)
    if not points and not boxes:
        return
    layer = folium.FeatureGroup(name=f"prompts ({len(points) + len(boxes)})")
    colour = _hex(MARK_RGB)
    for box in boxes:
        folium.Polygon([(y, x) for x, y in np.asarray(box.exterior.coords)[:, :2]],
                       color=colour, weight=2, fill=False, tooltip="box prompt").add_to(layer)
    for x, y in points:
        folium.CircleMarker((y, x), radius=5, color="#ffffff", weight=2, fill=True,
                            fill_color=colour, fill_opacity=1.0,
                            tooltip="point prompt").add_to(layer)
    layer.add_to(m)


def _raw(html: str):
    """A branca element that emits ``html`` verbatim (Leaflet's source must not meet Jinja)."""
    from branca.element import Element

    return Element("{% raw %}" + html + "{% endraw %}")


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def write_map(raster, vectors, out_html, bands=None, scale="percentile", max_size=1024,
              basemap="osm", title=None, overwrite=False, nodata=None, opacity=1.0) -> Path:
    """Write a self-contained HTML map of the raster (overlay) and vectors; returns its path.

    ``basemap`` is the base map shown first ("osm", "esri" or "none"); all three are offered in
    the layer control. The overlay, vectors and Leaflet are embedded: only tiles need internet.
    """
    if basemap not in BASEMAPS:
        raise TerrasamError(f"unknown base map {basemap!r}; choose one of {', '.join(BASEMAPS)}")
    out = check_output(out_html, overwrite, kind="map")
    reader, owned = _open_reader(raster, bands, scale, nodata)
    try:
        gdf, provenance = _load_vectors(vectors)
        rgb, valid, ov_transform = reader.read_overview(max_size=max_size)
        crs, name = reader.crs, Path(str(reader.path)).name
    finally:
        if owned:
            reader.close()
    if gdf.crs is None and crs is not None:
        gdf = gdf.set_crs(crs)
    if title is None:
        model = _model_name(gdf, provenance)
        parts = [name, f"model {model}" if model else "",
                 f"{len(gdf)} object" + ("" if len(gdf) == 1 else "s")]
        title = " · ".join(p for p in parts if p)
    m, _ = build_map((rgb, valid, ov_transform, crs), gdf, name=name, title=title,
                     max_size=max_size, basemap=basemap, opacity=opacity)
    html = m.get_root().render()
    return _atomic_write(out, html.encode("utf-8"))
