"""Turn trial's closing line into ``N passed, N failed, N skipped``.

trial ends with ``PASSED (skips=2, successes=40)`` or ``FAILED (failures=1,
errors=2, successes=37)``; CI reads the plain form, with ``LABEL:`` before it
when a second argument gives one (``.ci/lowest`` prints ``lowest: …``).  Errors and unexpected
successes count as failed; a log without trial's closing line is one failure.
"""

import re
import sys


def main(path: str, label: str = "") -> int:
    prefix = f"{label}: " if label else ""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        m = re.match(r"^(PASSED|FAILED) \((.*)\)\s*$", line.strip())
        if m:
            counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2)))
            passed = counts.get("successes", 0)
            failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
            skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
            print(f"{prefix}{passed} passed, {failed} failed, {skipped} skipped")
            return 0 if failed == 0 and m.group(1) == "PASSED" else 1
    print(f"{prefix}0 passed, 1 failed, 0 skipped")
    return 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
