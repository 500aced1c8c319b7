"""The atlas: a static HTML site of a whole sweep that opens from file:// (no server, no CDN).

    index.html                     model, layers with completion, job settings, discriminator
    layers/<slug>.html             one thumbnail per unit (its best sample), sortable and
                                   filterable by score, paginated in the browser
    data/<slug>.js                 the layer's rows (a script, since file:// forbids fetch())
    units/<slug>/<unit>.html       chains x snapshots, the final samples grouped by facet beside
                                   the dataset exemplars, activation / realism traces (SVG), every
                                   score, a Python snippet; a dead unit: the reason and exemplars
    img/<slug>/<unit>-*.png        nearest-neighbour upscaled PNGs

Every name from the model or the spec is HTML-escaped (and JSON-escaped inside scripts). Rebuilds
are incremental: a unit's page and images are re-rendered only when its manifest row changed
(``atlas-state.json`` keeps each unit's checksum and commit time).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldam_sweep.atlas.format import escape as _e
from ldam_sweep.atlas.format import fmt_number as _fmt
from ldam_sweep.atlas.format import slug, unit_page
from ldam_sweep.render import chain_labels, render_change, render_grid, unit_grid
from ldam_sweep.errors import CorruptBlockError
from ldam_sweep.atlas.facets import facet_groups
from ldam_sweep.settings import FACET_THRESHOLD
from ldam_sweep.store.schema import SCORE_LABELS, TEXT_COLUMNS, display_label, shrink
from ldam_sweep.store.query import SweepStore, open_store
from ldam_sweep.store.realism import LOW_REALISM

PAGE_SIZE = 200
STATE_FILE = "atlas-state.json"
TOP_THUMBNAILS = 4  # per layer on the index: its units with the highest activation ratio

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
a{color:#0b5cad;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#eee}.bar{background:#ddd;width:120px;height:10px;display:inline-block}
.bar>span{background:#3a7;height:10px;display:block}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{background:#fff;border:1px solid #ddd;padding:4px;width:132px;font-size:11px}
.cell img{width:128px;height:128px;image-rendering:pixelated;display:block}
img.pix{image-rendering:pixelated}pre{background:#f0f0f0;padding:.6em;overflow-x:auto}
.controls{margin:.6em 0}.controls>*{margin-right:.6em}.muted{color:#777}.corrupt{color:#b00020}
.side{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}.side>div{max-width:46%}.facet{margin:.3em 0}
.badge{background:#555;color:#fff;border-radius:3px;padding:0 .4em;font-size:11px}
.flag{background:#b35c00;color:#fff;border-radius:3px;padding:0 .4em;font-size:11px;margin-right:.3em}
.deadcell{width:128px;height:128px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
img.thumb{width:40px;height:40px;image-rendering:pixelated;vertical-align:middle;margin-right:2px}td.tops{white-space:nowrap}
.nav a{margin-right:1em}.nav .off{color:#aaa;margin-right:1em}
"""


def store_name(st: SweepStore) -> str:
    """How the atlas names its store: a local store by its folder's name (the atlas is copied to other
    machines; the build machine's paths mean nothing there), an object store by its URL."""
    return Path(st.loc.root).name if st.loc.is_local else st.loc.url


def portable(value: Any, st: SweepStore) -> Any:
    """``value`` (text, or a spec document) with the build machine's absolute paths replaced: the
    store's path by its name, any other absolute path by its last part."""
    if isinstance(value, dict):
        return {k: portable(v, st) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, st) for v in value]
    if not isinstance(value, str):
        return value
    if st.loc.is_local:
        value = value.replace(st.loc.root, store_name(st))
        parent = str(Path(st.loc.root).parent)
        if parent != "/":
            value = value.replace(parent + "/", "")
    if "\n" not in value and " " not in value:  # a bare absolute path (weights, data), or a model name "kind:/path"
        kind, sep, rest = value.rpartition(":") if ":/" in value else ("", "", value)
        if rest.startswith("/") and not rest.startswith("//"):  # not a URL (s3://...)
            value = kind + sep + Path(rest).name
    return value


def _page(title: str, body: str, depth: int) -> str:
    up = "../" * depth
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<link rel='stylesheet' href='{up}style.css'></head><body>"
            f"<p class='muted'><a href='{up}index.html'>atlas index</a></p>{body}</body></html>")


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a <script> element (no '</script>' or '<!--' can appear)."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _svg_traces(trace: np.ndarray, title: str, width: int = 520, height: int = 180) -> str:
    """(chains, steps + 1) -> an inline SVG line plot, one polyline per chain."""
    t = np.asarray(trace, dtype=np.float64)
    finite = t[np.isfinite(t)]
    if finite.size == 0:
        return f"<p class='muted'>{_e(title)}: no finite values</p>"
    lo, hi = float(finite.min()), float(finite.max())
    hi = hi if hi > lo else lo + 1.0
    pad = 30
    n = t.shape[1]
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    idx = np.unique(np.linspace(0, n - 1, min(n, 160)).round().astype(int))  # enough points for 520 px
    xs = pad + (width - pad - 5) * idx / max(1, n - 1)
    lines = []
    for c, row in enumerate(t[:, idx]):
        ys = 5 + (height - pad) * (1 - (row - lo) / (hi - lo))
        ok = np.isfinite(ys)
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs[ok], ys[ok]))
        lines.append(f"<polyline fill='none' stroke='{colors[c % len(colors)]}' stroke-width='1' points='{pts}'/>")
    axis = (f"<text x='2' y='12' font-size='10'>{hi:.3g}</text><text x='2' y='{height - pad + 5}' font-size='10'>{lo:.3g}</text>"
            f"<text x='{pad}' y='{height - 8}' font-size='10'>step 0</text>"
            f"<text x='{width - 60}' y='{height - 8}' font-size='10'>step {n - 1}</text>")
    return (f"<figure><figcaption>{_e(title)}</figcaption><svg xmlns='http://www.w3.org/2000/svg' width='{width}' "
            f"height='{height}' role='img' aria-label='{_e(title)}'>{axis}{''.join(lines)}</svg></figure>")


def _svg_histogram(row: dict[str, Any], exemplar_acts: np.ndarray | None, final_acts: np.ndarray | None,
                   width: int = 520, height: int = 150) -> str:
    """The unit's activation over the real pool (bars: log(1 + images) per bin) with ticks for its
    top exemplars (blue, below the axis) and its chains' final samples (orange, above)."""
    counts = row.get("data_hist")
    if not counts:
        return ""
    counts = np.asarray(counts, dtype=np.float64)
    lo, hi = float(row["data_hist_lo"]), float(row["data_hist_hi"])
    marks = [np.asarray(a, dtype=np.float64)[np.isfinite(a)] for a in (exemplar_acts, final_acts) if a is not None]
    xmin = min([lo, *[float(m.min()) for m in marks if m.size]])
    xmax = max([hi, *[float(m.max()) for m in marks if m.size]])
    xmax = xmax if xmax > xmin else xmin + 1.0
    pad, base = 30, height - 34

    def x(v: float) -> float:
        return pad + (width - pad - 8) * (v - xmin) / (xmax - xmin)

    edges = np.linspace(lo, hi, len(counts) + 1)
    top = np.log1p(counts.max()) or 1.0
    bars = "".join(f"<rect class='bin' x='{x(edges[i]):.1f}' y='{base - (base - 8) * np.log1p(c) / top:.1f}' "
                   f"width='{max(0.5, x(edges[i + 1]) - x(edges[i]) - 0.5):.1f}' height='{(base - 8) * np.log1p(c) / top:.1f}' "
                   f"fill='#9bb'><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c)} images</title></rect>"
                   for i, c in enumerate(counts) if c > 0)
    zero = (f"<line x1='{x(0):.1f}' x2='{x(0):.1f}' y1='4' y2='{base}' stroke='#888' stroke-dasharray='3,3'/>"
            if xmin < 0 < xmax else "")
    ticks = ""
    if exemplar_acts is not None:
        ticks += "".join(f"<line class='mark-exemplar' x1='{x(v):.1f}' x2='{x(v):.1f}' y1='{base + 2}' y2='{base + 12}' "
                         f"stroke='#1f5fbf' stroke-width='2'><title>exemplar {v:.3g}</title></line>" for v in marks[0])
    if final_acts is not None:
        ticks += "".join(f"<path class='mark-sample' d='M{x(v):.1f},{14} l-4,-8 h8 z' fill='#e67300'>"
                         f"<title>final sample {v:.3g}</title></path>" for v in marks[-1])
    axis = (f"<line x1='{pad}' x2='{width - 8}' y1='{base}' y2='{base}' stroke='#444'/>"
            f"<text x='{pad}' y='{height - 6}' font-size='10'>{xmin:.3g}</text>"
            f"<text x='{width - 60}' y='{height - 6}' font-size='10'>{xmax:.3g}</text>")
    n = int(counts.sum())
    caption = (f"activation over {n} real images (bars: log(1 + images) per bin); blue ticks: the top exemplars; "
               f"orange: the chains' final samples. Above 0 on {100 * (row.get('data_active_fraction') or 0):.0f}% of them; median "
               f"{_fmt(row.get('data_p50'))}, 90th percentile {_fmt(row.get('data_p90'))}, 99th {_fmt(row.get('data_p99'))}")
    return (f"<figure class='hist'><figcaption>{_e(caption)}</figcaption><svg xmlns='http://www.w3.org/2000/svg' "
            f"width='{width}' height='{height}' role='img' aria-label='activation histogram'>{axis}{zero}{bars}{ticks}</svg></figure>")


def label_text(row: dict[str, Any]) -> str:
    """A unit's label line: its exemplars' class with purity and base rate, and the network's reading."""
    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.0f}%"

    parts = []
    if row.get("label") is not None:
        parts.append(f"label {row['label']}: {pct(row.get('label_purity'))} of its top exemplars are {row['label']} "
                     f"({pct(row.get('label_base_rate'))} of the real images are)")
    if row.get("sample_label") is not None:
        match = "" if row.get("label_match") is None else f"; {pct(row['label_match'])} of chains read as its label"
        parts.append(f"the network reads its samples as {row['sample_label']} "
                     f"({pct(row.get('sample_label_share'))} of chains{match})")
    return "; ".join(parts)


@dataclass
class AtlasReport:
    out: Path
    units_rendered: int
    units_skipped: int
    layers: int
    seconds: float


def build_atlas(store: str | SweepStore, out: str | Path, *, force: bool = False, workers: int = 1,
                address: str | None = None) -> AtlasReport:
    """Write (or update) the atlas of a store into ``out``. ``workers`` > 1: the unit pages (nearly
    all of the work) are rendered by that many Ray tasks at a time, a block of units each, on a local
    Ray or the cluster at ``address`` (``atlas.parallel``); the layer pages, search and index here."""
    t0 = time.perf_counter()
    st = store if isinstance(store, SweepStore) else open_store(store)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "style.css").write_text(CSS)
    state_path = out / STATE_FILE
    state: dict[str, str] = {} if force or not state_path.is_file() else json.loads(state_path.read_text())
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in st.units(status=None).to_pylist():
        by_layer.setdefault(r["layer"], []).append(r)
    layers_info = st.layers()
    realism = st.realism()  # the layer pages' and the index's realism lines
    informative = st.informativeness()  # and their informativeness (2-AFC observer) means
    skipped = 0
    jobs: list[tuple[str, int, list[dict[str, Any]]]] = []  # (layer, block, rows of its units to render)
    layer_entries: list[list[dict[str, Any]]] = []
    for info in layers_info:
        name = info["name"]
        entries = []
        todo: dict[int, list[dict[str, Any]]] = {}
        for r in by_layer.get(name, []):
            key = f"{name}\x00{r['unit']}"
            stamp = f"{r['status']}|{r['checksum']}|{r['committed_at']}|{r.get('detected_fraction')}|{r.get('integrity')}"
            if r["status"] in ("ok", "dead"):
                if state.get(key) != stamp or not unit_page(out, name, r["unit"]).is_file():
                    todo.setdefault(int(r["block"]), []).append(r)
                else:
                    skipped += 1
            elif r["status"] == "corrupt" and state.get(key) != stamp:  # marked by verify --repair
                _render_corrupt_unit(st, name, int(r["unit"]), r["error"] or "", out)
            state[key] = stamp
            entries.append({"unit": r["unit"], "status": r["status"], "error": portable(r["error"] or "", st)[:300],
                            "flags": unit_flags(r), **{k: r.get(k) for k in TEXT_COLUMNS},
                            **{k: _short(r.get(k)) for k, _ in SCORE_LABELS}})
        jobs += [(name, block, brows) for block, brows in todo.items()]
        layer_entries.append(entries)
    if workers > 1 and jobs:
        from ldam_sweep.atlas.parallel import render_in_parallel

        rendered, corrupt = render_in_parallel(render_blocks, st, jobs, out, workers=workers, address=address)
    else:
        rendered, corrupt = render_blocks(st, jobs, out)
    search: list[list[Any]] = []  # the index's search rows (search.js)
    tops: dict[str, list[int]] = {}  # layer -> its units with the highest activation ratio (the index's thumbnails)
    for li, (info, entries) in enumerate(zip(layers_info, layer_entries)):
        name, s = info["name"], slug(info["name"])
        lp = st.layer_plan(name)
        for e in entries:
            why = corrupt.get((name, int(e["unit"])))
            if why is not None:  # its block cannot be shown: checked again on the next build
                e.update({"status": "corrupt", "error": portable(why, st)[:300], **{k: None for k, _ in SCORE_LABELS}})
                state.pop(f"{name}\x00{e['unit']}", None)
        seen = {e["unit"] for e in entries}
        planned = lp.selected if lp.selected is not None else range(lp.units)
        entries += [{"unit": int(u), "status": "pending", "error": "", **{k: None for k, _ in SCORE_LABELS}}
                    for u in planned if int(u) not in seen]
        (out / "data" / f"{s}.js").write_text(f"window.ATLAS_LAYER = {_json_for_script(entries)};\n")
        paged = sorted(int(e["unit"]) for e in entries if e["status"] in ("ok", "dead", "corrupt"))
        (out / "data" / f"{s}-nav.js").write_text(f"window.ATLAS_NAV = {_json_for_script(paged)};\n")
        ratio = {int(r["unit"]): r.get("activation_ratio") for r in by_layer.get(name, [])}  # full precision
        ranked = sorted((e for e in entries if e["status"] == "ok"), key=lambda e: -(ratio.get(int(e["unit"])) or -np.inf))
        tops[name] = [int(e["unit"]) for e in ranked[:TOP_THUMBNAILS]]
        search += [search_row(li, e) for e in entries]
        _write_layer_page(st, info, realism, out, informative.get(name))
    names = [[info["name"], slug(info["name"])] for info in layers_info]
    (out / "data" / "search.js").write_text(f"window.ATLAS_SEARCH = {_json_for_script({'layers': names, 'units': search})};\n")
    _write_index(st, layers_info, realism, out, tops, informative)
    state_path.write_text(json.dumps(state))
    return AtlasReport(out=out, units_rendered=rendered, units_skipped=skipped, layers=len(layers_info),
                       seconds=time.perf_counter() - t0)


def render_blocks(st: SweepStore, jobs: list[tuple[str, int, list[dict[str, Any]]]],
                  out: Path) -> tuple[int, dict[tuple[str, int], str]]:
    """Render the unit pages and images of ``jobs`` ((layer, block, rows) each: one read per block)
    into ``out``: (units rendered, {(layer, unit): why} for units whose block is corrupt)."""
    rendered, corrupt = 0, {}
    infos = {info["name"]: info for info in st.layers()} if jobs else {}
    for name, block, brows in jobs:
        lo, _ = st.layer_plan(name).block_bounds(block)
        try:
            arrays = st.read_block(name, block)
        except CorruptBlockError as err:
            for r in brows:
                corrupt[(name, int(r["unit"]))] = str(err)
                _render_corrupt_unit(st, name, int(r["unit"]), str(err), out)
            continue
        for r in brows:
            _render_unit(st, infos[name], r, {k: v[int(r["unit"]) - lo] for k, v in arrays.items()}, out)
            rendered += 1
    return rendered, corrupt


def _short(v: Any) -> Any:
    """A score as a layer page's data carries it: 4 significant digits (what the page shows), None
    for a missing or non-finite value."""
    if isinstance(v, float):
        return float(f"{v:.4g}") if np.isfinite(v) else None
    return v


def search_row(layer_index: int, entry: dict[str, Any]) -> list[Any]:
    """A unit as the index's search sees it: [layer index, unit, label or "", where the label comes
    from ("e": exemplars, "n": the network's reading of the samples, or ""), its purity or share,
    flags (status and unit_flags, as search words such as "dead" or "low-realism")]. One-letter
    codes and compact JSON keep search.js small: one row is ~25 bytes, 3 MB at 122k units."""
    label = display_label(entry)
    source = "" if label is None else ("e" if entry.get("label") is not None else "n")
    strength = entry.get("label_purity") if source == "e" else entry.get("sample_label_share")
    flags = ([] if entry["status"] == "ok" else [entry["status"]]) + [f.replace(" ", "-") for f in entry.get("flags") or []]
    return [layer_index, int(entry["unit"]), label or "", source,
            None if strength is None else round(float(strength), 3), " ".join(flags)]


def unit_flags(row: dict[str, Any]) -> list[str]:
    """What a person should know before trusting a unit's samples (docs/scores.md)."""
    flags = []
    if (row.get("detected_fraction") or 0) >= LOW_REALISM:
        flags.append("low realism")
    if (row.get("saturated_fraction") or 0) > 0:
        flags.append("saturated chains")
    if (row.get("frozen_fraction") or 0) > 0:
        flags.append("frozen chains")
    return flags


def _integrity_text(st: SweepStore) -> str:
    """What the last ``ldam-sweep verify`` found (or that it never ran since the last write)."""
    v = st.verification()
    verify = f"ldam-sweep verify {store_name(st)}"
    if v["state"] == "never":
        text = f"not verified: `{verify}` checks every file and block (units are marked unverified until then)"
    elif v["state"] == "damaged":
        text = f"the last verify's record is damaged: `{verify}` writes it again"
    elif v["state"] == "stale":
        text = f"verified at {v['verified_at']}; {v['unverified']} units committed since are unverified: `{verify}`"
    else:
        text = f"verified at {v['verified_at']}" + ("" if v["corrupt"] else ": every file and committed block intact")
    if v["corrupt"]:
        text += f"; {v['corrupt']} units in corrupt blocks: `{verify} --repair`, then `ldam-sweep run SPEC --store {store_name(st)}`"
    return text


def _pct(v: Any) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.0f}%"


def _flag_html(flags: list[str]) -> str:
    return "".join(f"<span class='flag'>{_e(f)}</span>" for f in flags)


def _realism_text(doc: dict[str, Any] | None, layer: str | None) -> str:
    """One line on a layer's (or all layers', for None) realism, or ''."""
    if not doc:
        return ""
    e = (doc.get("pooled") if layer is None else (doc.get("layers") or {}).get(layer)) or {}
    if e.get("c2st") is None:
        return ""
    ex = "" if e.get("c2st_exemplars") is None else f" (its units' exemplars: {e['c2st_exemplars']:.2f})"
    hf_ex = "" if e.get("hf_ratio_exemplars") is None else f" (exemplars: {e['hf_ratio_exemplars']:.2f})"
    stale = "" if layer is None or (doc.get("current") or {}).get(layer, True) else \
        " — units were committed since it was measured: `ldam-sweep realism STORE` re-measures"
    return (f"realism: a classifier tells the samples from real images with held-out accuracy {e['c2st']:.2f}{ex}, "
            f"0.5 = indistinguishable; fine detail {e['hf_ratio']:.2f}× the real images'{hf_ex}{stale}")


NAV_JS = """
(function(){
  const units = window.ATLAS_NAV || [], here = +document.body.dataset.unit, i = units.indexOf(here);
  const links = {prev: units[i - 1], next: units[i + 1]};
  for (const [id, u] of Object.entries(links)){
    const a = document.getElementById(id);
    if (u === undefined || i < 0){ a.removeAttribute('href'); a.className = 'off'; } else { a.href = u + '.html'; }
  }
  document.addEventListener('keydown', e => {
    if (e.target.tagName === 'INPUT') return;
    const u = e.key === 'ArrowLeft' ? links.prev : e.key === 'ArrowRight' ? links.next : undefined;
    if (u !== undefined && i >= 0) location.href = u + '.html';
  });
})();
"""


def _unit_nav(layer: str, unit: int) -> str:
    """The unit page's previous / next links (among the layer's units that have a page, in unit
    order; read from ``data/<slug>-nav.js`` at load, so pages rendered earlier stay right) and the
    link back to its layer page."""
    s = slug(layer)
    return (f"<p class='nav'><a href='../../layers/{s}.html'>layer {_e(layer)}</a>"
            f"<a id='prev' href='#'>← previous unit</a><a id='next' href='#'>next unit →</a>"
            "<span class='muted'>(arrow keys too)</span></p>"
            f"<script src='../../data/{s}-nav.js'></script><script>{NAV_JS}</script>")


def _unit_page(title: str, body: str, unit: int) -> str:
    return _page(title, body, 2).replace("<body>", f"<body data-unit='{int(unit)}'>", 1)


def _render_corrupt_unit(st: SweepStore, layer: str, unit: int, problem: str, out: Path) -> None:
    """The page of a unit whose block failed its checksum: the problem and the repair, no data."""
    s = slug(layer)
    for stale in (out / "img" / s).glob(f"{unit}-*.png"):  # never keep showing images of the old data
        stale.unlink()
    body = (f"<h1>{_e(layer)} · unit {unit}</h1>{_unit_nav(layer, unit)}"
            f"<p class='corrupt'><b>corrupt</b> — run <code>ldam-sweep verify {_e(store_name(st))} --repair</code>, then "
            f"<code>ldam-sweep run SPEC --store {_e(store_name(st))}</code></p><p class='muted'>{_e(portable(problem, st))}</p>")
    (out / "units" / s).mkdir(parents=True, exist_ok=True)
    (out / "units" / s / f"{unit}.html").write_text(_unit_page(f"{layer} unit {unit} (corrupt)", body, unit))


def _ladder(st: SweepStore, data: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray, img_dir: Path,
            s: str, unit: int) -> str:
    """The activation ladder's strip (one row per chain: start, the 1x final, each rung) and its
    caption; under each image its activation / the unit's best real image's (or the activation
    itself where the store has no positive best real activation)."""
    rungs = data["rungs"].astype(np.float32)  # (chains, R, C, h, w)
    act = np.concatenate([data["activation"][:, :1], data["activation"][:, -1:], data["rung_activation"]], 1)
    best = data["exemplar_activation"][0] if "exemplar_activation" in data else float("nan")
    ratio = bool(np.isfinite(best) and best > 0)
    # the images' labels in ASCII: PIL's built-in font has no "×" (nor "–")
    labels = np.vectorize(lambda v: "-" if not np.isfinite(v) else f"{v:.2f}" + ("x" if ratio else ""))(act / best if ratio else act)
    target = (st.plan.spec.get("sampler") or {}).get("target", "auto")  # the run's target: 1x unless the spec says
    run = "final" if target is None else "1x" if target == "auto" else f"{float(target):g}x"
    heads = ["start", run] + [f"{f:g}x" for f in st.plan.ladder]
    render_grid(np.concatenate([starts[:, None], ends[:, None], rungs], 1), st.plan.value_range,
                scale=max(1, 64 // starts.shape[-2]), row_labels=chain_labels(len(starts)),
                col_labels=heads, cell_labels=labels).save(img_dir / f"{unit}-ladder.png", compress_level=1)
    under = "activation ÷ the best real image's" if ratio else "activation"
    reached = {"final": "its final sample (no target)", "1x": "the best real image's activation (1×)"}.get(
        run, f"{run.replace('x', '×')} the best real image's activation")
    return ("<h2>The activation ladder</h2><p class='muted'>each chain from its start to "
            f"{reached}, then on to {', '.join(f'{f:g}×' for f in st.plan.ladder)} of it, with no realism term on the rungs (past the best "
            f"real image the discriminator no longer describes the data); under each image: its {under}</p>"
            f"<img class='pix' alt='activation ladder per chain' src='../../img/{s}/{unit}-ladder.png'>")


def _render_unit(st: SweepStore, info: dict[str, Any], row: dict[str, Any], data: dict[str, np.ndarray], out: Path) -> None:
    """One unit's images and page, from its slices of the block's arrays (read once per block)."""
    name, unit = info["name"], int(row["unit"])
    s = slug(name)
    img_dir = out / "img" / s
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = data["samples"].astype(np.float32)  # (chains, snapshots, C, h, w): thumbnails where the store keeps them
    finals = data["finals"]  # (chains, C, H, W) at full size
    act = data["activation"]
    vr = st.plan.value_range
    h = finals.shape[-2]
    dead = row["status"] == "dead"
    parts = [f"<h1>{_e(name)} · unit {unit}</h1>", _unit_nav(name, unit)]
    flags = unit_flags(row)
    if flags and not row["status"] == "dead":
        why = {"low realism": f"the layer's two-sample classifier called {_pct(row.get('detected_fraction'))} of its "
                              "samples generated",
               "saturated chains": f"{_pct(row.get('saturated_fraction'))} of its chains end mostly on the pixel box's bounds",
               "frozen chains": f"{_pct(row.get('frozen_fraction'))} of its chains stopped moving short of the best real image"}
        parts.append(f"<p>{_flag_html(flags)} " + "; ".join(_e(why[f]) for f in flags) + "</p>")
    label = label_text(row)
    if label:
        parts.append(f"<p class='label'>{_e(label)}</p>")
    link = unit_page(Path("."), name, unit).as_posix()
    parts.append(f"<p class='muted'>stable link (from the atlas folder): <code class='stable-link'>{_e(link)}</code></p>")
    side = []
    if dead:
        parts.append(f"<p class='dead'><span class='badge'>dead</span> not sampled: {_e(portable(row.get('error') or '', st))}</p>")
    else:
        scale = max(1, 128 // h)
        final_act = np.where(np.isfinite(act[:, -1]), act[:, -1], -np.inf)
        best = int(np.argmax(final_act))
        render_grid(finals[best : best + 1, None], vr, scale=scale, pad=0).save(img_dir / f"{unit}-best.png", compress_level=1)
        unit_grid(samples, act, st.snapshot_steps(), vr, scale=max(1, 96 // samples.shape[-2])).save(img_dir / f"{unit}-chains.png",
                                                                                    compress_level=1)
        parts += ["<h2>Chains × snapshots</h2>",
                  f"<img class='pix' alt='samples of {_e(name)} unit {unit}' src='../../img/{s}/{unit}-chains.png'>"]
        facets = facet_groups(finals, vr)
        for old in img_dir.glob(f"{unit}-facet*.png"):  # a rebuild may group the chains differently
            old.unlink()
        rows = []
        for i, chains in enumerate(facets, 1):
            render_grid(finals[chains][None], vr, scale=max(1, 64 // h),
                        cell_labels=np.array([[f"chain {c}" for c in chains]])).save(img_dir / f"{unit}-facet{i}.png", compress_level=1)
            rows.append(f"<div class='facet'><div>facet {i} ({len(chains)} chain{'s' if len(chains) != 1 else ''})</div>"
                        f"<img class='pix' alt='facet {i}' src='../../img/{s}/{unit}-facet{i}.png'></div>")
        left_out = len(finals) - sum(map(len, facets))
        note = f"<p class='muted'>{left_out} diverged chain(s) left out</p>" if left_out else ""
        side.append(f"<div><h2>Final samples by facet</h2><p class='muted'>chains whose low-passed final samples "
                    f"are linked by RMS distances below {FACET_THRESHOLD} of the pixel range</p>{''.join(rows)}{note}</div>")
    if "exemplars" in data:
        ex, ex_act = data["exemplars"].astype(np.float32), data["exemplar_activation"]
        if np.isfinite(ex).any():
            render_grid(ex[None], vr, scale=max(1, 64 // h),
                        cell_labels=np.vectorize(lambda v: f"{v:.3g}")(ex_act[None])).save(img_dir / f"{unit}-exemplars.png", compress_level=1)
            side.append("<div><h2>Dataset exemplars (top real images)</h2>"
                        f"<img class='pix' alt='exemplars' src='../../img/{s}/{unit}-exemplars.png'></div>")
    if side:
        parts.append(f"<div class='side'>{''.join(side)}</div>")
    starts = data["starts"].astype(np.float32) if "starts" in data else None
    if not dead and starts is not None and np.isfinite(starts).all():
        ends = shrink(finals, st.plan.thumbnail)  # at the starts' size (thumbnails where the store keeps them)
        strip, full = render_change(starts, ends, vr, scale=max(1, 64 // starts.shape[-2]))
        strip.save(img_dir / f"{unit}-change.png", compress_level=1)
        parts.append("<h2>What each chain changed</h2><p class='muted'>start | final | final − start (channels averaged): "
                     f"red where the final image is brighter, blue where darker; full colour = {full:.2g} of the pixel "
                     "range (this unit's largest change)</p>"
                     f"<img class='pix change' alt='start, final and change per chain' src='../../img/{s}/{unit}-change.png'>")
    if not dead and starts is not None and "rungs" in data and np.isfinite(starts).all():
        parts.append(_ladder(st, data, starts, shrink(finals, st.plan.thumbnail), img_dir, s, unit))
    hist = _svg_histogram(row, data["exemplar_activation"] if "exemplar_activation" in data else None,
                          None if dead else act[:, -1])
    if hist:
        parts.append("<h2>Activation on real data</h2>" + hist)
    if not dead:
        parts.append("<h2>Traces</h2>" + _svg_traces(act, "activation per step (one line per chain)"))
        if "realism" in data:
            parts.append(_svg_traces(data["realism"], "realism log D per step"))
    score_rows = "".join(f"<tr><th>{_e(label)}</th><td>{_e(_fmt(row.get(k)))}</td></tr>" for k, label in SCORE_LABELS)
    meta = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(row.get(k)))}</td></tr>"
                   for k in ("status", "objective", "method", "lam", "chains", "steps", "attempt", "worker", "committed_at"))
    parts.append(f"<h2>Scores</h2><table>{score_rows}{meta}</table>")
    snippet = f"import ldam_sweep as ls\nst = ls.open_store({store_name(st)!r})  # the store's path where you read it\n"
    if dead:
        snippet += f"images, activations = st.exemplars({name!r}, {unit})  # (k, C, H, W), (k,)"
    else:
        snippet += (f"samples = st.samples({name!r}, {unit})  # (chain, snapshot, C, h, w): every snapshot"
                    + (" (thumbnails)" if st.plan.thumbnail > 1 else "") +
                    f"\nfinals = st.finals({name!r}, {unit})  # (chain, C, H, W): each chain's final sample, full size")
    parts.append(f"<h2>Load it from Python</h2><pre>{_e(snippet)}</pre>")
    page = unit_page(out, name, unit)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(_unit_page(f"{name} unit {unit}", "".join(parts), unit))


# HTML-escaping in the pages' scripts (names and labels from the model, the spec and the data)
ESC_JS = """function esc(s){return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}"""
LAYER_JS = """
(function(){
  const rows = window.ATLAS_LAYER, slug = document.body.dataset.slug, size = %d;
  const sortSel = document.getElementById('sort'), filt = document.getElementById('filter'),
        minIn = document.getElementById('min'), grid = document.getElementById('grid'),
        pager = document.getElementById('pager'), count = document.getElementById('count');
  let page = 0;
  function fmt(v){return (v === null || v === undefined) ? '–' : (typeof v === 'number' ? Number(v.toPrecision(4)) : esc(v));}
  const labelIn = document.getElementById('label');
  function shown(r){ return r.label ?? r.sample_label ?? null; }  // display_label: exemplars' class, else the network's reading
  function view(){
    const key = sortSel.value, f = filt.value, min = parseFloat(minIn.value), lab = labelIn.value.trim().toLowerCase();
    let v = rows.filter(r => f === 'all' || r.status === f);
    if (lab) v = v.filter(r => shown(r) !== null && String(shown(r)).toLowerCase() === lab);
    if (!isNaN(min) && key !== 'unit') v = v.filter(r => r[key] !== null && r[key] >= min);
    v.sort((a, b) => key === 'unit' ? a.unit - b.unit : ((b[key] ?? -Infinity) - (a[key] ?? -Infinity)));
    return v;
  }
  function render(){
    const v = view(), pages = Math.max(1, Math.ceil(v.length / size));
    page = Math.min(page, pages - 1);
    count.textContent = v.length + ' of ' + rows.length + ' units';
    // a cell: the picture, the unit and its label, and the one score the page is sorted by
    const key = sortSel.value, score = key === 'unit' ? 'activation_ratio' : key, scoreName = key === 'unit'
      ? 'activation ratio' : sortSel.options[sortSel.selectedIndex].text;
    grid.innerHTML = v.slice(page * size, (page + 1) * size).map(r => r.status === 'ok'
      ? `<div class="cell"><a href="../units/${slug}/${r.unit}.html"><img alt="unit ${r.unit}" src="../img/${slug}/${r.unit}-best.png"></a>`
        + `<b>unit ${r.unit}</b>` + (shown(r) !== null ? ` · <span class="label">label ${esc(shown(r))}</span>` : '')
        + `<br><span class="score muted">${esc(scoreName)} ${fmt(r[score])}</span>`
        + (r.flags || []).map(f => ` <span class="flag">${esc(f)}</span>`).join('') + `</div>`
      : r.status === 'corrupt'
      ? `<div class="cell corrupt"><a href="../units/${slug}/${r.unit}.html"><b>unit ${r.unit}</b></a><br><b>corrupt</b> — run <code>ldam-sweep verify STORE --repair</code></div>`
      : r.status === 'dead'
      ? `<div class="cell dead"><a href="../units/${slug}/${r.unit}.html"><div class="deadcell">not sampled</div></a>`
        + `<b>unit ${r.unit}</b> <span class="badge">dead</span>`
        + (shown(r) !== null ? `<br><span class="label">label ${esc(shown(r))}</span>` : '') + `</div>`
      : `<div class="cell"><b>unit ${r.unit}</b><br>${r.status}${r.error ? ': ' + esc(r.error) : ''}</div>`).join('');
    pager.innerHTML = Array.from({length: pages}, (_, i) => i === page ? `<b>${i + 1}</b>` : `<a href="#" data-p="${i}">${i + 1}</a>`).join(' ');
  }
  pager.addEventListener('click', e => { if (e.target.dataset.p) { e.preventDefault(); page = +e.target.dataset.p; render(); } });
  [sortSel, filt, minIn, labelIn].forEach(el => el.addEventListener('input', () => { page = 0; render(); }));
  render();
})();
"""


def _two(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _informative_text(e: dict[str, Any]) -> str:
    """A layer's informativeness means as one line (docs/scores.md, "Informativeness")."""
    return (f"Informativeness (a 2-AFC observer on held-out images picks the one the unit prefers; 0.5 = chance), "
            f"mean of {e['units']} units: samples {_two(e['samples'])}, their starts {_two(e['starts'])}, "
            f"top exemplars {_two(e['exemplars'])}.")


def _write_layer_page(st: SweepStore, info: dict[str, Any], realism: dict[str, Any] | None, out: Path,
                      informative: dict[str, Any] | None = None) -> None:
    name, s = info["name"], slug(info["name"])
    options = "<option value='unit'>unit</option>" + "".join(
        f"<option value='{k}'>{_e(label)}</option>" for k, label in SCORE_LABELS)
    body = (f"<h1>Layer {_e(name)}</h1>"
            f"<p>{_e(info['module_type'])}, {_e(info['kind'])}, output {_e('×'.join(map(str, info['output_shape'])))}, "
            f"objective {_e(info['objective'])}; {info['done']} of {info['planned']} units done ({info['dead']} dead: "
            f"not sampled), {info['failed']} failed.</p>"
            + (f"<p>{_e(_realism_text(realism, name))}</p>" if realism else "")
            + (f"<p>{_e(_informative_text(informative))}</p>" if informative else "") +
            f"<div class='controls'><label>sort by <select id='sort'>{options}</select></label>"
            "<label>show <select id='filter'><option value='all'>all</option><option value='ok'>ok</option>"
            "<option value='dead'>dead</option><option value='failed'>failed</option><option value='corrupt'>corrupt</option>"
            "<option value='pending'>pending</option></select></label>"
            "<label>min value <input id='min' type='number' step='any' size='6'></label>"
            "<label>label <input id='label' type='search' size='8'></label><span id='count'></span></div>"
            "<div id='pager'></div><div class='grid' id='grid'></div>"
            f"<script src='../data/{s}.js'></script><script>{ESC_JS}{LAYER_JS % PAGE_SIZE}</script>")
    page = _page(f"layer {name}", body, 1).replace("<body>", f"<body data-slug='{_e(s)}'>", 1)
    (out / "layers").mkdir(parents=True, exist_ok=True)
    (out / "layers" / f"{s}.html").write_text(page)


SEARCH_JS = """
(function(){
  const S = window.ATLAS_SEARCH, box = document.getElementById('search'), out = document.getElementById('results'),
        found = document.getElementById('found'), limit = %d;
  const layers = S.layers.map(l => ({name: l[0], lower: l[0].toLowerCase(), slug: l[1]}));
  const SOURCE = {e: 'exemplars', n: 'network'};  // where a label comes from (search_row's codes)
  // how well one unit matches one term: 0 best, -1 no match (the rules: docs/atlas.md, "Search")
  function rank(u, term){
    const L = layers[u[0]], label = u[2].toLowerCase(), flags = u[5] ? u[5].split(' ') : [];
    const i = term.indexOf(':');
    if (i > 0){
      const k = term.slice(0, i), v = term.slice(i + 1);
      if (k === 'layer') return L.lower === v ? 0 : (L.lower.includes(v) ? 1 : -1);
      if (k === 'unit') return String(u[1]) === v ? 0 : -1;
      if (k === 'label') return label === v ? 0 : -1;
      if (k === 'is') return flags.includes(v) ? 0 : -1;
      return -1;
    }
    if (label === term || flags.includes(term)) return 0;
    if (L.lower === term) return 1;
    if (/^[0-9]+$/.test(term) && String(u[1]) === term) return 2;
    return /[a-z]/.test(term) && L.lower.includes(term) ? 3 : -1;  // "3" is a label or unit, not part of "relu3"
  }
  function search(q){
    const whole = q.trim().toLowerCase(), terms = whole.split(/\\s+/).filter(Boolean), hits = [];
    if (!terms.length) return hits;
    for (const u of S.units){
      let r = 0;  // a label of several words matches the whole query
      if (u[2].toLowerCase() !== whole){
        for (const t of terms){ const x = rank(u, t); if (x < 0){ r = -1; break; } r += x; }
      }
      if (r >= 0) hits.push([r, u]);
    }
    hits.sort((a, b) => a[0] - b[0] || (b[1][4] ?? -1) - (a[1][4] ?? -1) || a[1][0] - b[1][0] || a[1][1] - b[1][1]);
    return hits;
  }
  function render(){
    const q = box.value, t0 = performance.now(), hits = search(q);
    history.replaceState(null, '', q ? '#q=' + encodeURIComponent(q) : '#');
    found.textContent = q.trim() ? hits.length + ' units match' + (hits.length > limit ? ' (first ' + limit + ' shown)' : '') : '';
    found.dataset.ms = (performance.now() - t0).toFixed(1);
    out.innerHTML = hits.length ? '<tr><th></th><th>layer</th><th>unit</th><th>label</th><th>from</th><th>purity / share</th><th>flags</th></tr>' +
      hits.slice(0, limit).map(([r, u]) => {
        const L = layers[u[0]], page = `units/${L.slug}/${u[1]}.html`, linked = !/\\b(pending|failed)\\b/.test(u[5]);
        const pictured = linked && !/\\b(dead|corrupt)\\b/.test(u[5]);
        const thumb = pictured ? `<a href="${page}"><img class="thumb" loading="lazy" alt="" src="img/${L.slug}/${u[1]}-best.png"></a>` : '';
        return `<tr class="hit"><td>${thumb}</td><td>${esc(L.name)}</td><td>${linked ? `<a href="${page}">unit ${u[1]}</a>` : 'unit ' + u[1]}</td>` +
          `<td>${esc(u[2])}</td><td>${SOURCE[u[3]] ?? ''}</td><td>${u[4] ?? '–'}</td><td>${esc(u[5])}</td></tr>`;
      }).join('') : '';
  }
  box.addEventListener('input', render);
  if (location.hash.startsWith('#q=')){ try { box.value = decodeURIComponent(location.hash.slice(3)); } catch (e) {} }
  render();
})();
"""
SEARCH_LIMIT = 200


def _write_index(st: SweepStore, layers_info: list[dict[str, Any]], realism: dict[str, Any] | None, out: Path,
                 tops: dict[str, list[int]], informative: dict[str, dict[str, Any]]) -> None:
    attrs = st.attrs
    spec = attrs.get("spec", {})
    rows = []
    agreement = st.label_agreement()
    for info in layers_info:
        frac = info["done"] / info["planned"] if info["planned"] else 0
        e = ((realism or {}).get("layers") or {}).get(info["name"]) or {}
        cells = "".join(f"<td>{_e(_fmt(e.get(k)))}</td>" for k in ("c2st", "c2st_exemplars", "hf_ratio", "hf_ratio_exemplars"))
        a = agreement.get(info["name"])
        cells += f"<td>{a['agree']:.2f} ({a['chance']:.2f}; {a['units']} units)</td>" if a else "<td>–</td>"
        o = informative.get(info["name"])
        cells += f"<td>{' / '.join(_two(o[k]) for k in ('samples', 'starts', 'exemplars'))}</td>" if o else "<td>–</td>"
        thumbs = "".join(f"<a href='units/{slug(info['name'])}/{u}.html'><img class='thumb' loading='lazy' "
                         f"alt='{_e(info['name'])} unit {u}' title='unit {u}' src='img/{slug(info['name'])}/{u}-best.png'></a>"
                         for u in tops.get(info["name"], []))
        rows.append(f"<tr><td><a href='layers/{slug(info['name'])}.html'>{_e(info['name'])}</a></td><td class='tops'>{thumbs}</td>"
                    f"<td>{_e(info['module_type'])}</td><td>{_e(info['kind'])}</td><td>{info['units']}</td>"
                    f"<td>{info['done']}</td><td>{info['failed']}</td><td>{info['corrupt']}</td><td>{info['pending']}</td><td>{info['dead']}</td>"
                    f"<td><span class='bar'><span style='width:{100 * frac:.0f}%'></span></span> {100 * frac:.0f}%</td>{cells}</tr>")
    d = st.discriminator_info()
    d_text = (f"held-out accuracy {d['heldout_accuracy']:.3f} (real {d['heldout_real_accuracy']:.3f}, "
              f"fresh chains {d['heldout_fake_accuracy']:.3f})" if d else "none (λ = 0)")
    prior = st.prior_info()
    if prior:
        from ldam_sweep.stage import prior_line

        d_text += f". Score prior (method walk): {prior_line(prior)}"
    model_name = portable(attrs["model"]["name"], st)
    body = (f"<h1>ldam-sweep atlas: {_e(model_name)}</h1>"
            f"<p>store <code>{_e(store_name(st))}</code>, created {_e(attrs.get('created_at', ''))}, "
            f"model fingerprint <code>{_e(attrs['model']['fingerprint'][:12])}</code></p>"
            "<h2>Layers</h2><table><tr><th>layer</th><th title='its units with the highest activation ratio'>top units</th>"
            "<th>module</th><th>kind</th><th>units</th><th>done</th>"
            "<th>failed</th><th>corrupt</th><th>pending</th><th>dead</th><th>completion</th>"
            "<th title='held-out accuracy of a classifier telling the samples from real images; 0.5 = indistinguishable'>"
            "two-sample</th><th>… of exemplars</th><th title='fine detail of the samples ÷ real images'>HF</th>"
            "<th>… of exemplars</th><th title='units whose top exemplars are at least half one class: the share whose "
            "samples the network reads as that class (chance in brackets)'>labels agree (chance)</th>"
            "<th title='how often an observer shown the images picks the held-out image the unit prefers (0.5 = chance): "
            "final samples / their starts / top exemplars'>informative: samples / starts / exemplars</th></tr>"
            f"{''.join(rows)}</table>"
            + (f"<p>{_e(_realism_text(realism, None))}. Two-sample: held-out accuracy of a small CNN telling a layer's "
               "final samples from as many real images (0.5: it cannot; 1.0: always). HF: the samples' fine detail "
               "(image minus its blur) ÷ the real images'. The units' own top real images (exemplars) are the floor "
               "of both: they are real but all of one kind.</p>" if realism else
               "<p class='muted'>realism not measured (the sweep has no real data, or it ran with --no-realism)</p>") +
            f"<h2>Integrity</h2><p>{_e(_integrity_text(st))}</p>"
            "<h2>Find units</h2><p class='controls'><input id='search' type='search' size='40' autocomplete='off' "
            "placeholder='a label, a layer, a unit, dead, low-realism …' aria-label='search units'> <span id='found'></span></p>"
            "<p class='muted'>Words must all match: a label (its top exemplars' class, else the network's reading of "
            "its samples), a flag (dead, corrupt, failed, pending, low-realism, saturated-chains, frozen-chains), a "
            "layer name or part of one, a unit number; or layer:NAME, unit:N, label:X, is:FLAG.</p>"
            "<table id='results'></table>"
            f"<script src='data/search.js'></script><script>{ESC_JS}{SEARCH_JS % SEARCH_LIMIT}</script>"
            f"<h2>Realism prior</h2><p>Discriminator: {_e(d_text)}</p>"
            f"<h2>Job settings</h2><pre>{_e(json.dumps(portable(spec, st), indent=2))}</pre>")
    (out / "index.html").write_text(_page(f"atlas {model_name}", body, 0))
