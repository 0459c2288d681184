"""The pages of `museum clean` (label issues) and `museum dedup` (duplicate groups).

Built from the report helpers in `museum.reports.html` and the tables in `templates/cleaning.html`;
thumbnails travel inside the page (`museum.reports.thumbs`), so a page opens from a copied folder
with no network.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from museum.reports import html
from museum.reports.thumbs import thumbnail_tag

MAX_TEXT = 300  # characters of a description shown in a cell, the ellipsis of a longer one included


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
    with_images, with_text = items.paths is not None, items.texts is not None
    rows = [{"id": items.ids[d["index"]], "given": d["given"], "suggested": d["suggested"], "score": d["score"],
             "p_suggested": d["p_suggested"],
             "thumbnail": thumbnail_tag(items.paths[d["index"]], items.ids[d["index"]]) if with_images else None,
             "text": items.texts[d["index"]] if with_text else None} for d in issues[:top]]
    items_part = (html.macros("cleaning.html").issues_table(rows, with_images, with_text, MAX_TEXT) if rows
                  else html.note("No label issue found."))
    explain = html.note("Score = out-of-fold probability of the given label (lower = less trustworthy). "
                        "Flagged by confident learning (cleanlab); check them before dropping or relabelling.")
    sections = [html.section("Summary", headline, setup),
                html.section("Systematically confused classes", pair_part),
                html.section(f"Top {min(top, len(issues))} likely label errors", explain, items_part)]
    return html.write_page(path, html.page("Label issues", str(items.source), sections))


def dedup_page(path: Path, source, groups: list[dict], names: list[str], paths, labels, texts, top: int) -> Path:
    """dedup.html: counts by kind, then each group's members side by side (thumbnail, label, description)."""
    counts = Counter(g["kind"] for g in groups)
    headline = html.cards({"items": len(names), "groups": len(groups), **{f"{k} groups": n for k, n in sorted(counts.items())},
                           "conflicting labels": sum(1 for g in groups if g["conflicting"])})
    shown = [{**g, "members": [
        {"name": names[i], "label": labels[i] if labels is not None else None,
         "thumbnail": thumbnail_tag(paths[i], names[i]) if paths is not None and paths[i] is not None else None,
         "text": texts[i] if texts is not None and g["kind"] == "text" else None} for i in g["members"]]}
        for g in groups[:top]]
    body = html.macros("cleaning.html").groups_table(shown, MAX_TEXT) if shown else html.note("No duplicates found.")
    sections = [html.section("Summary", headline), html.section(f"Groups (first {min(top, len(groups))})", body)]
    return html.write_page(path, html.page("Duplicates", str(source), sections))
