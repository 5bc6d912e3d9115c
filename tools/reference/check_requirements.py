#!/usr/bin/env python3
"""The pins of tools/reference/requirements*.txt must resolve (issue 24 item 7: requirements.txt
pinned tokenizers==0.23.3 beside transformers==4.57.1, which requires tokenizers<=0.23.0, so
`make refenv` failed on every fresh machine).

Two checks:

  check_requirements.py resolve [FILE...]   (make check-refenv; needs PyPI)
      For each requirements file, a fresh virtual environment runs
      `pip install --dry-run --ignore-installed --report` on it: pip's resolver must accept the
      pins. Nothing is installed. pip fetches only package metadata where the index serves it
      separately (PEP 658, as pypi.org does); an index that does not makes pip download whole
      wheels (torch + its CUDA wheels: ~3 GB), which is why this is not part of `make test`.
      With --write-lock, the resolved sets are written to requirements.lock.json.

  check_requirements.py lock [FILE...]      (make check-refenv-lock, part of `make test`;
                                             offline, standard library + pip's vendored
                                             `packaging`, about a second)
      requirements.lock.json, the set `resolve --write-lock` found, is checked against the
      requirements files and against itself: every pin of a file is the locked version; every
      dependency (Requires-Dist, markers evaluated for the lock's recorded environment and the
      requested extras) of every locked package is satisfied by the locked version of that
      dependency. Either the pins or the lock being edited inconsistently fails it.

FILE defaults to the environments the reference scripts use: requirements.txt (which includes
requirements-masks.txt), requirements-tf5.txt and requirements-eval.txt.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LOCK = os.path.join(HERE, "requirements.lock.json")
DEFAULT_FILES = ["requirements.txt", "requirements-tf5.txt", "requirements-eval.txt"]


def packaging():
    try:
        from packaging.markers import Marker  # noqa: F401
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
        from pip._vendor.packaging.version import Version
    return Requirement, canonicalize_name, Version


def pins(path):
    """The requirement lines of a file and the files it includes (-r)."""
    out = []
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"^(-r|--requirement)\s+(\S+)$", line)
            if m:
                out += pins(os.path.join(os.path.dirname(path), m.group(2)))
            elif line.startswith("-"):
                sys.exit(f"{path}: option line not understood by this check: {line}")
            else:
                out.append((os.path.basename(path), line))
    return out


def resolve(files, write_lock):
    lock = {}
    failed = []
    for name in files:
        path = os.path.join(HERE, name)
        with tempfile.TemporaryDirectory(prefix="refenv-check-") as tmp:
            venv = os.path.join(tmp, "venv")
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            pip = [os.path.join(venv, "bin", "python"), "-m", "pip", "--disable-pip-version-check"]
            report = os.path.join(tmp, "report.json")
            print(f"== {name}: pip install --dry-run (fresh venv, {sys.version.split()[0]})", flush=True)
            r = subprocess.run(pip + ["install", "--dry-run", "--ignore-installed", "--quiet",
                                      "--report", report, "-r", path],
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stdout + r.stderr)
                print(f"FAIL {name}: pip cannot resolve its pins", flush=True)
                failed.append(name)
                continue
            with open(report) as f:
                rep = json.load(f)
        pkgs = {}
        for item in rep["install"]:
            md = item["metadata"]
            pkgs[md["name"]] = {
                "version": md["version"],
                "requires_dist": md.get("requires_dist", []),
                "requires_python": md.get("requires_python"),
                "extras": item.get("requested_extras") or [],
            }
        lock[name] = {"pip": rep["pip_version"], "environment": rep["environment"],
                      "packages": dict(sorted(pkgs.items(), key=lambda kv: kv[0].lower()))}
        print(f"ok {name}: {len(pkgs)} packages", flush=True)
    if write_lock and not failed:
        with open(LOCK, "w") as f:
            json.dump(lock, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {LOCK}")
    return not failed


def check_lock(files, lock_path):
    Requirement, canon, Version = packaging()
    with open(lock_path) as f:
        lock = json.load(f)
    problems = []
    for name in files:
        path = os.path.join(HERE, name) if not os.path.isabs(name) else name
        section = lock.get(os.path.basename(name))
        if section is None:
            problems.append(f"{name}: no section in {os.path.basename(lock_path)} (run make refenv-lock)")
            continue
        env = dict(section["environment"])
        pkgs = {canon(k): v for k, v in section["packages"].items()}
        for src, line in pins(path):
            req = Requirement(line)
            if req.marker and not req.marker.evaluate(env):
                continue
            got = pkgs.get(canon(req.name))
            if got is None:
                problems.append(f"{src}: {line}: not in the lock")
            elif not req.specifier.contains(Version(got["version"]), prereleases=True):
                problems.append(f"{src}: {line}: the lock resolved {req.name}=={got['version']}")
        for pname, p in pkgs.items():
            for dep in p["requires_dist"]:
                req = Requirement(dep)
                if req.marker:
                    extras = p["extras"] or [""]
                    if not any(req.marker.evaluate(dict(env, extra=e)) for e in extras):
                        continue
                got = pkgs.get(canon(req.name))
                if got is None:
                    problems.append(f"{name}: {pname} {p['version']} requires {dep}: not in the lock")
                elif not req.specifier.contains(Version(got["version"]), prereleases=True):
                    problems.append(f"{name}: {pname} {p['version']} requires {dep}, "
                                    f"the lock has {req.name}=={got['version']}")
    for p in problems:
        print("FAIL", p)
    if not problems:
        print(f"ok: {', '.join(os.path.basename(f) for f in files)} consistent with "
              f"{os.path.basename(lock_path)}")
    return not problems


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["resolve", "lock"])
    ap.add_argument("files", nargs="*", help="requirements files (relative to tools/reference)")
    ap.add_argument("--write-lock", action="store_true", help="resolve: write requirements.lock.json")
    ap.add_argument("--lock", default=LOCK, help="lock: the lock file to check")
    a = ap.parse_intermixed_args()
    files = a.files or DEFAULT_FILES
    ok = resolve(files, a.write_lock) if a.mode == "resolve" else check_lock(files, a.lock)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
