"""QGIS styles (QML) for rsseg's outputs, checked against QGIS 3.22 (tests/test_qgis.py).

Vector layers get a categorized renderer on ``class_id``; class rasters get a paletted renderer
that lists only the classes and nodata. A TIFF palette always holds 256 entries, so without a
style QGIS shows 256 legend entries for a 6-class raster; QGIS loads ``<name>.qml`` beside a
file as the layer's default style, which gives the legend exactly the classes.
"""

from __future__ import annotations

from typing import Sequence
from xml.sax.saxutils import quoteattr

_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
# Fills lighter than this (0..255, Rec. 601 luma) vanish on QGIS's white canvas and legend.
LIGHT_LUMA = 200.0
# Thinner than QGIS's default 0.26 mm: enough to frame a white legend swatch, while small light
# polygons on a zoomed-out map keep their fill colour (0.26 mm turned 1-pixel regions olive).
OUTLINE_WIDTH_MM = 0.15


def is_light(rgb: Sequence[int]) -> bool:
    r, g, b = (int(v) for v in rgb[:3])
    return 0.299 * r + 0.587 * g + 0.114 * b > LIGHT_LUMA


def outline_color(rgb: Sequence[int]) -> tuple[int, int, int]:
    """A darker shade of the fill: visible on white, still reads as the same class."""
    return tuple(int(v) // 2 for v in rgb[:3])  # type: ignore[return-value]


def _fill_symbol(index: int, rgb: Sequence[int]) -> str:
    r, g, b = (int(v) for v in rgb[:3])
    if is_light(rgb):
        # A white or pale-yellow swatch is invisible in the legend without an outline.
        orr, og, ob = outline_color(rgb)
        stroke = {"outline_color": f"{orr},{og},{ob},255", "outline_style": "solid",
                  "outline_width": str(OUTLINE_WIDTH_MM), "outline_width_unit": "MM"}
    else:
        # Dark fills stay outline-free so that small polygons keep their colour.
        stroke = {"outline_color": f"{r},{g},{b},255", "outline_style": "no",
                  "outline_width": "0", "outline_width_unit": "MM"}
    props = {"color": f"{r},{g},{b},255", "style": "solid", "joinstyle": "miter", **stroke}
    options = "".join(f'<Option type="QString" name="{k}" value="{v}"/>' for k, v in props.items())
    # <prop> duplicates <Option> for QGIS < 3.26, which reads only the former.
    legacy = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (
        f'<symbol type="fill" name="{index}" alpha="1" clip_to_extent="1" force_rhr="0">'
        f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">'
        f'<Option type="Map">{options}</Option>{legacy}'
        f"</layer></symbol>"
    )


def vector_qml(names: Sequence[str], colors: Sequence[Sequence[int]], field: str = "class_id") -> str:
    """A categorized renderer on ``field`` that fills each class in its colour (labels = names)."""
    cats, symbols = [], []
    for i, (name, rgb) in enumerate(zip(names, colors)):
        cats.append(f'<category render="true" symbol="{i}" value="{i}" label={quoteattr(str(name))}/>')
        symbols.append(_fill_symbol(i, rgb))
    return (
        _DOCTYPE
        + '<qgis version="3.22" styleCategories="Symbology">\n'
        + f'  <renderer-v2 type="categorizedSymbol" attr={quoteattr(field)} symbollevels="0"'
        + ' enableorderby="0" forceraster="0">\n'
        + f"    <categories>{''.join(cats)}</categories>\n"
        + f"    <symbols>{''.join(symbols)}</symbols>\n"
        + "  </renderer-v2>\n"
        + "</qgis>\n"
    )


def raster_qml(names: Sequence[str], colors: Sequence[Sequence[int]], nodata: int | None = 255,
               band: int = 1) -> str:
    """A paletted renderer with one entry per class, plus a transparent ``nodata`` entry.

    Nearest-neighbour resampling both ways: class values must never be interpolated.
    """
    entries = []
    for i, (name, rgb) in enumerate(zip(names, colors)):
        r, g, b = (int(v) for v in rgb[:3])
        entries.append(f'<paletteEntry value="{i}" color="#{r:02x}{g:02x}{b:02x}" alpha="255"'
                       f" label={quoteattr(str(name))}/>")
    if nodata is not None:
        entries.append(f'<paletteEntry value="{int(nodata)}" color="#000000" alpha="0" label="nodata"/>')
    palette = "\n        ".join(entries)
    return (
        _DOCTYPE
        + '<qgis version="3.22" styleCategories="Symbology">\n'
        + "  <pipe>\n"
        + "    <provider>\n"
        + '      <resampling enabled="false" maxOversampling="2"'
        + ' zoomedInResamplingMethod="nearestNeighbour" zoomedOutResamplingMethod="nearestNeighbour"/>\n'
        + "    </provider>\n"
        + f'    <rasterrenderer type="paletted" band="{int(band)}" opacity="1" alphaBand="-1" nodataColor="">\n'
        + "      <rasterTransparency/>\n"
        + "      <colorPalette>\n"
        + f"        {palette}\n"
        + "      </colorPalette>\n"
        + "    </rasterrenderer>\n"
        + '    <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        + '    <huesaturation saturation="0" grayscaleMode="0" invertColors="0" colorizeOn="0"'
        + ' colorizeRed="255" colorizeGreen="128" colorizeBlue="128" colorizeStrength="100"/>\n'
        + '    <rasterresampler maxOversampling="2"/>\n'
        + "    <resamplingStage>resamplingFilter</resamplingStage>\n"
        + "  </pipe>\n"
        + "  <blendMode>0</blendMode>\n"
        + "</qgis>\n"
    )


def is_raster_qml(text: str) -> bool:
    return "<rasterrenderer" in text
