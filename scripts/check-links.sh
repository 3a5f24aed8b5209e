#!/usr/bin/env bash
# Every relative link in the repository's Markdown files resolves inside the
# repository: the file exists and, for `file#anchor`, so does the heading.
# External links (http://, https://, mailto:) are not fetched. Exit 1 with a
# line per broken link.
set -euo pipefail
cd "$(dirname "$0")/.."
git ls-files -z '*.md' | python3 -c '
import os, re, sys

root = os.path.realpath(".")
files = [f for f in sys.stdin.read().split("\0") if f]
link = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
fence = re.compile(r"^\s*(```|~~~)")

def slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"[`*_]", "", s)
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")

anchors = {}
def anchors_of(path):
    if path not in anchors:
        found, seen, inside = set(), {}, False
        with open(path, encoding="utf-8") as f:
            for line in f:
                if fence.match(line):
                    inside = not inside
                    continue
                m = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
                if m:
                    base = slug(m.group(1))
                    n = seen.get(base, 0)
                    seen[base] = n + 1
                    found.add(base if n == 0 else f"{base}-{n}")
        anchors[path] = found
    return anchors[path]

bad = 0
for md in files:
    inside = False
    with open(md, encoding="utf-8") as f:
        lines = f.readlines()
    for no, line in enumerate(lines, 1):
        if fence.match(line):
            inside = not inside
            continue
        if inside:
            continue
        for target in link.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
            real = os.path.realpath(dest)
            problem = None
            if not (real == root or real.startswith(root + os.sep)):
                problem = "points outside the repository"
            elif not os.path.exists(dest):
                problem = "no such file"
            elif anchor and dest.endswith(".md") and anchor not in anchors_of(dest):
                problem = f"no heading for #{anchor} in {dest}"
            if problem:
                print(f"{md}:{no}: {target}: {problem}")
                bad += 1
sys.exit(1 if bad else 0)
'
