"""The cleaning report: what each step removed, per source, as the manifest, `metrics.json`, the log line and the
model card show it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STEPS = ("exact", "near", "contaminated")


@dataclass
class CleanReport:
    """What cleaning removed, per source and step: `sources[name][step]` holds `documents` and `words` removed
    (plus `tokens` when the recipe counted them), `sources[name]` the totals seen and `kept`; `examples` a few
    removed documents with the copy they repeat (or the held-out set they share an n-gram with)."""

    settings: dict[str, Any]
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    held_out: dict[str, dict[str, int]] = field(default_factory=dict)
    index_bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def source(self, name: str) -> dict[str, Any]:
        if name not in self.sources:
            self.sources[name] = {"documents": 0, "words": 0, "kept": {"documents": 0, "words": 0},
                                  **{s: {"documents": 0, "words": 0} for s in STEPS}}
            self.sources[name]["exact"]["across_sources"] = 0
            self.sources[name]["near"]["across_sources"] = 0
            self.sources[name]["contaminated"]["by_set"] = {}
        return self.sources[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with `fraction_documents` / `fraction_words` / `fraction_tokens` of every step."""
        sources = {}
        for name, s in self.sources.items():
            out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}
            for step in (*STEPS, "kept"):
                d = out[step]
                d["fraction_documents"] = d["documents"] / max(s["documents"], 1)
                d["fraction_words"] = d["words"] / max(s["words"], 1)
                if "tokens" in d and s.get("tokens"):
                    d["fraction_tokens"] = d["tokens"] / s["tokens"]
            sources[name] = out
        return {"settings": dict(self.settings), "sources": sources, "held_out": dict(self.held_out),
                "examples": list(self.examples), "index_bytes": dict(self.index_bytes), "seconds": self.seconds}


def summary_line(report: Mapping[str, Any]) -> str:
    """One line for the log and the CLI: per source, documents (and tokens) removed by each step."""
    drop = report["settings"].get("decontaminate") == "drop"
    parts = []
    for name, s in report["sources"].items():
        steps = []
        for step in STEPS:
            d = s[step]
            on = report["settings"].get("decontaminate") != "off" if step == "contaminated" else \
                report["settings"].get(step)
            if not on:
                continue
            label = step if step != "contaminated" else ("contaminated (dropped)" if drop else
                                                         "contaminated (kept, report only)")
            tok = f", {d['tokens']:,} tokens" if "tokens" in d else ""
            steps.append(f"{label} {d['documents']:,} docs ({d['fraction_documents']:.1%}{tok})")
        kept = s["kept"]
        tok = f" / {s['tokens']:,} tokens" if s.get("tokens") else ""
        parts.append(f"{name}: {s['documents']:,} docs{tok}; " + ", ".join(steps)
                     + f"; kept {kept['documents']:,} ({kept['fraction_documents']:.1%})")
    return "data cleaning: " + (" | ".join(parts) if parts else "nothing to clean")


def card_line(report: Mapping[str, Any] | None, data_config: Mapping[str, Any] | None = None) -> str | None:
    """The model card's recipe bullet: what cleaning removed per source (documents and tokens), or that it was
    off. `data_config` is the run's `data:` block as a dict (to tell "off" from "not recorded")."""
    if report is None:
        data_config = data_config or {}
        off = data_config.get("dedup") is None and (data_config.get("decontaminate") or {}).get("action") in (
            None, "off", False)
        return "data cleaning: off (no dedup, no decontamination)" if off and data_config else None
    settings = report.get("settings", {})
    how = []
    if settings.get("exact"):
        how.append("exact dedup (normalised text)")
    if settings.get("near"):
        how.append(f"near dedup (MinHash/LSH, Jaccard >= {settings.get('threshold')} over "
                   f"{settings.get('shingle_size')}-word shingles, {settings.get('backend')})")
    if settings.get("decontaminate", "off") != "off":
        sets = ", ".join(f"`{n}`" for n in report.get("held_out", {})) or "none"
        how.append(f"{settings.get('ngram')}-gram decontamination against {sets} ({settings['decontaminate']})")
    per_source = []
    for name, s in report.get("sources", {}).items():
        bits = []
        for step in STEPS:
            d = s.get(step, {})
            if d.get("documents"):
                tok = f", {d['tokens']:,} tokens" if "tokens" in d else ""
                bits.append(f"{step} {d['documents']:,} docs ({d.get('fraction_documents', 0):.1%}{tok})")
        per_source.append(f"{name}: " + (", ".join(bits) if bits else "nothing removed"))
    return ("data cleaning (first copy kept): " + "; ".join(how) + ". Removed: " + "; ".join(per_source)
            + ("" if settings.get("decontaminate") != "report" else " (contaminated documents kept: report only)"))
