"""Summarize a mutmut run: the score over non-message mutants, per file.

Run from the directory mutmut ran in (it reads ``mutants/**/*.py.meta`` and the
mutated sources beside them)::

    python tools/mutation_score.py [--survivors]

A *message mutant* changes nothing but the text of a human-readable string
literal (one with whitespace in it, or an f-string): an error or refusal
message, a log line. Tests that pin every message's wording would be brittle,
so these are counted apart. Every other mutant counts, including those no
selected test reaches ("no tests"), which count as not killed. Timeouts count
as killed (the mutant changed behaviour enough to hang a test).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import json
import sys
import tokenize
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 36, 24, -24, 152, 255, 37}
"""mutmut 3 exit codes that mean the mutant was detected."""
NO_TESTS = {33, 5}


def _functions(source: str) -> dict[str, str]:
    tree = ast.parse(source)
    lines = source.splitlines()
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            indent = len(text) - len(text.lstrip())
            out[node.name] = "\n".join(line[indent:] for line in text.splitlines())
    return out


def _tokens(source: str) -> list[tuple[int, str]]:
    body = source.split(":", 1)[1] if source.lstrip().startswith("def ") else source
    toks = tokenize.generate_tokens(io.StringIO(body).readline)
    return [(t.type, t.string) for t in toks
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
                              tokenize.INDENT, tokenize.DEDENT)]


def _human_text(token: str) -> bool:
    prefix = token[: len(token) - len(token.lstrip("rbfuRBFU"))].lower()
    return "f" in prefix or any(ch.isspace() for ch in token[len(prefix):][1:-1])


def is_message_mutant(original: str, mutant: str) -> bool:
    """Whether ``mutant`` differs from ``original`` only in human-readable string text."""
    try:
        a, b = _tokens(original), _tokens(mutant)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    changed = False
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        changed = True
        if tag != "replace" or (i2 - i1) != (j2 - j1):
            return False
        for (ta, sa), (tb, _sb) in zip(a[i1:i2], b[j1:j2], strict=True):
            if ta != tokenize.STRING or tb != tokenize.STRING or not _human_text(sa):
                return False
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list surviving mutants")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    args = parser.parse_args(argv)
    rows = {}
    survivors: list[str] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        functions = _functions(meta.with_suffix("").read_text())
        counts: Counter[str] = Counter()
        for key, code in exit_codes.items():
            name = key.rsplit(".", 1)[1]
            original = functions.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
            mutated = functions.get(name)
            message = (original is not None and mutated is not None
                       and is_message_mutant(original, mutated))
            kind = "message" if message else "real"
            status = ("killed" if code in KILLED else "no_tests" if code in NO_TESTS
                      else "unchecked" if code is None else "survived")
            counts[f"{kind}_{status}"] += 1
            if kind == "real" and status in ("survived", "no_tests"):
                survivors.append(f"{status:9} {key}")
        path = str(meta.relative_to("mutants"))[: -len(".meta")]
        rows[path] = counts
    total: Counter[str] = Counter()
    print(f"{'file':44} {'mutants':>7} {'message':>7} {'counted':>7} {'killed':>6} "
          f"{'survived':>8} {'no tests':>8} {'score':>6}")
    summary = {}
    for path, counts in [*rows.items(), ("total", None)]:
        if counts is None:
            counts = total
        else:
            total.update(counts)
        message = sum(v for k, v in counts.items() if k.startswith("message_"))
        counted = sum(v for k, v in counts.items() if k.startswith("real_"))
        killed = counts["real_killed"]
        score = killed / counted if counted else 1.0
        summary[path] = {"mutants": message + counted, "message": message, "counted": counted,
                         "killed": killed, "survived": counts["real_survived"],
                         "no_tests": counts["real_no_tests"],
                         "unchecked": counts["real_unchecked"], "score": round(score, 4)}
        print(f"{path:44} {message + counted:7d} {message:7d} {counted:7d} {killed:6d} "
              f"{counts['real_survived']:8d} {counts['real_no_tests']:8d} {score:6.1%}")
    if args.survivors:
        print("\n".join(["", "surviving non-message mutants:", *survivors]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
