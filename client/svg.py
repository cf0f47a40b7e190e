"""A small SVG writer for `loractl report`: elements, escaping, linear scales and ticks.

In-house rather than a package: the page must stay one self-contained file with no network
reference, the dependency list is fixed, and the report needs only a handful of shapes (paths,
lines, rects, text, titles). Every attribute value and text node is escaped here, so nothing a
job carries (a name, a path, a reason) can break out of the markup.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape


def number(value: float) -> str:
    """A coordinate as short text: two decimals at most, no trailing zeros, no "-0"."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def attribute_name(name: str) -> str:
    """Python keyword spelling to SVG's: ``class_`` -> ``class``, ``stroke_width`` ->
    ``stroke-width``, ``data_at`` -> ``data-at``."""
    return name.rstrip("_").replace("_", "-")


class Element:
    """One SVG (or HTML) element: a tag, escaped attributes, children and text."""

    def __init__(self, tag: str, text: str | None = None, **attributes: object):
        self.tag = tag
        self.text = text
        self.attributes = {
            attribute_name(key): value for key, value in attributes.items() if value is not None
        }
        self.children: list[Element] = []

    def add(self, child: Element) -> Element:
        """Append ``child`` and return it, so a group can be built in one expression."""
        self.children.append(child)
        return child

    def child(self, tag: str, text: str | None = None, **attributes: object) -> Element:
        return self.add(Element(tag, text, **attributes))

    def titled(self, tooltip: str) -> Element:
        """Add a ``<title>``: browsers show it as the element's tooltip."""
        self.children.insert(0, Element("title", tooltip))
        return self

    def render(self) -> str:
        parts: list[str] = []
        self._render_into(parts)
        return "".join(parts)

    def _render_into(self, parts: list[str]) -> None:
        attrs = "".join(
            f' {key}="{escape(number(v) if isinstance(v, float) else str(v), quote=True)}"'
            for key, v in self.attributes.items()
        )
        if self.text is None and not self.children:
            parts.append(f"<{self.tag}{attrs}/>")
            return
        parts.append(f"<{self.tag}{attrs}>")
        # A <title> comes first, before the element's own text: SVG's tooltip and
        # accessibility rules read the first child.
        titles = [child for child in self.children if child.tag == "title"]
        for child in titles:
            child._render_into(parts)
        if self.text is not None:
            parts.append(escape(self.text, quote=False))
        for child in self.children:
            if child.tag != "title":
                child._render_into(parts)
        parts.append(f"</{self.tag}>")


def svg(width: int, height: int, **attributes: object) -> Element:
    """A root ``<svg>`` for inline use in HTML5: no xmlns (the HTML parser puts it in the SVG
    namespace), so the page holds no URL at all."""
    return Element(
        "svg",
        width=width,
        height=height,
        viewBox=f"0 0 {width} {height}",
        role="img",
        **attributes,
    )


def path_data(points: Iterable[tuple[float, float]]) -> str:
    """``M x y L x y ...`` through ``points``; empty for none."""
    commands = [
        f"{'L' if index else 'M'}{number(x)} {number(y)}" for index, (x, y) in enumerate(points)
    ]
    return " ".join(commands)


@dataclass(frozen=True)
class Scale:
    """A linear map from a data interval onto a pixel interval (either may be reversed)."""

    low: float
    high: float
    start: float
    end: float

    def __call__(self, value: float) -> float:
        if self.high == self.low:
            return (self.start + self.end) / 2
        return self.start + (value - self.low) * (self.end - self.start) / (self.high - self.low)


def nice_step(span: float, count: int) -> float:
    """A 1-2-5 step that cuts ``span`` into about ``count`` parts."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: the first at or below ``low``, the last at or
    above ``high``, so the axis can be widened to them."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(low) * 0.05 or 1.0
        low, high = low - pad, high + pad
    step = nice_step(high - low, count)
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    values = []
    index = 0
    while first + index * step <= last + step * 1e-9:
        values.append(round(first + index * step, 12))
        index += 1
    return values


def tick_label(value: float) -> str:
    """A tick's text: integers without decimals, others with as few as tell them apart."""
    if float(value).is_integer():
        return f"{int(value):,}".replace(",", " ") if abs(value) >= 10_000 else str(int(value))
    return f"{value:.4g}"


@dataclass(frozen=True)
class Frame:
    """The plot area of a chart inside its SVG, in pixels."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top


def axes(
    root: Element,
    frame: Frame,
    x: Scale,
    y: Scale,
    x_ticks: Sequence[float],
    y_ticks: Sequence[float],
    x_label: str,
    y_label: str,
    x_text=tick_label,
    y_text=tick_label,
) -> Element:
    """Grid lines, both axes with their ticks and tick labels, and the axis titles."""
    group = root.child("g", class_="axes")
    grid = group.child("g", class_="grid")
    for value in y_ticks:
        at = round(y(value)) + 0.5
        grid.child("line", x1=frame.left, x2=frame.right, y1=at, y2=at)
    x_axis = group.child("g", class_="axis x")
    x_axis.child("line", x1=frame.left, x2=frame.right, y1=frame.bottom, y2=frame.bottom)
    for value in x_ticks:
        at = x(value)
        x_axis.child("line", x1=at, x2=at, y1=frame.bottom, y2=frame.bottom + 5)
        x_axis.child("text", x_text(value), x=at, y=frame.bottom + 18, text_anchor="middle")
    x_axis.child(
        "text",
        x_label,
        class_="axis-title",
        x=(frame.left + frame.right) / 2,
        y=frame.bottom + 36,
        text_anchor="middle",
    )
    y_axis = group.child("g", class_="axis y")
    y_axis.child("line", x1=frame.left, x2=frame.left, y1=frame.top, y2=frame.bottom)
    for value in y_ticks:
        at = y(value)
        y_axis.child("line", x1=frame.left - 5, x2=frame.left, y1=at, y2=at)
        y_axis.child("text", y_text(value), x=frame.left - 8, y=at + 4, text_anchor="end")
    middle = (frame.top + frame.bottom) / 2
    y_axis.child(
        "text",
        y_label,
        class_="axis-title",
        x=16,
        y=middle,
        text_anchor="middle",
        transform=f"rotate(-90 16 {number(middle)})",
    )
    return group


def legend(root: Element, entries: Sequence[tuple[str, str]], x: float, y: float) -> Element:
    """A row of (css class, label) swatches starting at (x, y)."""
    group = root.child("g", class_="legend")
    for css_class, label in entries:
        item = group.child("g", class_=f"legend-item {css_class}")
        item.child("line", class_="swatch", x1=x, x2=x + 22, y1=y - 4, y2=y - 4)
        item.child("text", label, x=x + 28, y=y)
        x += 40 + 7.5 * len(label)
    return group
