"""The course kit (tests/course.py): markers, the hand-out copy, grading, the wrong answers' data.
Cheap checks only; `python -m tests.course check-graders` (a separate CI step) grades every wrong answer, and the
graders themselves run in this suite, so the tree's full marks are the suite's own graders passing."""
import configparser
import json
import os
import re

import pytest

from tests import course


def source(name):
    with open(os.path.join(course.ROOT, name)) as f:
        return f.read()


def test_markers_are_balanced_and_every_exercise_has_a_solution_and_a_registered_marker():
    found = {n for name in course.SOURCES for n, *_ in course.regions(source(name))}
    assert found == set(course.EXERCISES), f"exercises with markers {sorted(found)}, expected all of EXERCISES"
    ini = configparser.ConfigParser()
    ini.read(os.path.join(course.ROOT, "pytest.ini"))
    registered = {int(m) for m in re.findall(r"^\s*ex(\d+):", ini["pytest"]["markers"], re.M)}
    assert registered == set(course.EXERCISES), f"pytest.ini registers ex{sorted(registered)}"


def test_markers_nest_exercise_5_inside_3_4_and_6_only():
    assert {n: course.enclosing(n) for n in course.EXERCISES if course.enclosing(n)} == {5: {3, 4, 6}}


@pytest.mark.parametrize("text, match", [
    ("    # BEGIN SOLUTION 3\n    x = 1\n", "never closed"),
    ("    # BEGIN SOLUTION 3\n    x = 1\n    # END SOLUTION 4\n", "without its BEGIN"),
    ("    # BEGIN SOLUTION 3\n    x = 1\n  # END SOLUTION 3\n", "same indentation"),
    ("    # BEGIN SOLUTION 11\n    # END SOLUTION 11\n", "no exercise 11"),
    ("    # BEGIN  SOLUTION 3\n", "malformed marker")])
def test_regions_rejects_broken_markers(text, match):
    with pytest.raises(ValueError, match=match):
        course.regions(text)


@pytest.mark.parametrize("name", course.SOURCES)
def test_student_copy_differs_from_the_tree_only_inside_markers(name):
    """Outside the regions' bodies the stripped file is the tree's, line for line; each outermost body is one
    line, the stub naming its exercise; the stripped file is valid Python."""
    text = source(name)
    stripped = course.strip(text, set(course.EXERCISES))
    assert course.outside(stripped) == course.outside(text)
    outer = [r for r in course.regions(text) if r[3] == 0]
    bodies = [stripped.split("\n")[first + 1:last] for _, first, last, _ in course.regions(stripped)]
    assert [len(b) for b in bodies] == [1] * len(outer)
    for (n, *_), body in zip(outer, bodies):
        assert body[0].strip() == f'raise NotImplementedError("Exercise {n}: {course.EXERCISES[n][0]}")'
    compile(stripped, name, "exec")


def test_strip_of_one_exercise_keeps_the_others_and_replaces_a_nested_region():
    text = source("losses.py")
    only5 = course.strip(text, {5})
    assert "Exercise 5:" in only5 and "x0_gen = x0_gen.detach()" not in only5
    assert only5.count("# BEGIN SOLUTION 3") == 1 and "Exercise 3:" not in only5


def test_student_copy_scores_zero_and_each_grader_fails_on_its_own_stub(tmp_path):
    """The hand-out copy graded once: 0 points in every exercise, every grader failing on the stub of its
    exercise (or of the exercise enclosing it, for exercise 5), and no exercise without graders."""
    course.make_copy(course.ROOT, str(tmp_path), set(course.EXERCISES))
    assert not os.path.exists(tmp_path / "tests" / "wrong_answers"), "the wrong answers hold solution lines"
    report = course.grade(str(tmp_path))
    assert {n: r["score"] for n, r in report.items()} == {n: 0 for n in course.EXERCISES}
    assert all(r["total"] >= 1 for r in report.values()), {n: r["total"] for n, r in report.items()}
    assert course.stub_failures(report) == []
    assert "score: 0 of 100 points" in course.table(report)


def test_gradescope_json_has_one_entry_per_exercise_with_score_and_max_score():
    report = {1: dict(title="a", points=10, passed=1, total=2, score=5.0, failures=[("t::x", "boom")]),
              2: dict(title="b", points=5, passed=3, total=3, score=5.0, failures=[])}
    out = json.loads(json.dumps(course.gradescope(report)))
    assert out["score"] == 10.0
    assert [set(t) for t in out["tests"]] == [{"name", "score", "max_score", "output"}] * 2
    assert out["tests"][0]["max_score"] == 10 and "FAILED t::x" in out["tests"][0]["output"]


def test_student_refuses_an_existing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit, match="exists"):
        course.main(["student", str(tmp_path)])


def test_wrong_answers_are_at_least_40_each_inside_its_exercise_and_every_exercise_has_some(tmp_path):
    """The data of check-graders: each patch applies once, inside its exercise's markers, and changes the code."""
    if not os.path.isdir(course.WRONG):
        pytest.skip("a hand-out copy: the wrong answers stay with the lecturer")
    items = course.wrong_answers()
    assert len(items) >= 40, len(items)
    assert {n for n, *_ in items} == set(course.EXERCISES)
    for name in course.SOURCES:
        (tmp_path / name).write_text(source(name))
    for n, mistake, hunks in items:
        course.apply_patch(str(tmp_path), n, hunks)  # raises if a hunk is not found once inside exercise n
        for name in course.SOURCES:
            (tmp_path / name).write_text(source(name))
        assert all(old != new for _, old, new in hunks), mistake
