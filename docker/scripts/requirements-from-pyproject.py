"""Print [project].dependencies of a pyproject.toml, one a line (the image's dependency layer input).

Kept apart from the code so that editing the app's run config does not invalidate the dependency layer:
the `deps` stage only sees this output.
"""

import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Ubuntu 22.04 CUDA bases): a minimal reader is enough here
    tomllib = None


def dependencies(text: str) -> list[str]:
    if tomllib is not None:
        return list(tomllib.loads(text)["project"]["dependencies"])
    import ast
    import re

    block = re.search(r"^dependencies\s*=\s*(\[.*?\])", text, re.S | re.M)
    if block is None:
        raise SystemExit("no [project].dependencies in pyproject.toml")
    body = re.sub(r"#[^\n]*", "", block.group(1))
    return list(ast.literal_eval(body))


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        print("\n".join(dependencies(handle.read())))
