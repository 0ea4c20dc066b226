"""How the tests are laid out: shared builders live in tests/helpers (fixtures in conftest.py), not in test modules."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# An import of a test module, also in the code strings that tests run in fresh processes.
TEST_MODULE_IMPORT = re.compile(
    r"^[ \t]*(from\s+tests\.test_\w+\s+import|import\s+tests\.test_|from\s+tests\s+import\s+test_)", re.MULTILINE
)


def test_no_test_or_bench_module_imports_a_test_module():
    offenders = []
    for path in sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]):
        text = path.read_text()
        for match in TEST_MODULE_IMPORT.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {match.group().strip()}")
    assert not offenders, "move what these import into tests/helpers and import it from there:\n" + "\n".join(offenders)
