"""The README is short and starts with the two fresh-machine commands; docs/ holds the rest, and every pasted block
is closed and filled (its numbers come from `python -m immunize.readme`, never typed)."""
import re

from conftest import REPO


def _markdown():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 180, f"README has {len(lines)} lines; move detail to docs/"
    head = "\n".join(lines[:20])
    assert "immunize bench" in head and "pytest -q" in head


def test_every_linked_doc_exists():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", text)
    assert links and all((REPO / link).is_file() for link in links), links
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= set(links), "a doc the README does not link"


def test_every_pasted_block_is_closed_filled_and_unique():
    seen = {}
    for path in _markdown():
        text = path.read_text()
        for name in re.findall(r"<!-- BEGIN (\S+) -->", text):
            assert name not in seen, f"block {name} in {path.name} and {seen[name]}"
            seen[name] = path.name
            body = text.split(f"<!-- BEGIN {name} -->", 1)[1]
            assert f"<!-- END {name} -->" in body, f"{path.name}: block {name} is not closed"
            assert body.split(f"<!-- END {name} -->", 1)[0].strip(), f"{path.name}: block {name} is empty"


def test_every_registered_method_has_a_conformance_test_and_a_fidelity_section():
    from immunize.bench.registry import DEFENSES

    fidelity = (REPO / "docs" / "fidelity.md").read_text()
    stems = {"random": "random_perturbation"}
    for defense in DEFENSES:
        if defense.class_path is None:
            continue  # the references without a defense
        test_file = f"test_conformance_{stems.get(defense.name, defense.name)}.py"
        assert (REPO / "tests" / test_file).is_file(), f"{defense.name}: no tests/{test_file}"
        assert test_file in fidelity, f"{defense.name}: docs/fidelity.md has no section naming {test_file}"


def test_a_printed_table_is_pasted_with_where_it_came_from(tmp_path):
    from immunize.readme import main

    doc, table = tmp_path / "doc.md", tmp_path / "table.md"
    doc.write_text("intro\n<!-- BEGIN cov -->\nold\n<!-- END cov -->\nafter\n")
    table.write_text("| case | % |\n|---|---|\n| a | 95.0 |\n")
    main(["--text", str(table), "--command", "python benchmarks/x.py", "--block", "cov", "--readme", str(doc)])
    text = doc.read_text()
    assert "old" not in text and "| a | 95.0 |" in text and text.endswith("<!-- END cov -->\nafter\n")
    assert f"from `{table}` (printed by `python benchmarks/x.py`)" in text


def test_verdicts_paste_the_no_win_check_and_the_fine_tuning_pairs_without_per_seed_values(tmp_path):
    import json

    from immunize.readme import main

    def row(defense, stage, hs, cap, attack=None, vs=None, finetune=None):
        return {"defense": defense, "stage": stage, "attack": attack, "finetune": finetune, "harmful_score": hs,
                "capability": cap, "chance": {"t": 20.0}, "seeds": [0, 1], "vs_reference": vs,
                "seed_values": {"harmful_score": [hs, hs], "capability": [cap, cap]}}

    attack = {"lr": 1e-3, "samples": 200, "mode": "full", "optimizer": "adamw"}
    vs = {"harmful_score": [-60.0, -70.0, -50.0], "capability": [-50.0, -55.0, -45.0],
          "per_seed": {"harmful_score": [-61.0, -59.0], "capability": [-51.0, -49.0]}}
    results = {"reference": "undefended", "defenses": ["undefended", "seam", "other"], "seeds": [0, 1],
               "threshold": 10.0, "window": {"harm": 50.0, "capability_drop": 5.0}, "rows": [
                   row("undefended", "defended", 0.0, 80.0), row("seam", "defended", 0.0, 79.0, vs={}),
                   row("other", "defended", 0.0, 79.0, vs={}),
                   row("undefended", "attack", 70.0, 78.0, attack), row("seam", "attack", 5.0, 25.0, attack, vs),
                   row("other", "attack", 5.0, 25.0, attack, vs)],
               "pairs": [{"a": "seam", "b": "x", "stage": "finetune", "finetune": {"ratio": 0.1}, "attack": None,
                          "harmful_score": [-3.0, -5.0, -1.0], "capability": [0.5, -1.0, 2.0]}]}
    path, doc = tmp_path / "results.json", tmp_path / "doc.md"
    path.write_text(json.dumps(results))
    doc.write_text("<!-- BEGIN v -->\n<!-- END v -->\n")
    main(["--verdicts", "--results", str(path), "--defenses", "seam", "--block", "v", "--readme", str(doc)])
    text = doc.read_text()
    seam = next(line for line in text.splitlines() if line.startswith("| seam |"))
    assert "-60.0 [-70.0, -50.0]" in seam and "(-61.0" not in seam and seam.endswith("| lr=1e-3 |")  # no-win here
    assert "| other |" not in text and "| undefended |" not in text
    assert "| seam | x | 0.1 | -3.0 [-5.0, -1.0] | +0.5 [-1.0, +2.0] |" in text
    main(["--verdicts", "--results", str(path), "--columns", "lr=1e-3 Δcap", "--ratios", "0.3", "--block", "v",
          "--readme", str(doc)])
    text = doc.read_text()
    assert "| defense | attack protocol | lr=1e-3 Δcap | no-win at |" in text and "| seam | x |" not in text
    assert "| undefended |" not in text  # the reference's own rows only when named
    main(["--verdicts", "--results", str(path), "--defenses", "undefended,seam", "--block", "v", "--readme", str(doc)])
    text = doc.read_text()
    assert "| undefended |" in text and "(reference)" in text and "| other |" not in text
