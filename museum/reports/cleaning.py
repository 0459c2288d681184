"""The pages of `museum clean` (label issues) and `museum dedup` (duplicate groups).

Built from the report helpers in `museum.reports.html`; thumbnails travel inside the page
(`museum.reports.thumbs`), so a page opens from a copied folder with no network.
"""

from __future__ import annotations

from pathlib import Path

from museum.reports import html
from museum.reports.thumbs import thumbnail_tag

MAX_TEXT = 300  # characters of a description shown in a cell


def _raw_table(header: list[str], rows: list[list[str]]) -> str:
    """A table whose cells are already HTML (thumbnails); callers escape text themselves."""
    head = "".join(f"<th>{html.esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(text: str) -> str:
    return html.esc(text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…")


def clean_page(path: Path, items, oof, issues: list[dict], pairs: list[dict], top: int) -> Path:
    """label_issues.html: headline numbers, confused class pairs, then the `top` least trustworthy labels."""
    scored = int(oof.scored.sum())
    headline = html.cards({"rows": len(items.ids), "scored": scored, "flagged": len(issues),
                           "flagged share": round(len(issues) / max(scored, 1), 4)})
    text_expert = oof.meta.get("expert") if "text" in oof.experts else "none (no descriptions)"
    setup = html.key_values({"experts": " + ".join(oof.experts), "text expert": text_expert,
                             "folds": oof.meta.get("folds"), "seed": oof.meta.get("seed")})
    pair_rows = [[p["class_a"], p["class_b"], p["flagged_a_to_b"], p["flagged_b_to_a"], p["overlap_rows"], p["joint"]]
                 for p in pairs[:25]]
    pair_part = (html.table(["class A", "class B", "flagged A→B", "flagged B→A", "overlap rows (est.)", "joint"], pair_rows)
                 if pair_rows else html.note("No class pair trades labels."))
    with_images = items.paths is not None
    with_text = items.texts is not None
    header = ["#", "id"] + (["image"] if with_images else []) + (["description"] if with_text else []) + \
        ["given", "suggested", "score", "p(suggested)"]
    rows = []
    for rank, d in enumerate(issues[:top], 1):
        i = d["index"]
        row = [str(rank), html.esc(items.ids[i])]
        if with_images:
            row.append(thumbnail_tag(items.paths[i], items.ids[i]))
        if with_text:
            row.append(_short(items.texts[i]) or '<span class="muted">(empty)</span>')
        row += [html.esc(d["given"]), f"<b>{html.esc(d['suggested'])}</b>", f"{d['score']:.3f}", f"{d['p_suggested']:.3f}"]
        rows.append(row)
    items_part = _raw_table(header, rows) if rows else html.note("No label issue found.")
    explain = html.note("Score = out-of-fold probability of the given label (lower = less trustworthy). "
                        "Flagged by confident learning (cleanlab); check them before dropping or relabelling.")
    sections = [html.section("Summary", headline, setup),
                html.section("Systematically confused classes", pair_part),
                html.section(f"Top {min(top, len(issues))} likely label errors", explain, items_part)]
    return html.write_page(path, html.page("Label issues", str(items.source), sections))


def dedup_page(path: Path, source, groups: list[dict], names: list[str], paths, labels, texts, top: int) -> Path:
    """dedup.html: counts by kind, then each group's members side by side (thumbnail, label, description)."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g["kind"]] = counts.get(g["kind"], 0) + 1
    headline = html.cards({"items": len(names), "groups": len(groups), **{f"{k} groups": n for k, n in sorted(counts.items())},
                           "conflicting labels": sum(1 for g in groups if g["conflicting"])})
    rows = []
    for g in groups[:top]:
        members = []
        for i in g["members"]:
            parts = []
            if paths is not None and paths[i] is not None:
                parts.append(thumbnail_tag(paths[i], names[i]))
            parts.append(f'<div class="muted">{html.esc(names[i])}</div>')
            if labels is not None:
                parts.append(f"<div>{html.esc(labels[i])}</div>")
            if texts is not None and g["kind"] == "text":
                parts.append(f"<div>{_short(texts[i])}</div>")
            members.append(f'<div style="display:inline-block;vertical-align:top;margin:0 0.6em 0.4em 0;max-width:14em">'
                           f'{"".join(parts)}</div>')
        flag = "<b>conflicting labels</b>" if g["conflicting"] else ""
        rows.append([str(g["group"]), html.esc(g["kind"]), f"{g['similarity']:.3f}", flag, "".join(members)])
    body = (_raw_table(["group", "kind", "min. similarity", "", "members"], rows) if rows
            else html.note("No duplicates found."))
    sections = [html.section("Summary", headline), html.section(f"Groups (first {min(top, len(groups))})", body)]
    return html.write_page(path, html.page("Duplicates", str(source), sections))
