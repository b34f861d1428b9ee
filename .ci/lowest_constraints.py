"""Print a pip constraints file that pins every direct dependency in
setup.py's ``install_requires`` to its declared floor (``twisted[tls]>=26.4``
→ ``twisted==26.4``).  setup.py stays the one place the floors are written;
``.ci/lowest`` installs the package under these constraints and runs the
suite, so a floor that does not work fails CI."""

import ast
import os
import re
import sys

REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(?:,[^;]*)?(?:;.*)?$")


def install_requires(setup_py: str) -> list[str]:
    with open(setup_py, encoding="utf-8") as f:
        tree = ast.parse(f.read(), setup_py)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return ast.literal_eval(node.value)
    raise SystemExit(f"{setup_py}: no install_requires")


def floors(requirements: list[str]) -> list[str]:
    out = []
    for req in requirements:
        m = REQ.match(req)
        if not m:
            raise SystemExit(f"setup.py: {req!r} declares no lower bound (NAME>=VERSION)")
        out.append(f"{m.group(1)}=={m.group(2)}")
    return out


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "setup.py")
    print("\n".join(floors(install_requires(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
