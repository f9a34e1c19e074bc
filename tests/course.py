"""The course kit: the hand-out copy, a score per exercise, and a check that the graders reject wrong answers.

    python -m tests.course student OUT                 # hand-out copy: every solution replaced by a stub
    python -m tests.course grade [DIR] [--exercise N] [--json FILE]
    python -m tests.course check-graders [--jobs 2]    # every wrong answer in tests/wrong_answers fails

Solutions sit between `# BEGIN SOLUTION N` and `# END SOLUTION N` lines in SOURCES (exercise 5's lines sit
inside exercises 3, 4 and 6). Graders are the tests marked `exN` (pytest.ini); grading runs the graders of this
tree's tests/ on the *.py files of DIR in one pytest process, so a submission cannot change its graders.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
WRONG = os.path.join(TESTS, "wrong_answers")
SOURCES = ["paths.py", "losses.py", "fid.py"]  # the files with solution markers

# number: (title, the stub's text; points)
EXERCISES = {
    1: ("the Brownian bridge's x_t and target, Eq. (41)", 10),
    2: ("the UM loss, Eq. (3)", 5),
    3: ("the RealUM fake-model loss, Eq. (16)", 15),
    4: ("the RealUID generator loss, Eq. (17)", 10),
    5: ("the gradient cuts of the fake and generator steps, Eqs. (16)-(17)", 10),
    6: ("the general gamma loss, App. A.2 Def. 3", 15),
    7: ("the DDIM sampler of VP diffusion, Eq. (1)", 10),
    8: ("the one-step generator G(z) = z - g(z, 1), Sec. 3", 5),
    9: ("TensorFlow 1's bilinear resize for FID", 10),
    10: ("the Frechet distance", 10),
}
MARKER = re.compile(r"^( *)# (BEGIN|END) SOLUTION (\d+)$")
TIMEOUT = 900  # seconds for one grading process (a submission may loop forever)


# ----------------------------------------------------------------------------- markers and the stub
def regions(text):
    """[(exercise, first line, last line, depth)] of the marked regions (0-based, marker lines included)."""
    out, stack = [], []
    for i, line in enumerate(text.split("\n")):
        m = MARKER.match(line.rstrip())
        if not m:
            if "SOLUTION" in line and re.search(r"#\s*(BEGIN|END)\s+SOLUTION", line):
                raise ValueError(f"line {i + 1}: malformed marker {line.strip()!r}")
            continue
        n = int(m.group(3))
        if n not in EXERCISES:
            raise ValueError(f"line {i + 1}: no exercise {n}")
        if m.group(2) == "BEGIN":
            stack.append((n, i, m.group(1)))
        else:
            if not stack or stack[-1][0] != n or stack[-1][2] != m.group(1):
                raise ValueError(f"line {i + 1}: END SOLUTION {n} without its BEGIN at the same indentation")
            n, first, _ = stack.pop()
            out.append((n, first, i, len(stack)))
    if stack:
        raise ValueError(f"line {stack[-1][1] + 1}: BEGIN SOLUTION {stack[-1][0]} is never closed")
    return sorted(out, key=lambda r: r[1])


def stub(n, indent):
    return f'{indent}raise NotImplementedError("Exercise {n}: {EXERCISES[n][0]}")'


def strip(text, exercises):
    """text with the body of every region of the given exercises replaced by the stub (the outermost wins)."""
    lines, out, skip_to = text.split("\n"), [], -1
    starts = {first: (n, last) for n, first, last, _ in regions(text) if n in exercises}
    for i, line in enumerate(lines):
        if i <= skip_to:
            continue
        if i in starts:
            n, last = starts[i]
            out += [line, stub(n, MARKER.match(line).group(1)), lines[last]]
            skip_to = last
        else:
            out.append(line)
    return "\n".join(out)


def outside(text):
    """The lines outside every region's body (to compare two versions of a file)."""
    lines, inside = text.split("\n"), set()
    for _, first, last, _ in regions(text):
        inside.update(range(first + 1, last))
    return [line for i, line in enumerate(lines) if i not in inside]


# ----------------------------------------------------------------------------- grading
def workspace(src, dst):
    """dst: the top-level *.py files of src (the submission) with this tree's tests/ and pytest.ini (the graders)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".py") and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), dst)
    shutil.copy2(os.path.join(ROOT, "pytest.ini"), dst)
    shutil.copytree(TESTS, os.path.join(dst, "tests"), ignore=shutil.ignore_patterns("__pycache__", "wrong_answers"))


def grader_modules():
    """The test files that hold graders (collecting the others would only import the entry scripts)."""
    out = []
    for name in sorted(os.listdir(TESTS)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(TESTS, name)) as f:
                if re.search(r"pytest\.mark\.ex\d+", f.read()):
                    out.append(f"tests/{name}")
    return out


def run_graders(directory, exercises):
    """One pytest process over the graders of `exercises` in `directory` (a workspace).
    Returns {nodeid: (exercise, passed, message)} and the collection errors."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ, PYTHONPATH=directory, COURSE_RESULTS=out)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.course", "--tb=short",
           "-m", " or ".join(f"ex{n}" for n in exercises), *grader_modules()]
    try:
        proc = subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        with open(out) as f:
            result = json.load(f)
    except subprocess.TimeoutExpired:
        result = {"tests": {}, "errors": [f"grading stopped after {TIMEOUT} s (an endless loop?)"]}
    except (OSError, ValueError):
        result = {"tests": {}, "errors": [f"pytest did not finish:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"]}
    finally:
        os.remove(out)
    return result


def expected_graders(exercises):
    """{nodeid: exercise} of this tree's graders (only needed when a submission's test module fails to import)."""
    with tempfile.TemporaryDirectory() as tmp:
        workspace(ROOT, tmp)
        env = dict(os.environ, PYTHONPATH=tmp, COURSE_RESULTS=os.path.join(tmp, "collected.json"))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.course",
                        "--collect-only", "-m", " or ".join(f"ex{n}" for n in exercises), *grader_modules()],
                       cwd=tmp, env=env, capture_output=True, timeout=TIMEOUT)
        with open(env["COURSE_RESULTS"]) as f:
            return {k: v[0] for k, v in json.load(f)["tests"].items()}


def grade(directory, exercises=tuple(EXERCISES)):
    """{exercise: {"title", "points", "passed", "total", "score", "failures": [(nodeid, message)]}}."""
    with tempfile.TemporaryDirectory() as tmp:
        workspace(directory, tmp)
        result = run_graders(tmp, exercises)
    tests = {k: tuple(v) for k, v in result["tests"].items()}
    if result["errors"]:  # a test module did not import: its graders count as failed
        message = "\n".join(result["errors"])
        for nodeid, n in expected_graders(exercises).items():
            tests.setdefault(nodeid, (n, False, message))
    report = {}
    for n in exercises:
        mine = [(k, ok, msg) for k, (m, ok, msg) in sorted(tests.items()) if m == n]
        passed, title, points = sum(ok for _, ok, _ in mine), *EXERCISES[n]
        report[n] = dict(title=title, points=points, passed=passed, total=len(mine),
                         score=round(points * passed / len(mine), 2) if mine else 0.0,
                         failures=[(k, msg) for k, ok, msg in mine if not ok])
    return report


def table(report):
    w = max(len(r["title"]) for r in report.values())
    rows = [f"{'ex':>3}  {'title':<{w}} {'points':>6} {'passed':>7} {'score':>6}"]
    for n, r in report.items():
        rows.append(f"{n:>3}  {r['title']:<{w}} {r['points']:>6} {r['passed']:>3}/{r['total']:<3} {r['score']:>6.1f}")
    total, points = sum(r["score"] for r in report.values()), sum(r["points"] for r in report.values())
    passed, count = sum(r["passed"] for r in report.values()), sum(r["total"] for r in report.values())
    rows.append(f"{'':>3}  {'total':<{w}} {points:>6} {passed:>3}/{count:<3} {total:>6.1f}")
    rows.append(f"score: {total:g} of {points} points")
    return "\n".join(rows)


def gradescope(report):
    """The Gradescope autograder results.json: {"score", "tests": [{name, score, max_score, output}]}."""
    tests = [{"name": f"Exercise {n}: {r['title']}", "score": r["score"], "max_score": r["points"],
              "output": f"{r['passed']} of {r['total']} graders passed" + "".join(
                  f"\n\nFAILED {k}\n{msg}" for k, msg in r["failures"])} for n, r in report.items()]
    return {"score": round(sum(t["score"] for t in tests), 2), "tests": tests}


def write_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the hand-out copy
def tracked_files(root):
    """The repository's files (git ls-files), or every file but caches and outputs outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache", "runs", "data", "cache", "gpu"}
        files = [os.path.relpath(os.path.join(d, f), root) for d, dirs, names in os.walk(root)
                 for f in names if not dirs.__setitem__(slice(None), [x for x in dirs if x not in skip])]
    wrong = os.path.relpath(WRONG, root) + os.sep
    return sorted(f for f in files if not f.startswith(wrong) and os.path.isfile(os.path.join(root, f)))


def make_copy(root, out, exercises):
    for rel in tracked_files(root):
        os.makedirs(os.path.dirname(os.path.join(out, rel)) or out, exist_ok=True)
        if rel in SOURCES:
            with open(os.path.join(root, rel)) as f:
                text = f.read()
            with open(os.path.join(out, rel), "w") as f:
                f.write(strip(text, exercises))
        else:
            shutil.copy2(os.path.join(root, rel), os.path.join(out, rel))


def stub_failures(report):
    """Graders that failed for another reason than their own exercise's stub (or an enclosing one's)."""
    bad = []
    for n, r in report.items():
        own = {n} | enclosing(n)
        bad += [(n, k) for k, msg in r["failures"] if not any(f"Exercise {m}: " in msg for m in own)]
        if r["passed"]:
            bad.append((n, f"{r['passed']} grader(s) pass on the stub"))
    return bad


def enclosing(n):
    """Exercises whose regions contain one of exercise n's regions."""
    out = set()
    for name in SOURCES:
        with open(os.path.join(ROOT, name)) as f:
            rs = regions(f.read())
        out |= {m for m, first, last, _ in rs for k, a, b, _ in rs if k == n != m and first < a and b < last}
    return out


def student(out):
    if os.path.exists(out):
        sys.exit(f"{out} exists: give a new folder for the hand-out copy")
    print("grading the solution (every grader must pass) ...", flush=True)
    solution = grade(ROOT)
    if any(r["passed"] < r["total"] or not r["total"] for r in solution.values()):
        print(table(solution))
        sys.exit("the solution does not pass every grader: no copy written")
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".handout-", dir=parent)
    try:
        make_copy(ROOT, tmp, set(EXERCISES))
        print("grading the stubs (every grader must fail on its own exercise's stub) ...", flush=True)
        stubs = grade(tmp)
        bad = stub_failures(stubs)
        if bad:
            print(table(stubs))
            sys.exit("graders that do not fail on their exercise's stub:\n" + "\n".join(f"  {n}: {k}" for n, k in bad))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the hand-out copy to {out}: {sum(r['total'] for r in stubs.values())} graders, "
          f"{sum(r['points'] for r in stubs.values())} points, all stubs")


# ----------------------------------------------------------------------------- wrong answers
def wrong_answers():
    """[(exercise, mistake, [(file, old, new)])] from tests/wrong_answers/exNN.txt.
    A block: '## <mistake>', then hunks '--- <file>', '-' lines to replace, '+' lines replacing them."""
    out = []
    for name in sorted(os.listdir(WRONG)):
        m = re.fullmatch(r"ex(\d+)\.txt", name)
        if not m:
            continue
        n, hunk = int(m.group(1)), None
        with open(os.path.join(WRONG, name)) as f:
            for line in f.read().split("\n"):
                if line.startswith("## "):
                    out.append((n, line[3:].strip(), []))
                elif line.startswith("--- "):
                    hunk = [line[4:].strip(), [], []]
                    out[-1][2].append(hunk)
                elif line.startswith(("-", "+")) and hunk is not None:
                    hunk[1 if line[0] == "-" else 2].append(line[1:])
                elif line.strip() and not line.startswith("#"):
                    raise ValueError(f"{name}: cannot read {line!r}")
    return [(n, mistake, [(f, "\n".join(a), "\n".join(b)) for f, a, b in hunks]) for n, mistake, hunks in out]


def apply_patch(directory, n, hunks):
    """Apply the hunks; each one's old lines must occur once, inside a region of exercise n or of one enclosing
    it (exercise 5's lines sit inside 3, 4 and 6)."""
    for name, old, new in hunks:
        path = os.path.join(directory, name)
        with open(path) as f:
            text = f.read()
        if text.count(old) != 1:
            raise ValueError(f"{name}: the lines to replace occur {text.count(old)} times:\n{old}")
        start = text[:text.index(old)].count("\n")
        end = start + old.count("\n")
        if not any(m in {n} | enclosing(n) and a < start and end < b for m, a, b, _ in regions(text)):
            raise ValueError(f"{name}: the wrong answer to exercise {n} is not inside its markers:\n{old}")
        with open(path, "w") as f:
            f.write(text.replace(old, new))


def check_one(item):
    n, mistake, hunks = item
    with tempfile.TemporaryDirectory() as tmp:
        workspace(ROOT, tmp)
        apply_patch(tmp, n, hunks)
        result = run_graders(tmp, [n])
    failing = sorted(k.split("::")[-1] for k, (m, ok, _) in result["tests"].items() if m == n and not ok)
    total = sum(m == n for m, _, _ in result["tests"].values())
    return n, mistake, failing, total, result["errors"]


def check_graders(jobs, exercises=None):
    items = [w for w in wrong_answers() if not exercises or w[0] in exercises]
    print(f"grading the solution, then {len(items)} wrong answers ({jobs} at a time) ...", flush=True)
    solution = grade(ROOT)
    if any(r["passed"] < r["total"] for r in solution.values()):
        print(table(solution))
        sys.exit("the solution itself does not pass every grader")
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(check_one, items))
    print(f"\n| exercise | mistake | graders failing |\n|---|---|---|")
    caught = 0
    for n, mistake, failing, total, errors in results:
        names = ", ".join(failing) if failing else ("collection error" if errors else "NONE: the wrong answer passes")
        print(f"| {n} | {mistake} | {len(failing)}/{total}: {names} |")
        caught += bool(failing) or bool(errors)
    print(f"\n{caught} of {len(results)} wrong answers fail their exercise's graders")
    if caught < len(results):
        sys.exit(1)


# ----------------------------------------------------------------------------- pytest plugin (-p tests.course)
_RESULTS = {"tests": {}, "errors": []}


def pytest_collection_modifyitems(items):
    for item in items:
        marks = [int(m.name[2:]) for m in item.iter_markers() if re.fullmatch(r"ex\d+", m.name)]
        if marks:
            _RESULTS["tests"][item.nodeid] = [marks[0], True, ""]


def pytest_collectreport(report):
    if report.failed:
        _RESULTS["errors"].append(f"{report.nodeid}: {report.longreprtext[-3000:]}")


def pytest_runtest_logreport(report):
    entry = _RESULTS["tests"].get(report.nodeid)
    if entry is not None and (report.failed or (report.when == "call" and report.skipped)):
        entry[1], entry[2] = False, entry[2] + report.longreprtext[-3000:]


def pytest_sessionfinish(session):
    path = os.environ.get("COURSE_RESULTS")
    if path:
        with open(path, "w") as f:
            json.dump(_RESULTS, f)


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.course", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("student", help="write the hand-out copy (every solution a stub) to a new folder")
    s.add_argument("out", help="a folder that does not exist yet")
    g = sub.add_parser("grade", help="score each exercise of a copy; exit status 0 only at full marks")
    g.add_argument("dir", nargs="?", default=ROOT, help="the submission (default: this tree)")
    g.add_argument("--exercise", type=int, choices=sorted(EXERCISES), action="append",
                   help="grade only this exercise (repeatable)")
    g.add_argument("--json", help="also write the result as Gradescope's results.json to this file")
    c = sub.add_parser("check-graders", help="show that every wrong answer in tests/wrong_answers fails its graders")
    c.add_argument("--jobs", type=int, default=2, help="grading processes at a time")
    c.add_argument("--exercise", type=int, choices=sorted(EXERCISES), action="append",
                   help="only this exercise's wrong answers (repeatable)")
    args = p.parse_args(argv)
    if args.command == "student":
        student(args.out)
    elif args.command == "grade":
        if not os.path.isdir(args.dir):
            sys.exit(f"{args.dir}: no such folder")
        report = grade(os.path.abspath(args.dir), args.exercise or tuple(EXERCISES))
        print(table(report))
        if args.json:
            write_atomic(args.json, json.dumps(gradescope(report), indent=2) + "\n")
        sys.exit(0 if all(r["total"] and r["passed"] == r["total"] for r in report.values()) else 1)
    else:
        check_graders(args.jobs, args.exercise)


if __name__ == "__main__":
    main()
